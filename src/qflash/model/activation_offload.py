"""Activation checkpointing of decoder layers with each layer's saved input in CPU memory.

`train.offload_activations`. Checkpointing keeps one tensor per decoder layer from the forward to
the backward: the layer's input, i.e. the residual stream (tokens x hidden, fp32 by default:
28 layers x 8192 tokens x 3584 x 4 bytes = 3.3 GB for Qwen2.5-7B at 4 x 2048 tokens).
transformers' checkpoint (torch's non-reentrant one) holds it through a Python reference that no
saved-tensor hook sees, so `torch.autograd.graph.save_on_cpu` cannot move it. Here each checkpointed
decoder layer's `_gradient_checkpointing_func` — the slot transformers' GradientCheckpointingLayer
calls with (layer forward with its keyword arguments bound, *positional args) — is an
`OffloadedCheckpoint`:

  forward   run the layer without building a graph; copy its input (the positional tensors) to
            pinned CPU memory on a side CUDA stream; the caching allocator keeps the GPU tensor until
            that copy is done, then reuses it
  backward  bring the input back (each layer's backward starts the copy of the previous layer's input,
            so it is usually there already), recompute the layer with grad under the forward's RNG and
            autocast state, and backprop through it

The last layer keeps its input on the GPU: its backward comes first, with nothing to overlap a copy.

kernels.keep_attention: with the torch_varlen backend, each attention call's output and log-sum-exp from
the forward (model/attention.py `keeping`) travel the same way as the layer input (the output, tokens x
hidden in bf16, half the input's size; the lse is small and stays on the GPU), and the recompute takes
them (`reusing`) instead of running the attention forward again: FlashAttention's backward reads only
q, k, v, the output and the lse, so the gradients are the same bits.

The gradients are plain checkpointing's: the same layer recomputed on the same input. The layer's
trainable parameters are inputs of the autograd function, so their gradients leave its backward like
any other input's and accumulate (and reach DDP's hooks) the normal way; a first layer whose input
needs no gradient still gets its LoRA gradients. Keyword arguments (position embeddings, masks,
cu_seqlens: shared by all layers, small) stay where they are.

On the CPU there is no device memory to free: `_HostTwin` keeps a copy where the CUDA path keeps a
pinned one, so the CPU tests run the same autograd function with everything but the streams.

Under CUDA graph capture (train.cuda_graphs, train/graphs.py) the same copies become graph nodes, with
three differences: the pinned buffers come from a `HostArena` filled on the eager run before the capture
(nothing may be allocated on the host while capturing, and every replay must find them at the same
addresses); instead of record_stream (which would keep every layer input's GPU memory out of the graph's
pool until the capture ends), the compute stream waits for each copy out before the layer input is let go,
at the next layer's forward (`join_copies`), and copies back land in memory allocated on the compute
stream; no RNG state is saved (graphs are only captured for steps that draw no random numbers).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import weakref
from dataclasses import dataclass, field

import torch

from qflash.model.attention import keeping, reusing
from qflash.model.fused_lora import checkpoint_contexts, recomputing
from qflash.once import log_once

log = logging.getLogger(__name__)

# Smaller tensors stay on the GPU: a copy costs more than the memory it frees.
MIN_OFFLOAD_BYTES = 1 << 20

def _warn_once(message: str) -> None:
    log_once(log, message)


# --------------------------------------------------------------------------------------------
# Where a layer's input waits for its backward. Each holder has prefetch() (start bringing it
# back; may do nothing) and take() (the tensor, ready to use on the current stream).

_side_streams: dict[int, "torch.cuda.Stream"] = {}


def _side_stream(device: torch.device) -> "torch.cuda.Stream":
    """One copy stream per GPU, shared by all layers, so copies run in the order they were issued."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _side_streams:
        _side_streams[index] = torch.cuda.Stream(device=index)
    return _side_streams[index]


