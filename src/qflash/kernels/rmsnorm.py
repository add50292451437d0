"""RMSNorm that reads the fp32 residual stream and writes the compute dtype, fused.

transformers' Llama/Qwen2 RMSNorm with an fp32 residual (quant.residual_dtype: fp32) runs five
separate kernels (cast, square, mean, rsqrt-multiply, weight-multiply) and returns fp32, which every
projection then casts to bf16 again (q, k and v each cast the same tensor). `rms_norm` computes the
same values — fp32 statistics, fp32 weight multiply — and rounds once to the dtype the matmuls use.
On CUDA it is compiled (torch.compile -> one Triton kernel forward, one backward); on the CPU the
same function runs eagerly: it is its own pure-PyTorch twin.
"""

from __future__ import annotations

import functools
import logging

import torch

log = logging.getLogger(__name__)

# The norms this replaces: y = w * x / rms(x). Qwen3's per-head q_norm / k_norm are Qwen3RMSNorm too: the
# statistics run over the last dimension, head_dim there, and they hand RoPE the compute dtype (as a Llama q_proj
# does) instead of an fp32 product with an fp32 weight.
PLAIN_RMS_NORMS = ("LlamaRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "MistralRMSNorm", "Qwen2MoeRMSNorm")
# ... and y = (1 + w) * x / rms(x), computed in fp32 as well (Gemma 3's four norms per layer, its q/k norms and the
# final one): the same function with the 1 added to the fp32 weight.
OFFSET_RMS_NORMS = ("Gemma3RMSNorm",)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype, offset: float = 0.0
             ) -> torch.Tensor:
    xf = x.float()
    inv = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return ((weight.float() + offset) * (xf * inv)).to(out_dtype)


@functools.cache
def _compiled():
    return torch.compile(rms_norm, dynamic=True)


class FusedRMSNorm(torch.nn.Module):
    """Drop-in for an RMSNorm module: same `weight` parameter (shared, not copied), same eps; `offset` 1.0 for
    Gemma's (1 + w)."""

    def __init__(self, weight: torch.nn.Parameter, eps: float, compiled: bool, offset: float = 0.0):
        super().__init__()
        self.weight = weight
        self.variance_epsilon = eps
        self.compiled = compiled
        self.offset = offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dev = x.device.type
        out_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        # Inside a compiled decoder layer (kernels.compile_layers) the plain function is traced into it.
        fn = _compiled() if (self.compiled and x.is_cuda and not torch.compiler.is_compiling()) else rms_norm
        return fn(x, self.weight, self.variance_epsilon, out_dtype, self.offset)

    def extra_repr(self) -> str:
        offset = f", offset={self.offset}" if self.offset else ""
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}{offset}, compiled={self.compiled}"


def _weight_offset(norm: torch.nn.Module) -> float | None:
    """0.0 for a plain RMSNorm (w), 1.0 for Gemma's (1 + w), None for a module this does not replace."""
    name = type(norm).__name__
    return 0.0 if name in PLAIN_RMS_NORMS else 1.0 if name in OFFSET_RMS_NORMS else None


def swap_rms_norms(model: torch.nn.Module, compiled: bool) -> int:
    """Replace every known RMSNorm submodule by FusedRMSNorm in place; returns how many were replaced."""
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            offset = _weight_offset(child)
            eps = getattr(child, "variance_epsilon", getattr(child, "eps", None))
            if offset is None or eps is None:
                continue
            setattr(parent, name, FusedRMSNorm(child.weight, float(eps), compiled, offset))
            replaced += 1
    return replaced
