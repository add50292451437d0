"""NF4 dequantization (bitsandbytes' format, with or without double quantization) in plain PyTorch ops.

`kernels.traced_dequant`. Inside a compiled decoder layer (kernels.compile_layers) bitsandbytes'
dequantization is two opaque custom ops per weight and pass: the absmax statistics
(dequantize_blockwise) and the 4-bit values (dequantize_4bit), each going through bitsandbytes'
Python dispatch — tens of microseconds of CPU apiece, about 20 per layer and micro-batch, on a step
that is CPU-bound on small models and in the backward. Written as tensor ops, the same computation is
traced into the layer's graph and Inductor makes it one fused kernel: the packed bytes, the 16-entry
code book and the per-block scales in, the 16-bit weight out.

The arithmetic is bitsandbytes': per 64-value block, scale = code2[absmax_q] * absmax2[block / 256]
+ offset (fp32), then value = code[nibble] * scale in fp32, rounded once to the weight's dtype; the
high nibble of each byte comes first. tests/unit/test_nf4.py checks it bit for bit against
bitsandbytes on the CPU, tests/gpu/test_compile.py against its CUDA kernel (eager and compiled).
"""

from __future__ import annotations

import math

import torch


def traceable(quant_state) -> bool:
    """NF4 (FP4 stays with bitsandbytes), with its code book and, when nested, the second-level state."""
    if getattr(quant_state, "quant_type", None) != "nf4" or getattr(quant_state, "code", None) is None:
        return False
    return not quant_state.nested or getattr(quant_state, "state2", None) is not None


def block_scales(quant_state) -> torch.Tensor:
    """The fp32 absmax of every block (double quantization undone)."""
    absmax = quant_state.absmax
    if not quant_state.nested:
        return absmax.float()
    s2 = quant_state.state2
    block2 = torch.arange(absmax.numel(), device=absmax.device) // s2.blocksize
    return s2.code[absmax.long()] * s2.absmax[block2] + quant_state.offset


def dequantize_nf4(packed: torch.Tensor, quant_state) -> torch.Tensor:
    """The weight (quant_state.shape, quant_state.dtype) from its packed NF4 bytes."""
    n = math.prod(quant_state.shape)
    data = packed.reshape(-1)
    if data.dtype != torch.uint8:  # quant_storage other than uint8 (FSDP): the same bytes
        data = data.view(torch.uint8)
    nibbles = torch.stack((data >> 4, data & 15), dim=-1).reshape(-1)[:n]
    block = torch.arange(n, device=data.device) // quant_state.blocksize
    values = quant_state.code[nibbles.long()] * block_scales(quant_state)[block]
    return values.to(quant_state.dtype).reshape(quant_state.shape)
