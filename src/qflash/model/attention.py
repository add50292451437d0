"""One attention facade for every model, registered through transformers' public AttentionInterface.

Each model loads with the implementation name of its `Choice` (`attn_implementation="qattn_tv_d16384"`: the
backend and the cuDNN routing, resolved once from the config and the device by `choose`); its attention layers
then call `qflash_attention` with that choice, so two models in one process may use different backends and
nothing global decides it (`choice_of(model)` reads it back). The backends:

  flash_attn    the flash-attn package's flash_attn_varlen_func (FA3's flash_attn_interface on Hopper)
  torch_varlen  PyTorch's bundled FlashAttention-2 kernel, torch.nn.attention.varlen.varlen_attn (GPU)
  sdpa          torch SDPA: padded batches, or a block-diagonal causal mask for packed ones (CPU, fallback)
  eager         transformers' reference implementation (same masks as sdpa)

Packed batches carry `cu_seq_lens_q/k` and `max_length_q/k`, computed once per batch by the
collator and passed through the model's **kwargs to every layer. A sliding-window layer (Mistral's, Gemma 3's
local layers) hands its window to the varlen kernels, which apply it within each document (FlashAttention's
window_size: a token sees itself and the window - 1 tokens before it, never past its document's start). A
backend that was asked for and is missing is an error naming what to install; `auto` picks the fastest available
and says which.

attention.cudnn: a packed batch whose documents all have one length (n documents of max_length
tokens fill the row exactly: known from shapes and the collator's ints, no GPU sync) is one dense
batch of n rows, and goes to cuDNN's fused attention (SDPA's CUDNN backend, native GQA), which on an
H100 runs the forward 2.4x and forward + backward 1.8x as fast as PyTorch's varlen FlashAttention-2.

kernels.keep_attention: inside a checkpointed layer's forward and recompute (`keeping` / `reusing`, entered by
model/activation_offload.py), torch_varlen runs PyTorch's FlashAttention-2 kernels (the ones
torch.nn.attention.varlen calls) through our own op, `qflash::flash_varlen`, whose output and log-sum-exp
are kept from the forward and handed to the recompute, which then runs no attention forward at all:
FlashAttention's backward needs only q, k, v, the output and the lse. Grouped k/v go in as they are (the
kernel reads one kv head per group of query heads; torch 2.11's varlen_attn wants them repeated to every
query head, 7x for Qwen2.5-7B). Elsewhere torch_varlen calls varlen_attn. On the CPU the op is a
per-document fp32 twin with the same backward formulas (from the output and the lse).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import inspect
import logging
import sys
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from qflash.errors import ConfigError

log = logging.getLogger(__name__)

# Not "qflash": transformers treats any implementation name containing "flash" (or "sdpa") as its own kernels.
NAME = "qattn"
BACKENDS = ("auto", "flash_attn", "torch_varlen", "sdpa", "eager")
VARLEN = ("flash_attn", "torch_varlen")
_CODES = {"flash_attn": "fa", "torch_varlen": "tv", "sdpa": "sd", "eager": "ea"}

# attention.cudnn under auto: documents up to this length (the longest measured against FlashAttention-2:
# bench/NOTES.md, session 9)
CUDNN_AUTO_MAX_LENGTH = 16384


@dataclass(frozen=True)
class Choice:
    """What a model's attention layers run: `backend` (resolved, never auto), and up to which document length
    packed documents of one length go to cuDNN's dense attention (`equal_dense_max`, 0: never)."""

    backend: str = "sdpa"
    equal_dense_max: int = 0

    @property
    def varlen(self) -> bool:
        """Packed batches for this choice carry cu_seqlens (the varlen kernels read them) instead of a mask."""
        return self.backend in VARLEN

    @property
    def name(self) -> str:
        """The attn_implementation this choice is registered under with transformers."""
        return f"{NAME}_{_CODES[self.backend]}" + (f"_d{self.equal_dense_max}" if self.equal_dense_max else "")


_REGISTERED: dict[str, Choice] = {}  # implementation name -> choice (what register() told transformers)


class PackingError(RuntimeError):
    """Packed documents would see each other: refuse instead of training on the wrong attention."""


