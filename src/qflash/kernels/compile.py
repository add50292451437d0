"""torch.compile of the decoder layers (kernels.compile_layers, CUDA only).

Inductor fuses what sits between the matmuls — residual adds, RoPE, SwiGLU, casts — into a few
Triton kernels. The layers share one compiled graph (parameters are graph inputs), and token
counts are dynamic so packed batches of any length reuse it.

What gets compiled is the layer body that activation checkpointing runs (in the forward and again in the
recompute), wherever transformers puts the checkpoint:
  up to 5.17   GradientCheckpointingLayer.__call__ hands the checkpoint function `Module.__call__` with the
               keyword arguments bound: compiling the module (its `_call_impl`) compiles the body.
  later        each layer class's `forward` is wrapped, and the wrapper hands the checkpoint function the
               unwrapped forward. Compiling the module would compile only the wrapper, whose call into the
               checkpoint function (not traceable: streams, RNG state) is a graph break: the body would run
               eagerly, every projection and norm of it. Here the layer's checkpoint function is wrapped
               instead (`CompiledBody`) so that the body it receives runs compiled.
"""

from __future__ import annotations

import functools
import logging

import torch

log = logging.getLogger(__name__)

RECOMPILE_LIMIT = 64


def checkpoint_inside_forward() -> bool:
    """True when transformers checkpoints inside each decoder layer's `forward` (not around `__call__`)."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # pragma: no cover - transformers < 4.52: no checkpointing layers to compile around
        return False
    return "__call__" not in vars(GradientCheckpointingLayer)


class CompiledBody:
    """A decoder layer's checkpoint function that runs the layer body it is handed through torch.compile.

    `fn(body, *args)` as transformers calls it, with `body` a partial of the unwrapped forward (self and the
    keyword arguments bound). One compiled function per forward function (all layers of a class share it: the
    layer is an argument, its parameters graph inputs). Attributes the wrapped function has (the offloaded
    checkpoint's) read through.
    """

    _compiled: dict = {}

    def __init__(self, checkpoint_fn, **compile_kwargs):
        self.checkpoint_fn = checkpoint_fn
        self.compile_kwargs = compile_kwargs

    def __getattr__(self, name):
        if name in ("checkpoint_fn", "compile_kwargs"):  # not set yet (copy, unpickling)
            raise AttributeError(name)
        return getattr(self.checkpoint_fn, name)

    def _compiled_fn(self, fn):
        key = (fn, tuple(sorted(self.compile_kwargs.items())))
        if key not in CompiledBody._compiled:
            CompiledBody._compiled[key] = torch.compile(fn, **self.compile_kwargs)
        return CompiledBody._compiled[key]

    def __call__(self, body, *args):
        if isinstance(body, functools.partial) and not isinstance(body.func, torch.nn.Module):
            body = functools.partial(self._compiled_fn(body.func), *body.args, **body.keywords)
        return self.checkpoint_fn(body, *args)


def compile_decoder_layers(model: torch.nn.Module, **compile_kwargs) -> int:
    """Compile each decoder layer's body. Activation checkpointing (plain or train.offload_activations)
    wraps that body from outside, so the compiled body runs in the forward and in the recompute.
    `compile_kwargs` go to torch.compile (tests pass a CPU backend); dynamic shapes by default."""
    import os

    if os.environ.get("QFLASH_EXPERIMENT_NO_CSE") == "1":  # bench experiment only
        torch._functorch.config.cse = False
    # Every compiled module shares one code object (nn.Module._call_impl), so its cache holds the variants
    # of every layer of every model in the process: forward without grad (offloaded checkpoint) and
    # recompute with it, a first layer whose input needs no grad, train and eval, static then dynamic
    # shapes. Past torch's default of 8, further variants silently run eagerly — and a layer whose forward
    # ran compiled but whose recompute ran eagerly draws other LoRA-dropout masks in the recompute: wrong
    # gradients (tests/gpu/test_gpu.py caught it with two models in one process).
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    compile_kwargs.setdefault("dynamic", True)
    inside = checkpoint_inside_forward()
    n = 0
    for module in model.modules():
        if not type(module).__name__.endswith("DecoderLayer"):
            continue
        checkpointed = getattr(module, "gradient_checkpointing", False)
        if inside and checkpointed:
            if not isinstance(module._gradient_checkpointing_func, CompiledBody):
                module._gradient_checkpointing_func = CompiledBody(module._gradient_checkpointing_func,
                                                                   **compile_kwargs)
        else:
            module.compile(**compile_kwargs)
        n += 1
    log.info("kernels.compile_layers: %d decoder layers compiled with torch.compile", n)
    return n


# kernels.compile_layers=auto. Compiling costs a roughly fixed time in the first steps (tracing and Inductor's
# codegen of one layer graph, forward and recompute/backward; about the same for 135M and 7B parameters) and
# saves a fraction of every later step, whose time grows with tokens x parameters. So it pays from a fixed
# amount of work: planned training tokens x decoder parameters. Measured on an H100 (bench/NOTES.md,
# 2026-12-07 session 12): see PAYS_FROM.
PAYS_FROM = 2.5e16
"""Planned tokens x decoder parameters from which compiling the decoder layers pays back its compile time."""


def decoder_parameters(model: torch.nn.Module) -> int:
    """Weights of the decoder layers (what compile_layers compiles), 4-bit ones counted at their logical size."""
    n = 0
    for module in model.modules():
        if not type(module).__name__.endswith("DecoderLayer"):
            continue
        for p in module.parameters():
            state = getattr(p, "quant_state", None)
            n += int(torch.Size(state.shape).numel()) if state is not None else p.numel()
    return n


def compile_pays(setting, planned_tokens: int, params: int) -> tuple[bool, str]:
    """(compile?, why) for kernels.compile_layers = `setting` (True, False or "auto")."""
    if setting is not True and setting is not False and setting != "auto":
        raise ValueError(f"kernels.compile_layers={setting!r}: expected true, false or auto")
    if setting != "auto":
        return bool(setting), f"kernels.compile_layers={str(setting).lower()}"
    work = float(planned_tokens) * float(params)
    if work >= PAYS_FROM:
        return True, (f"kernels.compile_layers=auto: compiling ({planned_tokens:,} planned tokens x "
                      f"{params / 1e6:,.0f}M decoder parameters = {work:.2g} >= {PAYS_FROM:.2g})")
    return False, (f"kernels.compile_layers=auto: not compiling the decoder layers: this run ({planned_tokens:,} "
                   f"planned tokens x {params / 1e6:,.0f}M decoder parameters = {work:.2g}) is too short to pay back "
                   f"the compile time (from {PAYS_FROM:.2g}); kernels.compile_layers=true compiles anyway")
