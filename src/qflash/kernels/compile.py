"""torch.compile of the decoder layers (kernels.compile_layers, CUDA only, experimental).

Inductor fuses what sits between the matmuls — residual adds, RoPE, SwiGLU, casts — into a few
Triton kernels. The layers share one compiled graph (parameters are graph inputs), and token
counts are dynamic so packed batches of any length reuse it.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


def compile_decoder_layers(model: torch.nn.Module) -> int:
    from qflash.model.activation_offload import OffloadedCheckpoint

    n = offloaded = 0
    for module in model.modules():
        if type(module).__name__.endswith("DecoderLayer"):
            module.compile(dynamic=True)
            n += 1
            offloaded += isinstance(getattr(module, "_gradient_checkpointing_func", None), OffloadedCheckpoint)
    log.info("kernels.compile_layers: %d decoder layers compiled with torch.compile", n)
    if offloaded:
        log.warning("kernels.compile_layers: %d layers checkpoint through train.offload_activations, which "
                    "torch.compile does not trace: they run uncompiled in training (set "
                    "train.offload_activations=false to compile them)", offloaded)
    return n