def available(backend: str, on_cuda: bool = True) -> str | None:
    """None when usable here, else what is missing. `on_cuda`: the model runs on the GPU (train.device=cpu on a
    machine with one: the CPU's backends only)."""
    if backend in ("sdpa", "eager"):
        return None
    if not torch.cuda.is_available():
        return "a CUDA GPU"
    if not on_cuda:
        return "the model on a CUDA GPU (it is on the CPU)"
    from qflash.model import gpu

    if backend in ("flash_attn", "torch_varlen") and gpu.capability() < gpu.AMPERE:
        return f"a GPU of compute capability 8.0+ (FlashAttention-2; this one has {gpu.describe()})"
    if backend == "flash_attn":
        if importlib.util.find_spec("flash_attn") is None and importlib.util.find_spec("flash_attn_interface") is None:
            return "the flash-attn package (pip install flash-attn --no-build-isolation)"
        return None
    if backend == "torch_varlen":
        try:
            from torch.nn.attention import varlen  # noqa: F401
        except ImportError:
            return f"torch.nn.attention.varlen (PyTorch >= 2.10; this is {torch.__version__})"
        return None
    return f"a known backend (one of {', '.join(BACKENDS)})"


def resolve(backend: str, on_cuda: bool = True) -> str:
    """The backend to use for `attention.backend`; raises when an explicit choice is unavailable."""
    if backend == "auto":
        for candidate in ("flash_attn", "torch_varlen", "sdpa"):
            if available(candidate, on_cuda) is None:
                return candidate
    missing = available(backend, on_cuda)
    if missing:
        raise ConfigError(f"attention.backend={backend} needs {missing}; use attention.backend=auto or sdpa")
    return backend


def cudnn_missing(setting: bool | str, backend: str, on_cuda: bool = True) -> str | None:
    """None when attention.cudnn=`setting` turns the equal-length cuDNN path on next to `backend`, else why not."""
    if setting is False or backend not in VARLEN:
        return "off" if setting is False else f"attention.backend={backend} (not a varlen kernel)"
    if not torch.cuda.is_available() or not on_cuda:
        return "a CUDA GPU"
    if not torch.backends.cudnn.is_available():
        return "PyTorch built with cuDNN"
    from torch.nn.attention import SDPBackend

    if not hasattr(SDPBackend, "CUDNN_ATTENTION"):
        return f"SDPA's CUDNN_ATTENTION backend (this is PyTorch {torch.__version__})"
    if setting == "auto":
        if backend != "torch_varlen":
            return "auto keeps flash-attn (FA3 on Hopper is as fast)"
        from qflash.model import gpu

        if gpu.capability() < (9, 0):
            return f"auto: a Hopper or newer GPU (measured there only; this one has {gpu.describe()})"
    return None


def choose(backend: str, cudnn: bool | str = "auto", on_cuda: bool = True) -> Choice:
    """attention.backend and attention.cudnn resolved for this device (`on_cuda`: False for a model on the CPU,
    also where a GPU is present); an explicit choice that cannot be had is a ConfigError."""
    chosen = resolve(backend, on_cuda)
    why_not = cudnn_missing(cudnn, chosen, on_cuda)
    if cudnn is True and why_not is not None:
        raise ConfigError(f"attention.cudnn=true needs {why_not}; use attention.cudnn=auto or false")
    if backend == "auto" and chosen == "sdpa" and torch.cuda.is_available() and on_cuda:
        skipped = available("torch_varlen")
        if skipped is not None:
            log.info("attention: no varlen FlashAttention kernel: torch_varlen needs %s", skipped)
    dense = 0 if why_not is not None else CUDNN_AUTO_MAX_LENGTH if cudnn == "auto" else sys.maxsize
    if dense:
        log.info("attention: packed documents of one length go to cuDNN's fused attention (attention.cudnn=%s)",
                 str(cudnn).lower())
    log.info("attention backend: %s%s", chosen, " (auto: fastest available)" if backend == "auto" else "")
    return Choice(chosen, dense)


def register(choice: Choice) -> str:
    """Register `choice` with transformers (idempotent); returns the attn_implementation name to load with."""
    if choice.name not in _REGISTERED:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        AttentionInterface.register(choice.name, functools.partial(qflash_attention, choice=choice))
        AttentionMaskInterface.register(choice.name, functools.partial(_mask, choice=choice))
        _REGISTERED[choice.name] = choice
    return choice.name


