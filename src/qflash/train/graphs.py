"""CUDA graphs of a micro-batch's forward and backward (`train.cuda_graphs`).

A QLoRA step of a small model is bound by the CPU, not the GPU: per decoder layer and pass the host
runs dynamo's guards, the compiled graphs' wrappers, the offloaded checkpoint's bookkeeping and the
launches of a few hundred kernels, each shorter than its launch (Qwen2.5-0.5B at 8,192 tokens: the GPU
is busy 97 ms of a 384 ms step, bench/NOTES.md). A CUDA graph records all of that once and replays
the kernels with one launch.

`GraphedLoss(model, params)(batch, scale)` does what `loss = loss_sum(model, batch);
(loss * scale).backward()` does and returns the loss. Micro-batches are told apart by their signature
(every input tensor's shape and dtype, the packed batch's max_seqlen): the first one of a signature
runs eagerly (it compiles, and fills the pinned buffers of the activation offload), the second is
captured into a graph and replayed, every later one is replayed. Replays copy the batch into the
graph's static inputs and write the scale into a device scalar; the gradients accumulate into the
parameters' `.grad` tensors the graph was captured with, which GraphedLoss puts back (zeroed) when
an optimizer set them to None. At most `max_graphs` signatures are captured (they share one memory
pool); the others stay eager.

Not captured (eager, said once why): steps that draw random numbers (dropout > 0: the checkpoint's
recompute must replay the forward's masks, which a graph's RNG offsets do not give), CPU runs, and
models whose loss head is not a plain lm_head; under `auto`, models of 3B parameters and more (their
steps are GPU-bound: no gain measured on 7B). A failed capture says why and leaves that signature
eager; the step's result is the same either way (tests/gpu/test_graphs.py: losses equal, LoRA gradients
within the backward's own atomics noise, per step).

`factory` makes the graph object: CUDA's by default; the CPU tests pass `RecordedGraph`, which keeps
the captured function and runs it again on replay — the same static-buffer data flow, without CUDA.
"""

from __future__ import annotations

import contextlib
import logging
import math
import traceback
from typing import Callable

import torch

from qflash.data.batching import Batch, labelled_positions
from qflash.model import activation_offload
from qflash.model.attention import NO_MASK
from qflash.train import loss as loss_mod

log = logging.getLogger(__name__)


def random_blocker(model: torch.nn.Module) -> str | None:
    """Why a training step of `model` draws random numbers (None: it draws none)."""
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0:
            return f"{name or 'the model'} has dropout {m.p} (lora.dropout=0 lets the step be captured)"
    lm = loss_mod._causal_lm(model)
    cfg = getattr(lm, "config", None)
    for key, value in (vars(cfg).items() if cfg is not None else ()):
        if "dropout" in key and isinstance(value, (int, float)) and value > 0:
            return f"the model's config has {key}={value}"
    return None


def graph_blocker(model: torch.nn.Module, device: torch.device, setting: bool | str = True) -> str | None:
    """Why micro-batches of `model` are not captured under train.cuda_graphs=`setting` (None: they are)."""
    if setting is False:
        return "train.cuda_graphs=false"
    if device.type != "cuda":
        return "not on a CUDA device"
    if not loss_mod._plain_head(loss_mod._causal_lm(model)):
        return "the model scales its logits (the loss takes the full logits)"
    random = random_blocker(model)
    if random is not None:
        return random
    if setting == "auto":
        n = model_parameters(model)
        if n >= AUTO_MAX_PARAMETERS:
            return (f"auto: {n / 1e9:.1f}B parameters, the GPU bounds the step (train.cuda_graphs=true "
                    "captures anyway)")
    return None


# train.cuda_graphs=auto captures models below this size. Measured on an H100 (bench `fixed`): Qwen2.5-0.5B
# 30.4k -> 82.3k tok/s; Qwen2.5-7B 11.57k eager vs 11.55k graphed, peak +0.3 GB. Between: not measured.
AUTO_MAX_PARAMETERS = 3_000_000_000


def model_parameters(model: torch.nn.Module) -> int:
    """The model's parameter count, 4-bit weights counted at their full shape (not their packed bytes)."""
    total = 0
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        total += math.prod(state.shape) if state is not None and getattr(state, "shape", None) else p.numel()
    return total


class RecordedGraph:
    """The CPU twin of torch.cuda.CUDAGraph: `capture(fn)` runs fn once and keeps it; replay() runs it again,
    reading the same static buffers a CUDA graph's kernels would read."""

    def __init__(self):
        self.fn: Callable[[], None] | None = None

    def capture(self, fn: Callable[[], None], pool=None) -> None:
        self.fn = fn
        fn()

    def replay(self) -> None:
        self.fn()


