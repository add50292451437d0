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


# kernels.compile_layers=auto. Compiling costs a fixed time in the first steps (dynamo tracing and Inductor's code
# generation for the layer graph, forward and backward) and saves a part of every later step. Measured on an H100
# (bench/NOTES.md, 2026-12-07 session 12): the demo (SmolLM2-135M, ~900 tokens a step) compiles in ~24 s over the
# first steps and then saves 0.09 s a step (0.24 -> 0.15 s): it pays after ~260 steps. Qwen2.5-7B `fixed` (4 x 2048
# tokens a step) compiles in ~57 s and saves 0.137 s a step (9,898 -> 11,847 tok/s): ~420 steps. From the larger.
PAYS_FROM_STEPS = 420
"""Planned optimizer steps from which compiling the decoder layers pays back its compile time."""


def compile_pays(setting, planned_steps: int) -> tuple[bool, str]:
    """(compile?, why) for kernels.compile_layers = `setting` (True, False or "auto") and a run of `planned_steps`."""
    if setting is not True and setting is not False and setting != "auto":
        raise ValueError(f"kernels.compile_layers={setting!r}: expected true, false or auto")
    if setting != "auto":
        return bool(setting), f"kernels.compile_layers={str(setting).lower()}"
    if planned_steps >= PAYS_FROM_STEPS:
        return True, f"kernels.compile_layers=auto: compiling the decoder layers ({planned_steps} steps planned)"
    return False, (f"kernels.compile_layers=auto: not compiling the decoder layers: {planned_steps} steps are too few "
                   f"to pay back the compile time (it pays from about {PAYS_FROM_STEPS}); kernels.compile_layers=true "
                   "compiles anyway")
