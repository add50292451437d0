"""NF4 base + LoRA in one autograd function: the LoRA update rides in the base GEMM's epilogue.

PEFT's 4-bit LoRA layer runs, per projection and pass: the bnb matmul (dequantize + GEMM, its
output cast back to the input dtype), a defensive clone of that output, lora_A, lora_B, a scaling
multiply and an add — five full passes over a (tokens x out_features) activation besides the GEMM.
Here the same math is

    y = x W^T + b + s * (x A^T) B^T

computed as update = (x A^T) B^T first, then the base GEMM accumulating onto it
(y = x W^T + s * update, cuBLAS epilogue), so base + update is rounded to bf16 once from fp32. Backward is the same shape:
grad_x = g W (+)= s * (g B) A, grad_A = s * (g B)^T x, grad_B = s * g^T (x A^T).

Math unchanged: the same NF4 dequantization (bitsandbytes), GEMMs in the compute dtype with fp32
accumulation; the scale is applied in fp32 inside the epilogue instead of on a bf16 product (one
rounding fewer). Used for plain LoRA with one active adapter; DoRA, several adapters, merged or
disabled adapters go through PEFT's own forward. `lora.fused: false` turns it off.

Lean recompute (`kernels.lean_recompute`): under activation checkpointing a layer's forward runs
twice, and the second run (the recompute, in backward) only has to rebuild what backward reads.
The last projection of a Llama/Mistral/Qwen2/Qwen3 decoder layer (mlp.down_proj) writes its output straight
into the residual add, which backward does not read; so in the recompute that projection saves its
inputs for backward and skips its GEMMs (its output is discarded). Gradients are unchanged; a
quarter of the recompute's GEMM work is gone.
"""

from __future__ import annotations

import contextlib

import torch

try:  # PEFT's 4-bit LoRA layer exists only when bitsandbytes is installed
    from peft.tuners.lora.bnb import Linear4bit as _PeftLinear4bit
except ImportError:  # pragma: no cover - qflash requires bitsandbytes; keep imports of this module safe
    _PeftLinear4bit = None


class _RecomputeState:
    active = False  # True while a checkpointed layer reruns its forward inside backward
    free = False  # ... under a checkpoint that does not compare the tensors saved by the two runs


_RECOMPUTE = _RecomputeState()


@contextlib.contextmanager
def recomputing(free: bool = False):
    """Marks an activation-checkpoint recompute (entered by the checkpoint functions, never in a real forward).
    `free`: the checkpoint does not require the recompute to save what the forward saved (the offloaded
    one backprops through the recompute itself; torch's checks the two match)."""
    before = (_RECOMPUTE.active, _RECOMPUTE.free)
    _RECOMPUTE.active, _RECOMPUTE.free = True, free
    try:
        yield
    finally:
        _RECOMPUTE.active, _RECOMPUTE.free = before


def _skip_now() -> bool:
    """Skip the lean tail's GEMMs in this call: in a recompute, and — traced into a compiled graph, where
    the skip would change what the graph saves — only under a checkpoint that allows that."""
    return _RECOMPUTE.active and (_RECOMPUTE.free or not torch.compiler.is_compiling())


def checkpoint_contexts():
    """`context_fn` for torch.utils.checkpoint: nothing around the forward, `recomputing()` around the recompute."""
    return contextlib.nullcontext(), recomputing()


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with fp32 accumulation and an fp32 result (16-bit inputs on CUDA: one GEMM, no casts).

    Products of 16-bit floats are exact in fp32, so the CPU twin (the same GEMM in fp32) differs only
    in summation order."""
    if a.is_cuda and a.dtype in (torch.bfloat16, torch.float16) and b.dtype == a.dtype:
        return torch.mm(a, b, out_dtype=torch.float32)
    with torch.autocast(a.device.type, enabled=False):  # autocast would round the fp32 GEMM's result to 16 bits
        return torch.mm(a.float(), b.float())


# The two accumulating GEMMs as opaque ops for torch.compile (kernels.compile_layers): traced, the
# in-place addmm_ becomes an out-of-place addmm whose accumulator is first copied into a new buffer
# (a device-to-device copy of a tokens x features activation per call: 37 ms of a 766 ms Qwen2.5-7B
# step on an H100). Inside an op it stays one in-place cuBLAS call.
def _update_then_base(x: torch.Tensor, w: torch.Tensor, xa: torch.Tensor, b: torch.Tensor,
                      scaling: float) -> torch.Tensor:
    return torch.mm(xa, b.t()).addmm_(x, w.t(), beta=scaling)


def _grad_input(g: torch.Tensor, w: torch.Tensor, gb: torch.Tensor, a: torch.Tensor, scaling: float) -> torch.Tensor:
    return torch.mm(g, w).addmm_(gb, a, alpha=scaling)


def _opaque_op(name: str, fn, fake):
    """`fn` as the op qflash::`name`, which torch.compile does not trace into (`fake` gives its output's shape
    and dtype). Eagerly the plain function is called instead: the op's dispatch would only add CPU time."""
    op = torch.library.custom_op(f"qflash::{name}", fn, mutates_args=())
    op.register_fake(fake)
    return op