def capturing() -> bool:
    """True while the current CUDA stream is being captured into a graph."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class HostArena:
    """Pinned host buffers for the offloaded layer inputs of graphed micro-batches, taken in call order.

    Filled on an eager run (allocating what is missing), then taken again by the capture, whose graph
    keeps their addresses: a buffer is never freed or replaced while the arena lives (a larger need at
    the same position gets a new buffer; the old one is kept for the graphs that use it). Every replay
    runs its copies in stream order after the previous one's, so graphs can share the buffers."""

    def __init__(self):
        self.buffers: list[torch.Tensor] = []  # flat pinned byte buffers, by call position
        self.kept: list[torch.Tensor] = []  # replaced ones, still used by earlier graphs
        self.in_graphs: set[int] = set()  # ids of the buffers some captured graph uses
        self.position = 0

    def captured(self) -> None:
        """A graph was captured with the buffers as they are: keep each of them while the arena lives."""
        self.in_graphs.update(id(b) for b in self.buffers)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() for b in self.buffers + self.kept)

    def take(self, t: torch.Tensor) -> torch.Tensor:
        need = t.numel() * t.element_size()
        i, self.position = self.position, self.position + 1
        if i < len(self.buffers) and self.buffers[i].numel() >= need:
            flat = self.buffers[i]
        elif capturing():
            raise RuntimeError("train.cuda_graphs: a layer input has no pinned buffer from the eager run before "
                               "the capture (the micro-batch offloaded differently)")
        else:
            flat = torch.empty(need, dtype=torch.uint8, pin_memory=torch.cuda.is_available())
            if i < len(self.buffers):
                if id(self.buffers[i]) in self.in_graphs:
                    self.kept.append(self.buffers[i])
                self.buffers[i] = flat
            else:
                self.buffers.append(flat)
        return flat[:need].view(t.dtype).view(t.shape)


_arena: HostArena | None = None
_unjoined: list[tuple[torch.Tensor, "torch.cuda.Event"]] = []  # captured copies out, not yet waited for


@contextlib.contextmanager
def host_arena(arena: HostArena):
    """Offloaded layer inputs go to `arena`'s buffers, from its first position on."""
    global _arena
    before, _arena = _arena, arena
    arena.position = 0
    try:
        yield arena
    finally:
        _arena = before


def join_copies() -> None:
    """Make the compute stream wait for the captured copies out, and let their GPU tensors go."""
    while _unjoined:
        t, done = _unjoined.pop()
        torch.cuda.current_stream(t.device).wait_event(done)


class _PinnedCopy:
    """A GPU tensor parked in pinned CPU memory between a layer's forward and its backward."""

    def __init__(self, t: torch.Tensor, host: torch.Tensor | None = None):
        self.device = t.device
        self.stream = _side_stream(t.device)
        self.captured = capturing()
        self.host: torch.Tensor | None = (torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                                          if host is None else host)
        self.stream.wait_stream(torch.cuda.current_stream(t.device))  # t has been written
        with torch.cuda.stream(self.stream):
            self.host.copy_(t, non_blocking=True)
        if self.captured:
            done = torch.cuda.Event()
            done.record(self.stream)
            _unjoined.append((t, done))  # joined at the next layer's forward, or at the end of the capture
        else:
            # When the model drops t, the allocator hands its memory out again only after the work queued
            # on the side stream up to then (this copy) is done: the GPU tensor lives exactly as long as needed.
            t.record_stream(self.stream)
        self.back: torch.Tensor | None = None
        self.ready: torch.cuda.Event | None = None

    def prefetch(self) -> None:
        if self.back is not None or self.host is None:
            return
        if self.captured:
            # Allocated in stream order on the compute stream, which the copy waits for: no record_stream.
            current = torch.cuda.current_stream(self.device)
            self.back = torch.empty(self.host.shape, dtype=self.host.dtype, device=self.device)
            self.stream.wait_stream(current)
            with torch.cuda.stream(self.stream):
                self.back.copy_(self.host, non_blocking=True)
        else:
            with torch.cuda.stream(self.stream):  # after the copy out: same stream
                self.back = self.host.to(self.device, non_blocking=True)
        with torch.cuda.stream(self.stream):
            self.ready = torch.cuda.Event()
            self.ready.record(self.stream)
        # The pinned block is reused only after the copy that reads it (the host allocator records it;
        # an arena's buffer is next written by the next step's copy out, on the same stream).
        self.host = None

    def take(self) -> torch.Tensor:
        self.prefetch()
        current = torch.cuda.current_stream(self.device)
        current.wait_event(self.ready)
        t, self.back, self.ready = self.back, None, None
        if not self.captured:
            t.record_stream(current)  # allocated on the side stream, used and freed on this one
        return t