@contextlib.contextmanager
def _stale_streams_redirected():
    """While capturing, let autograd move work it would queue on a stream left over from an eager run
    (a node built before the capture, e.g. on the default stream) to the capturing stream, where torch has
    the switch for it (torch.autograd.graph.set_override_stale_capture_stream, newer than the H100's 2.11).
    Without it such a wait crosses the capture's boundary and the capture fails (then the step runs eagerly)."""
    switch = getattr(torch.autograd.graph, "set_override_stale_capture_stream", None)
    state = getattr(torch._C, "_override_stale_capture_stream", None)
    if switch is None or state is None:
        yield
        return
    before = bool(state())
    switch(True)
    try:
        yield
    finally:
        switch(before)


class _CudaGraph:
    def __init__(self):
        self.graph = torch.cuda.CUDAGraph()

    def capture(self, fn: Callable[[], None], pool=None) -> None:
        with _stale_streams_redirected(), torch.cuda.graph(self.graph, pool=pool):
            fn()

    def replay(self) -> None:
        self.graph.replay()

    def pool(self):
        return self.graph.pool()


class _Captured:
    """One signature's graph and the tensors it reads and writes."""

    def __init__(self, graph, inputs: dict, labels: torch.Tensor, keep: torch.Tensor, scale: torch.Tensor,
                 loss: torch.Tensor, grads: list[torch.Tensor]):
        self.graph, self.inputs, self.labels, self.keep = graph, inputs, labels, keep
        self.scale, self.loss, self.grads = scale, loss, grads


def _varies(v) -> bool:
    """An input tensor the graph reads from a static buffer (not the constant NO_MASK placeholder)."""
    return isinstance(v, torch.Tensor) and v is not NO_MASK


def _static_copies(inputs: dict) -> dict:
    """The graph's input buffers: a copy of each varying tensor, one per tensor object, so inputs that are
    the same tensor (cu_seq_lens_q and _k) stay one. Compiled layers guard on that aliasing: copies made
    apart would make dynamo recompile inside the capture, which cannot run there."""
    copies: dict[int, torch.Tensor] = {}
    out = {}
    for k, v in inputs.items():
        if _varies(v):
            if id(v) not in copies:
                copies[id(v)] = v.clone()
            v = copies[id(v)]
        out[k] = v
    return out


def _signature(inputs: dict, labels: torch.Tensor, keep: torch.Tensor) -> tuple:
    def sig(v):
        return ("t", tuple(v.shape), v.dtype, v.device) if isinstance(v, torch.Tensor) else ("v", v)

    # Which inputs are one tensor: a graph captured with cu_seq_lens_q and _k as one buffer reads only one.
    first: dict[int, str] = {}
    aliases = tuple((k, first.setdefault(id(v), k)) for k, v in sorted(inputs.items()) if _varies(v))
    return (tuple((k, sig(v)) for k, v in sorted(inputs.items())), aliases, sig(labels), sig(keep),
            torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))


def _state(model: torch.nn.Module) -> tuple:
    """What else a captured graph depends on: training mode (checkpointing acts only in it)."""
    return (model.training,)


def _cause(e: BaseException) -> str:
    """`e` in one line, with the error it followed from: a failed capture raises at its end ("operation
    failed due to a previous error during capture") while the call that broke it raised first."""
    def line(x: BaseException) -> str:
        text = str(x).splitlines()[0] if str(x) else ""
        return f"{type(x).__name__}: {text}"

    first = e
    while first.__context__ is not None and first.__context__ is not first:
        first = first.__context__
    return line(e) if first is e else f"{line(e)}; first {line(first)}"