def choice_of(model: torch.nn.Module) -> Choice:
    """The attention a loaded model runs (sdpa for a model not loaded through qflash's facade)."""
    config = getattr(model, "config", None)
    return _REGISTERED.get(getattr(config, "_attn_implementation", None), Choice("sdpa"))


def use(model: torch.nn.Module, choice: Choice) -> None:
    """Switch a loaded model's attention to `choice` (tests; transformers' own set_attn_implementation)."""
    model.set_attn_implementation(register(choice))


# ---------------------------------------------------------------------------------------------
# Masks: varlen kernels need none (cu_seqlens say where documents end); sdpa/eager get transformers'
# own masks, which are block-diagonal when position_ids restart inside a row.

# Passed as `attention_mask` with packed varlen batches (Batch.model_inputs): transformers returns a 4D mask
# as it is, so it neither builds a mask nor runs its packed-sequence detection, whose `.all()` makes the CPU wait
# for the GPU before every micro-batch's first layer. The varlen kernels read cu_seqlens instead; any other path
# that meets it refuses (it is no mask).
NO_MASK = torch.ones((1, 1, 1, 1), dtype=torch.bool)


def _mask(*args, choice: Choice, **kwargs):
    from transformers.masking_utils import eager_mask, sdpa_mask

    # A varlen model's unpadded batches (no cu_seqlens: eval, generation) run SDPA causal without a mask, unless a
    # sliding window (local_size) reaches back less far than the sequence: that needs the window's mask.
    window = kwargs.get("local_size")
    reached = window is not None and kwargs.get("kv_length", 0) > window
    if choice.varlen and kwargs.get("attention_mask") is None and not reached:
        return None
    return (eager_mask if choice.backend == "eager" else sdpa_mask)(*args, **kwargs)


def _restarts(position_ids: torch.Tensor) -> bool:
    return bool((position_ids[:, 1:] != position_ids[:, :-1] + 1).any())


# ---------------------------------------------------------------------------------------------

_warned: set[str] = set()


_varlen_kwargs: dict | None = None


def _window_left(window: int | None) -> int:
    """FlashAttention's window_size[0] for transformers' sliding_window (q - kv < window), -1: unlimited."""
    return window - 1 if window else -1


def _torch_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scaling, dropout=0.0, window=None):
    """q (tokens, heads, dim), k/v (tokens, kv_heads, dim): PyTorch's FlashAttention-2 kernels; through
    flash_varlen where a checkpointed layer keeps or reuses attention outputs (kernels.keep_attention).
    `window`: a sliding window, applied within each document."""
    global _varlen_kwargs

    if dropout > 0 and "dropout" not in _warned:
        _warned.add("dropout")
        log.warning("attention.backend=torch_varlen: the model asks for attention dropout %.3g, which PyTorch's varlen "
                    "kernel does not implement; trained without it (attention.backend=flash_attn or sdpa apply it)",
                    dropout)
    from torch.nn.attention.varlen import varlen_attn

    if _varlen_kwargs is None:
        params = inspect.signature(varlen_attn).parameters
        _varlen_kwargs = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
        if "enable_gqa" in params:
            _varlen_kwargs["enable_gqa"] = True
    if _MEMO.mode is not None or (window and "window_size" not in _varlen_kwargs):
        # kept attention, or a window this PyTorch's varlen_attn cannot take: the same FlashAttention-2 kernels
        # through qflash::flash_varlen, which hands them the window
        scale = float(scaling) if scaling is not None else q.shape[-1] ** -0.5
        return flash_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale, _window_left(window))[0]
    kwargs = dict(_varlen_kwargs)
    if window:
        kwargs["window_size"] = (_window_left(window), 0)
    if q.shape[1] != k.shape[1] and "enable_gqa" not in kwargs:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, scale=scaling, **kwargs)


