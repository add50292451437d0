"""torch.compile of the decoder layers (kernels.compile_layers, CUDA only).

Inductor fuses what sits between the matmuls — residual adds, RoPE, SwiGLU, casts — into a few
Triton kernels. The layers share one compiled graph (parameters are graph inputs), and token
counts are dynamic so packed batches of any length reuse it.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

RECOMPILE_LIMIT = 64


def compile_decoder_layers(model: torch.nn.Module) -> int:
    """Compile each decoder layer's own call. Activation checkpointing (plain or train.offload_activations)
    wraps that call from outside, so the compiled layer runs in the forward and in the recompute."""
    import os

    if os.environ.get("QFLASH_EXPERIMENT_NO_CSE") == "1":  # bench experiment only
        torch._functorch.config.cse = False
    if os.environ.get("QFLASH_EXPERIMENT_NESTED_BREAKS") == "1":  # bench experiment only
        torch._dynamo.config.nested_graph_breaks = True
    # Every compiled module shares one code object (nn.Module._call_impl), so its cache holds the variants
    # of every layer of every model in the process: forward without grad (offloaded checkpoint) and
    # recompute with it, a first layer whose input needs no grad, train and eval, static then dynamic
    # shapes. Past torch's default of 8, further variants silently run eagerly — and a layer whose forward
    # ran compiled but whose recompute ran eagerly draws other LoRA-dropout masks in the recompute: wrong
    # gradients (tests/gpu/test_gpu.py caught it with two models in one process).
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    n = 0
    for module in model.modules():
        if type(module).__name__.endswith("DecoderLayer"):
            module.compile(dynamic=True)
            n += 1
    log.info("kernels.compile_layers: %d decoder layers compiled with torch.compile", n)
    return n