class GraphedLoss:
    """`(batch, scale)` -> loss_sum(model, batch), with (loss * scale).backward() done; captured per signature."""

    def __init__(self, model: torch.nn.Module, params: list[torch.nn.Parameter], *, max_graphs: int = 4,
                 factory: Callable[[], object] | None = None, fused_ce: bool = False):
        self.model, self.params, self.max_graphs = model, list(params), max_graphs
        self.fused_ce = fused_ce  # kernels.fused_ce as resolved (train/levers.py)
        self.factory = factory or _CudaGraph
        self.seen: dict[tuple, int] = {}
        self.graphs: dict[tuple, _Captured] = {}
        self.failed: dict[tuple, str] = {}  # signature -> the failure's traceback (not the exception: its frames hold tensors)
        self.arena = activation_offload.HostArena()
        self.pool = None
        self.replays = 0
        self.eager_runs = 0

    # ---- the eager path --------------------------------------------------------------------------

    def _eager(self, inputs: dict, labels: torch.Tensor, keep: torch.Tensor, scale: float,
               arena: bool) -> torch.Tensor:
        self.eager_runs += 1
        with activation_offload.host_arena(self.arena) if arena else contextlib.nullcontext():
            loss = loss_mod.decoder_loss_sum(self.model, inputs, labels, keep, fused_ce=self.fused_ce)
            (loss * scale).backward()
        return loss.detach()

    # ---- capture and replay ----------------------------------------------------------------------

    def _own_grads(self) -> list[torch.Tensor]:
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        return [p.grad for p in self.params]

    def _restore_grads(self, grads: list[torch.Tensor]) -> None:
        """Put the captured .grad tensors back where an optimizer's zero_grad(set_to_none) dropped them."""
        zero = []
        for p, g in zip(self.params, grads):
            if p.grad is None:
                zero.append(g)
                p.grad = g
            elif p.grad is not g:
                g.copy_(p.grad)
                p.grad = g
        if zero:
            torch._foreach_zero_(zero)

    def _capture(self, key: tuple, inputs: dict, labels: torch.Tensor, keep: torch.Tensor) -> _Captured:
        static_inputs = _static_copies(inputs)
        static_labels, static_keep = labels.clone(), keep.clone()
        scale = torch.zeros((), dtype=torch.float32, device=labels.device)
        grads = self._own_grads()
        graph = self.factory()
        before = [g.clone() for g in grads] if isinstance(graph, RecordedGraph) else None
        out: dict[str, torch.Tensor] = {}

        def step() -> None:
            with activation_offload.host_arena(self.arena):
                loss = loss_mod.decoder_loss_sum(self.model, static_inputs, static_labels, static_keep,
                                                fused_ce=self.fused_ce)
                (loss * scale).backward()
                activation_offload.join_copies()
            out["loss"] = loss.detach()

        if before is not None:
            # The twin runs the function while "capturing"; a CUDA capture runs nothing. Undo its work.
            graph.capture(step, pool=self.pool)
            for g, b in zip(grads, before):
                g.copy_(b)
        else:
            graph.capture(step, pool=self.pool)
            if self.pool is None:
                self.pool = graph.pool()
        self.arena.captured()
        return _Captured(graph, static_inputs, static_labels, static_keep, scale, out["loss"], grads)

    def _replay(self, c: _Captured, inputs: dict, labels: torch.Tensor, keep: torch.Tensor,
                scale: float) -> torch.Tensor:
        done = set()
        for k, v in inputs.items():
            if _varies(v) and id(c.inputs[k]) not in done:
                done.add(id(c.inputs[k]))
                c.inputs[k].copy_(v, non_blocking=True)
        c.labels.copy_(labels, non_blocking=True)
        c.keep.copy_(keep, non_blocking=True)
        c.scale.fill_(scale)
        self._restore_grads(c.grads)
        c.graph.replay()
        self.replays += 1
        return c.loss.clone()

    def __call__(self, batch: Batch, scale: float) -> torch.Tensor:
        inputs = loss_mod.device_inputs(self.model, batch)
        labels = batch.labels[:, 1:].reshape(-1)
        keep = batch.label_index if batch.label_index is not None else labelled_positions(batch.labels)
        key = _signature(inputs, labels, keep) + _state(self.model)
        captured = self.graphs.get(key)
        if captured is not None:
            return self._replay(captured, inputs, labels, keep, scale)
        seen = self._sighting(key)
        room = (len(self.graphs) < self.max_graphs and key not in self.failed
                and len(self.failed) < self.MAX_FAILURES)
        if seen == 0 or not room:
            return self._eager(inputs, labels, keep, scale, arena=room)
        try:
            captured = self._capture(key, inputs, labels, keep)
        except Exception as e:  # noqa: BLE001 - any capture failure: this signature stays eager, said once
            self.failed[key] = "".join(traceback.format_exception(e))
            activation_offload._unjoined.clear()
            gave_up = len(self.failed) >= self.MAX_FAILURES
            log.warning("train.cuda_graphs: capture failed (%s); %s", _cause(e),
                        f"{len(self.failed)} captures failed: no more are tried, the run goes on eagerly"
                        if gave_up else "this batch shape runs eagerly")
            captured = None
        if captured is None:
            # Out of the except block the failed graph and its traceback's frames are gone, so what the capture
            # reserved can go back (after one failed capture the Qwen2.5-7B bench showed 56.8 GB reserved for
            # 10.6 GB allocated; whether this returns it is not yet measured).
            if torch.cuda.is_available():
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
            return self._eager(inputs, labels, keep, scale, arena=False)
        self.graphs[key] = captured
        return self._replay(captured, inputs, labels, keep, scale)

    # Failed captures after which no more are tried (a cause that breaks one shape's capture usually breaks all,
    # and each attempt costs a forward and backward's time and a warning).
    MAX_FAILURES = 2

    # Signatures remembered for their second sighting. Supervised batches bring a new one nearly every
    # micro-batch: past this many the memory is cleared (the captured graphs stay), so a long run's does not grow.
    MAX_SEEN = 4096

    def _sighting(self, key: tuple) -> int:
        """How often `key` was seen before (as far as remembered), counting this one."""
        if key not in self.seen and len(self.seen) >= self.MAX_SEEN:
            self.seen.clear()
        seen = self.seen.get(key, 0)
        self.seen[key] = seen + 1
        return seen

    def summary(self) -> str:
        return (f"{len(self.graphs)} graph(s) captured, {self.replays} micro-batches replayed, "
                f"{self.eager_runs} eager" + (f", {len(self.failed)} shape(s) failed to capture" if self.failed else ""))