class _Kept:
    """A tensor kept where it is (too small to be worth a copy)."""

    def __init__(self, t: torch.Tensor):
        self.t: torch.Tensor | None = t.detach()

    def prefetch(self) -> None:
        pass

    def take(self) -> torch.Tensor:
        t, self.t = self.t, None
        return t


class _HostTwin(_Kept):
    """The CPU twin of _PinnedCopy: a copy (as the device-to-host copy makes one), no streams."""

    def __init__(self, t: torch.Tensor):
        super().__init__(t.detach().clone())


# Host memory left free when pinning layer inputs: below it they stay on the GPU (a 7B model at 256k
# tokens would pin 105 GB; the kernel's OOM killer would end the run without a word).
HOST_RESERVE_BYTES = 8 << 30


def host_available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux); None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def fits_in_host(nbytes: int, available: int | None = None) -> bool:
    """Room to pin `nbytes` more and still leave HOST_RESERVE_BYTES (or 10% of what is left) free.
    `available`: MemAvailable as already read (default: read it now)."""
    if available is None:
        available = host_available_bytes()
    if available is None:
        return True
    return nbytes <= available - max(HOST_RESERVE_BYTES, available // 10)


def _hold(t: torch.Tensor, keep: bool = False):
    if not t.is_cuda:
        return _HostTwin(t)
    if _unjoined:
        join_copies()  # the previous layer's input: its copy ran beside that layer's compute
    nbytes = t.numel() * t.element_size()
    if keep or nbytes < MIN_OFFLOAD_BYTES:
        return _Kept(t)
    available = host_available_bytes()
    if not fits_in_host(nbytes, available):
        _warn_once(f"train.offload_activations: only {available / 1e9:.1f} GB of host memory available; layer "
                   f"inputs that do not fit stay on the GPU (each is {nbytes / 1e9:.2f} GB)")
        return _Kept(t)
    if _arena is None and capturing():
        raise RuntimeError("train.cuda_graphs: an offloaded checkpoint was captured without a host arena")
    return _PinnedCopy(t, _arena.take(t) if _arena is not None else None)


# --------------------------------------------------------------------------------------------
# One call of one layer: what its backward needs to recompute it.

@dataclass
class _AutocastState:
    device_type: str
    device: dict
    cpu: dict

    @classmethod
    def capture(cls, device_type: str) -> "_AutocastState":
        def state(dt: str) -> dict:
            return {"enabled": torch.is_autocast_enabled(dt), "dtype": torch.get_autocast_dtype(dt),
                    "cache_enabled": torch.is_autocast_cache_enabled()}

        return cls(device_type, state(device_type), state("cpu"))

    def restored(self) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        if self.device_type != "cpu":
            stack.enter_context(torch.autocast(self.device_type, **self.device))
        stack.enter_context(torch.autocast("cpu", **self.cpu))
        return stack


@dataclass
class _RngState:
    """CPU and per-GPU generator states at the forward, so the recompute draws the same dropout masks."""

    cpu: torch.Tensor
    cuda: dict[int, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def capture(cls, devices: list[int]) -> "_RngState":
        return cls(torch.get_rng_state(), {d: torch.cuda.get_rng_state(d) for d in devices})

    @contextlib.contextmanager
    def restored(self):
        devices = list(self.cuda)
        kwargs = {"device_type": "cuda"} if devices else {}
        with torch.random.fork_rng(devices=devices, **kwargs):
            torch.set_rng_state(self.cpu)
            for d, state in self.cuda.items():
                torch.cuda.set_rng_state(state, d)
            yield


class _LayerCall:
    def __init__(self, run, args: tuple, n_params: int, previous: "_LayerCall | None", keep: bool,
                 keep_attention: bool = False):
        self.run = run
        self.keep = keep  # hold the inputs where they are (the last layer: its backward comes first)
        self.keep_attention = keep_attention
        self.attention: list[tuple] = []  # holders of each attention call's (output, lse), kept_attention
        # Positional arguments with each tensor replaced by its slot number (the tensors travel apart).
        self.slots = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
        self.args = [None if isinstance(a, torch.Tensor) else a for a in args]
        self.n_params = n_params
        self.held: list = []
        self.previous = weakref.ref(previous) if previous is not None else None
        cuda_devices = sorted({a.device.index for a in args if isinstance(a, torch.Tensor) and a.is_cuda})
        # Captured graphs draw no random numbers (train/graphs.py refuses steps that would): nothing to replay.
        self.rng = None if capturing() else _RngState.capture(cuda_devices)
        self.autocast = _AutocastState.capture("cuda" if cuda_devices else "cpu")

    def call_args(self, tensors) -> list:
        args = list(self.args)
        for slot, t in zip(self.slots, tensors):
            args[slot] = t
        return args

    def prefetch(self) -> None:
        for h in self.held:
            h.prefetch()
        for pair in self.attention:
            for h in pair:
                h.prefetch()


_last_call: dict[str, weakref.ref] = {}  # per device: the layer call of the forward before this one


class _Recompute(torch.autograd.Function):
    """Outputs of `call.run(*args)`, computed without a graph; recomputed with one in backward."""

    @staticmethod
    def forward(ctx, call: _LayerCall, *tensors):
        inputs = tensors[: len(tensors) - call.n_params]
        call.held = [_hold(t, call.keep) for t in inputs]  # first, so the copy out overlaps the layer's compute
        kept: list = []
        with keeping(kept) if call.keep_attention else contextlib.nullcontext():
            out = call.run(*call.call_args(inputs))  # no graph: autograd functions run their forward without grad
        call.attention = [(_hold(o, call.keep), _hold(lse, call.keep)) for o, lse in kept]
        ctx.call = call
        ctx.params = tensors[len(tensors) - call.n_params :]
        return out

    @staticmethod
    def backward(ctx, *grads):
        call: _LayerCall = ctx.call
        n_inputs = len(call.slots)
        if n_inputs and not call.held:
            raise RuntimeError("train.offload_activations: a second backward through the same decoder-layer call "
                               "(retain_graph=True) is not supported: its input was handed over to the first")
        needs = ctx.needs_input_grad[1:]
        call.prefetch()
        previous = call.previous() if call.previous is not None else None
        if previous is not None:
            previous.prefetch()  # the next layer backward needs: its copy runs while this one computes
        inputs = [h.take().requires_grad_(needs[i]) for i, h in enumerate(call.held)]
        call.held = []
        attention = [(o.take(), lse.take()) for o, lse in call.attention]
        call.attention = []
        rng = call.rng.restored() if call.rng is not None else contextlib.nullcontext()
        reuse = reusing(attention) if call.keep_attention else contextlib.nullcontext()
        with torch.enable_grad(), rng, call.autocast.restored(), recomputing(free=True), reuse:
            out = call.run(*call.call_args(inputs))
        outs = out if isinstance(out, tuple) else (out,)
        pairs = [(o, g) for o, g in zip(outs, grads)
                 if isinstance(o, torch.Tensor) and o.requires_grad and g is not None]
        wanted = [t for i, t in enumerate(inputs) if needs[i]]
        wanted += [p for p, need in zip(ctx.params, needs[n_inputs:]) if need]
        found = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True)
                     if pairs and wanted else [None] * len(wanted))
        return (None, *[next(found) if need else None for need in needs])