def _flash_attn(q, k, v, cu_q, cu_k, max_q, max_k, scaling, dropout=0.0, window=None):
    """flash-attn's varlen function (FA3 on Hopper when installed, else FA2); `window` within each document."""
    windowed = {"window_size": (_window_left(window), 0)} if window else {}
    if dropout > 0:  # FA3 has no dropout; FA2's varlen function has
        try:
            from flash_attn import flash_attn_varlen_func as fa2
        except ImportError:
            fa2 = None
        if fa2 is not None:
            return fa2(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=dropout, softmax_scale=scaling, causal=True,
                       **windowed)
        if "dropout" not in _warned:
            _warned.add("dropout")
            log.warning("attention.backend=flash_attn: the model asks for attention dropout %.3g, which FA3 does not "
                        "implement (the flash-attn 2 package does); trained without it", dropout)
    try:
        from flash_attn_interface import flash_attn_varlen_func  # FA3 (Hopper)
    except ImportError:
        from flash_attn import flash_attn_varlen_func
    out = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=scaling, causal=True, **windowed)
    return out[0] if isinstance(out, tuple) else out


_KERNELS: dict[str, Callable] = {"torch_varlen": _torch_varlen, "flash_attn": _flash_attn}


# ---------------------------------------------------------------------------------------------
# qflash::flash_varlen — see the module docstring.

class _Memo:
    """Where flash_varlen calls put their (output, lse) in a layer's forward, and take them in its recompute."""

    mode: str | None = None  # "keep" | "reuse" | None
    pairs: list = []
    taken = 0


_MEMO = _Memo()


@contextlib.contextmanager
def keeping(into: list):
    """Each flash_varlen call inside appends a copy of its (output, lse) to `into` (a layer's forward)."""
    before = (_MEMO.mode, _MEMO.pairs, _MEMO.taken)
    _MEMO.mode, _MEMO.pairs, _MEMO.taken = "keep", into, 0
    try:
        yield into
    finally:
        _MEMO.mode, _MEMO.pairs, _MEMO.taken = before


@contextlib.contextmanager
def reusing(pairs: list):
    """Each flash_varlen call inside returns the next of `pairs` (what keeping() collected in the same layer's
    forward) instead of running the forward kernel; every pair must be taken, in order, by a call of its shape."""
    before = (_MEMO.mode, _MEMO.pairs, _MEMO.taken)
    _MEMO.mode, _MEMO.pairs, _MEMO.taken = "reuse", pairs, 0
    try:
        yield
        if _MEMO.taken != len(pairs):
            raise RuntimeError(f"kernels.keep_attention: the recompute ran {_MEMO.taken} attention calls, the forward "
                               f"{len(pairs)}; set kernels.keep_attention=false and report this model")
    finally:
        _MEMO.mode, _MEMO.pairs, _MEMO.taken = before


def _documents(q, k, v, cu_q):
    """Per packed document: (start, end, q, k, v) in fp32, k and v repeated to q's heads."""
    rep = q.shape[1] // k.shape[1]
    bounds = cu_q.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        yield (a, b, q[a:b].float(), k[a:b].float().repeat_interleave(rep, dim=1),
               v[a:b].float().repeat_interleave(rep, dim=1))


def _causal_scores(q: torch.Tensor, k: torch.Tensor, scale: float, left: int = -1) -> torch.Tensor:
    """One document's (heads, L, L) scores, q and k with the same heads, the future at -inf; `left` >= 0: so are
    the keys more than `left` tokens before the query (FlashAttention's window_size[0])."""
    s = torch.einsum("qhd,khd->hqk", q, k) * scale
    ones = torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device)
    hidden = ones.triu(1) | ones.tril(-left - 1) if left >= 0 else ones.triu(1)
    return s.masked_fill(hidden, float("-inf"))


def _twin_forward(q, k, v, cu_q, scale, left=-1):
    """The CPU twin of FlashAttention's varlen forward: per document, in fp32; lse (heads, tokens)."""
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((q.shape[1], q.shape[0]), dtype=torch.float32, device=q.device)
    for a, b, qq, kk, vv in _documents(q, k, v, cu_q):
        s = _causal_scores(qq, kk, scale, left)
        lse[:, a:b] = torch.logsumexp(s, dim=-1)
        out[a:b] = torch.einsum("hqk,khd->qhd", torch.exp(s - lse[:, a:b, None]), vv).to(q.dtype)
    return out, lse