_update_then_base_op = _opaque_op("update_then_base", _update_then_base,
                                  lambda x, w, xa, b, scaling: x.new_empty((x.shape[0], w.shape[0])))
_grad_input_op = _opaque_op("grad_input", _grad_input,
                            lambda g, w, gb, a, scaling: g.new_empty((g.shape[0], w.shape[1])))


def update_then_base(x: torch.Tensor, w: torch.Tensor, xa: torch.Tensor, b: torch.Tensor, scaling: float):
    """x W^T + s (xa B^T): the update first, the base GEMM accumulating onto it (one rounding)."""
    return (_update_then_base_op if torch.compiler.is_compiling() else _update_then_base)(x, w, xa, b, scaling)


def _update_then_base_fp32(x: torch.Tensor, w: torch.Tensor, xa: torch.Tensor, b: torch.Tensor,
                           scaling: float) -> torch.Tensor:
    """fp32 (x W^T + s xa B^T) from 16-bit operands: the update's GEMM writes fp32, then the base GEMM adds
    its fp32 accumulator onto it in the epilogue (cuBLAS addmm with out_dtype; no separate add pass over a
    tokens x features fp32 tensor). The CPU twin: the same sums from fp32 copies (exact products)."""
    y = _mm_fp32(xa, b.t())
    if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and w.dtype == x.dtype:
        return torch.addmm(y, x, w.t(), beta=scaling, out_dtype=torch.float32, out=y)
    with torch.autocast(x.device.type, enabled=False):
        return y.mul_(scaling).addmm_(x.float(), w.float().t())


_update_then_base_fp32_op = _opaque_op(
    "update_then_base_fp32", _update_then_base_fp32,
    lambda x, w, xa, b, scaling: x.new_empty((x.shape[0], w.shape[0]), dtype=torch.float32))


def update_then_base_fp32(x: torch.Tensor, w: torch.Tensor, xa: torch.Tensor, b: torch.Tensor, scaling: float):
    """fp32 x W^T + s (xa B^T), for projections that write into an fp32 residual stream."""
    return (_update_then_base_fp32_op if torch.compiler.is_compiling() else _update_then_base_fp32)(x, w, xa, b,
                                                                                                    scaling)


def grad_input(g: torch.Tensor, w: torch.Tensor, gb: torch.Tensor, a: torch.Tensor, scaling: float):
    """g W + s (g B) A."""
    return (_grad_input_op if torch.compiler.is_compiling() else _grad_input)(g, w, gb, a, scaling)


def _dequantize(weight: torch.Tensor, quant_state, traced: bool = False) -> torch.Tensor:
    """(out_features, in_features) in quant_state.dtype. `traced` (kernels.traced_dequant): inside a compiled
    graph, as tensor ops that Inductor fuses into one kernel (kernels/nf4.py; the same values)."""
    if traced and torch.compiler.is_compiling():
        from qflash.kernels.nf4 import dequantize_nf4, traceable

        if traceable(quant_state):
            return dequantize_nf4(weight, quant_state)
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(weight, quant_state)