def _needs_grad(obj) -> bool:
    if isinstance(obj, torch.Tensor):
        return obj.requires_grad
    if isinstance(obj, (tuple, list)):
        return any(_needs_grad(o) for o in obj)
    if isinstance(obj, dict):
        return any(_needs_grad(o) for o in obj.values())
    return False


def _sharded(layer: torch.nn.Module) -> bool:
    """FSDP2 swaps a layer's parameters between sharded and whole around each pass: not handled here."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return False
    return isinstance(layer, FSDPModule)


class OffloadedCheckpoint:
    """The checkpoint function of one decoder layer: `fn(layer_forward, *args)`, as transformers calls it.

    `keep`: checkpoint without moving the input (the last layer, whose backward comes first).
    `keep_attention`: kernels.keep_attention (see the module docstring).
    """

    recompute_is_free = True  # backprops through its own recompute: that may save other tensors than the forward

    def __init__(self, layer: torch.nn.Module, keep: bool = False, keep_attention: bool = False):
        self.layer = layer  # a strong reference (a cycle through the layer), so that deepcopy follows it
        self.keep = keep
        self.keep_attention = keep_attention

    # Not traced by torch.compile (streams, RNG bookkeeping); the layer forward it calls is compiled
    # on its own (kernels.compile_layers compiles the layer's call inside the checkpoint function).
    @torch.compiler.disable
    def __call__(self, function, *args):
        layer = self.layer
        params = [p for p in layer.parameters() if p.requires_grad]
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if not torch.is_grad_enabled() or not (params or any(t.requires_grad for t in tensors)):
            return function(*args)  # nothing to differentiate: nothing to keep
        bound = function.keywords if isinstance(function, functools.partial) else {}
        if _needs_grad(bound) or _needs_grad([a for a in args if not isinstance(a, torch.Tensor)]):
            # A gradient would have to flow into an argument this function does not hand to autograd.
            _warn_once("train.offload_activations: a decoder layer got an argument that needs a gradient "
                       "by keyword; those layers use plain (non-reentrant) checkpointing, not offloaded")
            return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False,
                                                     context_fn=checkpoint_contexts)
        if _sharded(layer):
            _warn_once("train.offload_activations: FSDP-sharded decoder layers use plain (non-reentrant) "
                       "checkpointing, not offloaded")
            return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False,
                                                     context_fn=checkpoint_contexts)
        if not tensors:
            _warn_once("train.offload_activations: a decoder layer got its hidden states by keyword; "
                       "checkpointed but not offloaded")
        key = str(tensors[0].device) if tensors else "none"
        previous = _last_call[key]() if key in _last_call else None
        call = _LayerCall(function, args, len(params), previous, self.keep, self.keep_attention)
        _last_call[key] = weakref.ref(call)
        return _Recompute.apply(call, *tensors, *params)


def offload_checkpointed_layers(model: torch.nn.Module, keep_attention: bool = False) -> int:
    """Give every checkpointed decoder layer of `model` an OffloadedCheckpoint; returns how many.
    `keep_attention`: kernels.keep_attention.

    Call after transformers has enabled checkpointing (it marks the layers and sets the slot this fills).
    """
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # pragma: no cover - transformers < 4.52
        GradientCheckpointingLayer = None
    layers = [m for m in model.modules()
              if GradientCheckpointingLayer is not None and isinstance(m, GradientCheckpointingLayer)
              and getattr(m, "gradient_checkpointing", False)]
    for i, layer in enumerate(layers):
        layer._gradient_checkpointing_func = OffloadedCheckpoint(layer, keep=i == len(layers) - 1,
                                                                 keep_attention=keep_attention)
    n = len(layers)
    if n == 0:
        log.warning("train.offload_activations: no checkpointed decoder layer found in %s (needs transformers' "
                    "GradientCheckpointingLayer); the layer inputs stay on the GPU", type(model).__name__)
    else:
        log.info("train.offload_activations: %d decoder layers keep their checkpointed input in CPU memory", n)
    return n