def _twin_backward(grad, q, k, v, out, lse, cu_q, scale, left=-1):
    """FlashAttention's backward in fp32, per document, from the output and the lse (no softmax kept):
    P = exp(S - lse), dV = P^T dO, dS = P * (dO V^T - rowsum(dO * O)), dQ = dS K s, dK = dS^T Q s."""
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    kv_heads, rep = k.shape[1], q.shape[1] // k.shape[1]
    for a, b, qq, kk, vv in _documents(q, k, v, cu_q):
        p = torch.exp(_causal_scores(qq, kk, scale, left) - lse[:, a:b, None])
        g, o = grad[a:b].float(), out[a:b].float()
        ds = p * (torch.einsum("qhd,khd->hqk", g, vv) - (g * o).sum(-1).transpose(0, 1)[:, :, None])
        dq[a:b] = (torch.einsum("hqk,khd->qhd", ds, kk) * scale).to(q.dtype)
        dk_full = torch.einsum("hqk,qhd->khd", ds, qq) * scale
        dv_full = torch.einsum("hqk,qhd->khd", p, g)
        dk[a:b] = dk_full.view(b - a, kv_heads, rep, -1).sum(2).to(k.dtype)
        dv[a:b] = dv_full.view(b - a, kv_heads, rep, -1).sum(2).to(v.dtype)
    return dq, dk, dv