class NF4LoraLinear(torch.autograd.Function):
    """y = x W^T + bias + s (x_lora A^T) B^T with W stored as NF4; gradients for x, x_lora, A and B."""

    @staticmethod
    def forward(ctx, x, x_lora, weight, quant_state, bias, lora_a, lora_b, scaling, compute_dtype, fp32_out,
                skip_output=False, traced_dequant=False):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(compute_dtype)  # (tokens, in)
        same_input = x_lora is None
        xl = x2 if same_input else x_lora.reshape(-1, shape[-1]).to(compute_dtype)
        a, b = lora_a.to(compute_dtype), lora_b.to(compute_dtype)  # (r, in), (out, r)
        xa = xl @ a.t()  # (tokens, r)
        out_features = lora_b.shape[0]
        if skip_output:
            # Lean recompute: backward needs only what is saved below; the output is discarded.
            y = x2.new_empty((x2.shape[0], out_features), dtype=torch.float32 if fp32_out else compute_dtype)
        elif fp32_out:
            # This projection writes into the fp32 residual stream: base + update summed and kept in
            # fp32 (16-bit GEMMs with fp32 accumulation and output: no fp32 GEMM, no cast passes).
            w = _dequantize(weight, quant_state, traced_dequant).to(compute_dtype)
            y = update_then_base_fp32(x2, w, xa, b, scaling)
            if bias is not None:
                y.add_(bias.float())
        else:
            w = _dequantize(weight, quant_state, traced_dequant).to(compute_dtype)
            # The update first, then the base GEMM accumulates onto it (beta = scaling): base + update
            # is rounded once from the fp32 accumulator. Adding a small update to an already rounded
            # base would round it straight back to the base value and lose it (bf16 has 8 bits).
            y = update_then_base(x2, w, xa, b, scaling)  # (tokens, out)
            if bias is not None:
                y.add_(bias.to(compute_dtype))
        ctx.save_for_backward(x2 if same_input else xl, xa, weight, lora_a, lora_b)
        ctx.quant_state, ctx.scaling, ctx.compute_dtype = quant_state, scaling, compute_dtype
        ctx.traced_dequant = traced_dequant
        ctx.same_input, ctx.x_dtype, ctx.shape = same_input, x.dtype, shape
        ctx.xl_dtype = None if same_input else x_lora.dtype
        return y.reshape(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        xl, xa, weight, lora_a, lora_b = ctx.saved_tensors
        cdt, s = ctx.compute_dtype, ctx.scaling
        g = grad_out.reshape(-1, grad_out.shape[-1]).to(cdt)  # (tokens, out)
        a, b = lora_a.to(cdt), lora_b.to(cdt)
        gb = g @ b  # (tokens, r)
        grad_x = grad_xl = None
        if ctx.needs_input_grad[0]:
            w = _dequantize(weight, ctx.quant_state, ctx.traced_dequant).to(cdt)
            grad_x = grad_input(g, w, gb, a, s) if ctx.same_input else g @ w  # (tokens, in)
            grad_x = grad_x.reshape(ctx.shape).to(ctx.x_dtype)
        if not ctx.same_input and ctx.needs_input_grad[1]:
            grad_xl = (torch.mm(gb, a) * s).reshape(ctx.shape).to(ctx.xl_dtype)
        # Like autocast would: GEMMs in the compute dtype, the result cast to the fp32 master weights.
        grad_a = torch.mm(gb.t(), xl).mul_(s).to(lora_a.dtype) if ctx.needs_input_grad[5] else None
        grad_b = torch.mm(g.t(), xa).mul_(s).to(lora_b.dtype) if ctx.needs_input_grad[6] else None
        return grad_x, grad_xl, None, None, None, grad_a, grad_b, None, None, None, None, None


def _quant_state(base: torch.nn.Module):
    """The NF4 quantization state of a bnb Linear4bit. FSDP2 swaps the weight for a plain tensor
    (sharded between forwards, all-gathered during them), which loses the Params4bit's quant_state;
    bitsandbytes keeps a copy on the module."""
    qs = getattr(base.weight, "quant_state", None)
    return qs if qs is not None else base.quant_state


if _PeftLinear4bit is not None:

    class FusedLoraLinear4bit(_PeftLinear4bit):
        """PEFT's 4-bit LoRA layer (same parameters, names and state dict) with a fused training forward."""

        fp32_out = False  # set by mark_residual_writers on projections that feed an fp32 residual stream
        lean_tail = False  # set by mark_lean_tails: output only feeds the residual add (skipped in recompute)
        lean_in_graph = False  # ... under a checkpoint whose recompute may save other tensors than the forward
        traced_dequant = False  # kernels.traced_dequant: NF4 dequantization traced into compiled graphs

        def _fusable(self, args, kwargs) -> bool:
            if args or kwargs or self.disable_adapters or self.merged:
                return False
            active = [a for a in self.active_adapters if a in self.lora_A]
            return len(active) == 1 and active[0] not in self.lora_variant

        def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            if self.lean_tail and torch.compiler.is_compiling() and not self.lean_in_graph:
                return self._eager_forward(x, *args, **kwargs)
            return self._forward(x, *args, **kwargs)

        @torch.compiler.disable
        def _eager_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            """A lean tail inside a compiled layer under torch's checkpoint runs eagerly (a graph break): the
            compiled part is then the same graph in the forward and in the recompute, which saves the same
            tensors in both (as torch's checkpoint requires), and the skip is decided here, per call. Under the
            offloaded checkpoint with kernels.lean_tail_in_graph (`lean_in_graph`) the skip is traced into the
            recompute's graph instead."""
            return self._forward(x, *args, **kwargs)

        def _forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            if not self._fusable(args, kwargs):
                return super().forward(x, *args, **kwargs)
            name = next(a for a in self.active_adapters if a in self.lora_A)
            base = self.base_layer
            dropout = self.lora_dropout[name]
            x_lora = None if isinstance(dropout, torch.nn.Identity) else dropout(x)
            if torch.is_autocast_enabled(x.device.type):
                compute_dtype = torch.get_autocast_dtype(x.device.type)
            else:
                compute_dtype = base.compute_dtype or x.dtype
            return NF4LoraLinear.apply(
                x, x_lora, base.weight, _quant_state(base), base.bias,
                self.lora_A[name].weight, self.lora_B[name].weight, float(self.scaling[name]), compute_dtype,
                self.fp32_out and compute_dtype != torch.float32, self.lean_tail and _skip_now(),
                self.traced_dequant,
            )

else:  # pragma: no cover
    FusedLoraLinear4bit = None


# The last projection of each attention / MLP block: its output is added to the residual stream.
RESIDUAL_WRITERS = ("o_proj", "down_proj", "out_proj", "dense_4h_to_h", "c_proj", "w2", "fc2")


def mark_residual_writers(model: torch.nn.Module) -> int:
    """With an fp32 residual stream, the fused layers that write into it return fp32 (base + update)."""
    import os

    every = os.environ.get("QFLASH_EXPERIMENT_FP32_OUT") == "all"  # bench experiment only
    n = 0
    for name, module in model.named_modules():
        if FusedLoraLinear4bit is not None and isinstance(module, FusedLoraLinear4bit):
            if every or name.rsplit(".", 1)[-1] in RESIDUAL_WRITERS:
                module.fp32_out = True
                n += 1
    return n


# Decoder layers whose mlp.down_proj output goes straight into the residual add (no norm after it,
# unlike Gemma 2/3's post-feedforward norm): the recompute may skip that projection's GEMMs.
LEAN_TAIL_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
NO_LEAN_TAIL = {"gemma3_text": "Gemma 3's post-feedforward norm reads mlp.down_proj's output in backward, so the "
                               "recompute cannot skip it"}
"""Model types whose down_proj output backward needs, with why (the other unlisted types: not checked)."""


def lean_tail_blocker(model_type: str | None) -> str | None:
    """Why kernels.lean_recompute cannot mark `model_type`'s down_proj (None: it can)."""
    if model_type in LEAN_TAIL_MODEL_TYPES:
        return None
    return NO_LEAN_TAIL.get(model_type, f"model type {model_type} (only {', '.join(LEAN_TAIL_MODEL_TYPES)})")


def mark_lean_tails(model: torch.nn.Module, in_graph: bool = False) -> int:
    """kernels.lean_recompute: mark each decoder layer's mlp.down_proj (fused layers, listed model types).
    Compiled, the skip happens in an eager tail (a graph break per layer and pass). `in_graph`
    (kernels.lean_tail_in_graph) traces it into the recompute's graph instead, where the checkpoint
    backpropagates through its own recompute (the offloaded one: `recompute_is_free`); torch's checkpoint
    requires the recompute to save what the forward saved, so there the tail stays eager."""
    config = getattr(model, "config", None)
    if FusedLoraLinear4bit is None or lean_tail_blocker(getattr(config, "model_type", None)) is not None:
        return 0
    n = 0
    for name, module in model.named_modules():
        if isinstance(module, FusedLoraLinear4bit) and name.endswith("mlp.down_proj"):
            module.lean_tail = True
            layer = model.get_submodule(name[: -len(".mlp.down_proj")]) if "." in name else None
            checkpoint = getattr(layer, "_gradient_checkpointing_func", None)
            module.lean_in_graph = in_graph and bool(getattr(checkpoint, "recompute_is_free", False))
            n += 1
    return n


def use_traced_dequant(model: torch.nn.Module, on: bool = True) -> int:
    """kernels.traced_dequant: the fused layers dequantize NF4 with tensor ops when traced (kernels/nf4.py)."""
    n = 0
    for module in model.modules():
        if FusedLoraLinear4bit is not None and isinstance(module, FusedLoraLinear4bit):
            module.traced_dequant = on
            n += 1
    return n


def register_fused(peft_config) -> bool:
    """Have PEFT build FusedLoraLinear4bit for every bitsandbytes 4-bit linear it adapts."""
    if FusedLoraLinear4bit is None:
        return False
    import bitsandbytes as bnb

    peft_config._register_custom_module({bnb.nn.Linear4bit: FusedLoraLinear4bit})
    return True