@torch.library.custom_op("qflash::flash_varlen", mutates_args=())
def flash_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                 max_q: int, max_k: int, scale: float, left: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention within each packed document: q (tokens, heads, dim), k/v (tokens, kv_heads, dim), heads a
    multiple of kv_heads; `left` >= 0: a sliding window, each query sees itself and `left` keys before it.
    Returns (output (tokens, heads, dim), lse (heads, tokens) fp32)."""
    if _MEMO.mode == "reuse":
        if _MEMO.taken >= len(_MEMO.pairs):
            raise RuntimeError("kernels.keep_attention: the recompute ran more attention calls than the forward; "
                               "set kernels.keep_attention=false and report this model")
        out, lse = _MEMO.pairs[_MEMO.taken]
        _MEMO.taken += 1
        if out.shape != q.shape or lse.shape != (q.shape[1], q.shape[0]):
            raise RuntimeError(f"kernels.keep_attention: the recompute's attention call {_MEMO.taken} has q "
                               f"{tuple(q.shape)}, the forward's output {tuple(out.shape)}")
        return out, lse
    if q.is_cuda:
        out, lse, _, _, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, cu_q, cu_k, max_q, max_k, 0.0, True, False, scale=scale, window_size_left=left,
            window_size_right=0)
    else:
        out, lse = _twin_forward(q, k, v, cu_q, scale, left)
    if _MEMO.mode == "keep":
        # Copies: the caller's graph may reuse the returned buffers once it is done with them (Inductor does).
        _MEMO.pairs.append((out.clone(), lse.clone()))
    return out, lse


@flash_varlen.register_fake
def _(q, k, v, cu_q, cu_k, max_q, max_k, scale, left=-1):
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("qflash::flash_varlen_backward", mutates_args=())
def flash_varlen_backward(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                          lse: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor, max_q: int, max_k: int,
                          scale: float, left: int = -1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if q.is_cuda:
        rng = torch.zeros(2, dtype=torch.uint64, device=q.device)  # no dropout: never read
        return torch.ops.aten._flash_attention_backward(
            grad.contiguous(), q, k, v, out, lse, cu_q, cu_k, max_q, max_k, 0.0, True, rng,
            torch.empty(0, device=q.device), scale=scale, window_size_left=left, window_size_right=0)
    return _twin_backward(grad, q, k, v, out, lse, cu_q, scale, left)


@flash_varlen_backward.register_fake
def _(grad, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, left=-1):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _flash_varlen_setup(ctx, inputs, output) -> None:
    q, k, v, cu_q, cu_k, max_q, max_k, scale, left = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], cu_q, cu_k)
    ctx.max_q, ctx.max_k, ctx.scale, ctx.left = max_q, max_k, scale, left


def _flash_varlen_grad(ctx, grad, grad_lse):
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    dq, dk, dv = flash_varlen_backward(grad, q, k, v, out, lse, cu_q, cu_k, ctx.max_q, ctx.max_k, ctx.scale,
                                       ctx.left)
    return dq, dk, dv, None, None, None, None, None, None


flash_varlen.register_autograd(_flash_varlen_grad, setup_context=_flash_varlen_setup)


def equal_documents(tokens_q: int, tokens_k: int, cu_q: torch.Tensor, cu_k: torch.Tensor, max_q, max_k) -> int | None:
    """How many documents a packed row holds when they all have one length, else None — from shapes and the
    collator's ints only (no look at cu_seqlens' values, which live on the GPU): n documents none longer than
    max_q that add up to n * max_q tokens are all max_q long."""
    n = cu_q.shape[0] - 1
    if not (isinstance(max_q, int) and isinstance(max_k, int)) or n < 1 or cu_k.shape[0] - 1 != n:
        return None
    return n if max_q * n == tokens_q and max_k * n == tokens_k else None


def _dense_attention(q, k, v, n: int, scaling):
    """q (tokens, heads, dim), k/v (tokens, kv_heads, dim) holding n documents of tokens / n each: causal
    attention within each, as one (n, heads, tokens / n, dim) batch. cuDNN's kernel on CUDA; on the CPU the
    same reshaping runs SDPA's default kernel (the twin the tests use)."""
    tokens, heads, dim = q.shape

    def rows(t):
        return t.view(n, tokens // n, t.shape[1], dim).transpose(1, 2)

    context = contextlib.nullcontext()
    if q.is_cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        context = sdpa_kernel(SDPBackend.CUDNN_ATTENTION)
    with context:
        out = F.scaled_dot_product_attention(rows(q), rows(k), rows(v), is_causal=True, scale=scaling,
                                             enable_gqa=k.shape[1] != heads)
    return out.transpose(1, 2).reshape(tokens, heads, dim)


def qflash_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # (batch, heads, seq, head_dim)
    key: torch.Tensor,  # (batch, kv_heads, seq_k, head_dim)
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    *,
    choice: Choice,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Returns (batch, seq, heads, head_dim) like every transformers attention function; `choice`: the model's
    (bound by register())."""
    backend = choice.backend
    cu_q = kwargs.get("cu_seq_lens_q")
    if cu_q is not None and kwargs.get("use_cache"):
        raise PackingError("a packed batch was run with use_cache=True; pass use_cache=False when training on packed data")
    if choice.varlen and cu_q is not None:
        if query.shape[0] != 1:
            raise PackingError("varlen attention expects a packed batch of one row")
        window = kwargs.get("sliding_window")
        window = window if window is not None and kwargs["max_length_q"] > window else None  # None: no one reaches it
        # FlashAttention kernels take fp16/bf16 only; fp32 q/k/v appear when norms or RoPE run in fp32.
        kernel_dtype = query.dtype if query.dtype in (torch.float16, torch.bfloat16) else (
            torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else torch.bfloat16)
        q = query[0].transpose(0, 1).to(kernel_dtype)  # (tokens, heads, head_dim)
        k = key[0].transpose(0, 1).to(kernel_dtype)
        v = value[0].transpose(0, 1).to(kernel_dtype)
        cu_k, max_q, max_k = kwargs["cu_seq_lens_k"], kwargs["max_length_q"], kwargs["max_length_k"]
        dense = choice.equal_dense_max
        # the dense path runs plain causal attention: not for documents longer than a window
        n = equal_documents(q.shape[0], k.shape[0], cu_q, cu_k, max_q, max_k) if dense and not dropout and \
            window is None else None
        if n is not None and max_q <= dense:  # n: max_q is an int
            out = _dense_attention(q, k, v, n, scaling)
        else:
            out = _KERNELS[backend](q, k, v, cu_q, cu_k, max_q, max_k, scaling, dropout, window=window)
        return out.unsqueeze(0).to(query.dtype), None
    if attention_mask is NO_MASK:
        raise PackingError(f"a packed varlen batch (cu_seqlens) reached attention.backend={backend}, which cannot read "
                           "it; build the batches for the model's attention (attention.choice_of(model).varlen)")
    position_ids = kwargs.get("position_ids")
    if attention_mask is None and position_ids is not None and query.shape[2] > 1 and _restarts(position_ids):
        # The mask builder skipped packing detection (it does when a KV cache is passed): every
        # document would see the ones before it. Stock transformers trains on that silently.
        raise PackingError("position_ids restart inside a row but no block-diagonal mask was built; "
                           "run packed batches with use_cache=False")
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    # eager: the reference function of the model's own modeling file (every architecture ships one)
    fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward") if backend == "eager" else sdpa_attention_forward
    kwargs = {k: v for k, v in kwargs.items() if not k.startswith(("cu_seq_lens", "max_length"))}
    return fn(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
