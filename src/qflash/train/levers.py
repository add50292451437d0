"""Every speed and memory switch of a training run, resolved in one place and applied in one place.

`resolve(cfg, device, dtype, model)` reads the config, the device and the loaded base model once and returns
a frozen `Levers`: each switch's effective value and, when it is off, why (the setting, the device, the model,
or a switch it needs). `apply(model, levers, ...)` then does the wiring in one readable order: activation
checkpointing (offloaded or not), LoRA (fused layers or PEFT's), what the fused layers do (residual writers,
lean recompute, traced dequantization, fused norms), the input embedding on the host, compiled layers. The loss
(`fused_ce`) and CUDA graphs (`cuda_graphs`, decided with the launch's strategy by train/distributed.py) read
their switch from the Levers they are handed. Nothing is recorded on the model; the training banner prints
`Levers.table()`.

Which combinations a user may ask for is checked earlier, in the config layer (config.py `requires`); here
defaults meet the device and the model, and what cannot apply is switched off with its reason.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from qflash.config import Config
from qflash.model import attention


@dataclass(frozen=True)
class Lever:
    on: bool
    why: str = ""
    """When off, why (empty when on by its setting)."""


ON = Lever(True)


def _off(why: str) -> Lever:
    return Lever(False, why)


@dataclass(frozen=True)
class Levers:
    attention: attention.Choice
    residual_fp32: Lever
    """quant.residual_dtype=fp32 with 16-bit compute: embeddings and norms fp32, the fused layers writing into the
    residual return fp32."""
    checkpointing: Lever
    offload_activations: Lever
    keep_attention: Lever
    embedding_on_cpu: Lever
    fused_lora: Lever
    fused_norm: Lever
    lean_recompute: Lever
    lean_tail_in_graph: Lever
    traced_dequant: Lever
    fused_ce: Lever
    compile_layers: Lever
    cuda_graphs: bool | str
    """train.cuda_graphs as set (or False off CUDA); train/distributed.py decides with the strategy."""

    def table(self) -> str:
        """One line per switch, by its config key: on, or off and why."""
        dense = self.attention.equal_dense_max
        rows = [("attention.backend", self.attention.backend
                 + (f" (documents of one length up to {dense} tokens: cuDNN)" if 0 < dense < 1 << 40 else
                    " (documents of one length: cuDNN)" if dense else ""))]
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Lever):
                rows.append((KEYS[f.name], "on" if value.on else f"off: {value.why}"))
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


KEYS = {"residual_fp32": "quant.residual_dtype=fp32", "checkpointing": "train.gradient_checkpointing",
        "offload_activations": "train.offload_activations", "keep_attention": "kernels.keep_attention",
        "embedding_on_cpu": "train.embedding_on_cpu", "fused_lora": "lora.fused", "fused_norm": "kernels.fused_norm",
        "lean_recompute": "kernels.lean_recompute", "lean_tail_in_graph": "kernels.lean_tail_in_graph",
        "traced_dequant": "kernels.traced_dequant", "fused_ce": "kernels.fused_ce",
        "compile_layers": "kernels.compile_layers"}
"""The config key each Lever field stands for (the banner's names)."""


def resolve(cfg: Config, device: torch.device, dtype: torch.dtype, model: torch.nn.Module, *, sharded: bool = False,
            planned_steps: int = 0) -> Levers:
    """The switches of a run of `cfg` on `device` computing in `dtype`, for the loaded base `model` (before LoRA).
    `sharded`: FSDP2 will shard it; `planned_steps`: the run's optimizer steps (kernels.compile_layers=auto)."""
    from qflash.kernels.compile import compile_pays
    from qflash.model.fused_lora import FusedLoraLinear4bit, lean_tail_blocker
    from qflash.model.loading import quantization_of

    k, t = cfg.kernels, cfg.train
    cuda = device.type == "cuda"
    choice = attention.choice_of(model)
    checkpointing = ON if t.gradient_checkpointing else _off("train.gradient_checkpointing=false")
    offload = _need(t.offload_activations, "train.offload_activations=false",
                    (not cuda, "on the CPU"), (not checkpointing.on, "needs train.gradient_checkpointing"),
                    (sharded, "FSDP2 shards the model (its parameter swaps are not followed by the offload)"))
    keep = _need(k.keep_attention, "kernels.keep_attention=false", (not offload.on, "needs train.offload_activations"),
                 (choice.backend != "torch_varlen", f"attention is {choice.backend}, not torch_varlen"))
    quant = quantization_of(model)
    fused = _need(cfg.lora.fused, "lora.fused=false", (cfg.lora.dora, "DoRA runs PEFT's own layer"),
                  (quant is not None and not quant.bnb_4bit,
                   f"the base is a {quant and quant.method.upper()} checkpoint, trained through PEFT's "
                   f"{quant and quant.method.upper()} LoRA layer (the fused layer is bitsandbytes 4-bit's)"),
                  (quant is None, f"the base is not quantized (quant.mode={cfg.quant.mode}): the fused layer is NF4's"),
                  (FusedLoraLinear4bit is None, "bitsandbytes is not installed"))
    compiled, why_not_compiled = compile_pays(k.compile_layers, planned_steps) if cuda else (False, "on the CPU")
    compile_layers = ON if compiled else _off(why_not_compiled.split(": ", 1)[-1])
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    no_tail = lean_tail_blocker(model_type)
    lean = _need(k.lean_recompute, "kernels.lean_recompute=false", (not fused.on, "needs lora.fused"),
                 (not checkpointing.on, "needs train.gradient_checkpointing"), (no_tail is not None, no_tail or ""))
    return Levers(
        attention=choice,
        residual_fp32=_need(cfg.quant.residual_dtype == "fp32", f"quant.residual_dtype={cfg.quant.residual_dtype}",
                            (dtype == torch.float32, "the compute dtype is fp32 already")),
        checkpointing=checkpointing,
        offload_activations=offload,
        keep_attention=keep,
        embedding_on_cpu=_need(t.embedding_on_cpu, "train.embedding_on_cpu=false", (not cuda, "on the CPU")),
        fused_lora=fused,
        fused_norm=_need(k.fused_norm, "kernels.fused_norm=false", (not fused.on, "needs lora.fused")),
        lean_recompute=lean,
        lean_tail_in_graph=_need(k.lean_tail_in_graph, "kernels.lean_tail_in_graph=false",
                                 (not lean.on, "needs kernels.lean_recompute"),
                                 (not compile_layers.on, "needs compiled layers"),
                                 (not offload.on, "needs train.offload_activations")),
        traced_dequant=_need(k.traced_dequant, "kernels.traced_dequant=false", (not fused.on, "needs lora.fused"),
                             (not compile_layers.on, "needs compiled layers")),
        fused_ce=_need(k.fused_ce, "kernels.fused_ce=false",
                       (t.objective != "sft", f"train.objective={t.objective} scores each sequence's tokens (the "
                                              "fused loss sums them); lm_head runs in checkpointed chunks")),
        compile_layers=compile_layers,
        # preference steps run eagerly (steps.py pref_train_step)
        cuda_graphs=t.cuda_graphs if cuda and t.objective == "sft" else False,
    )


def _need(setting: bool, off_setting: str, *blockers: tuple[bool, str]) -> Lever:
    """A switch set to `setting`, off with the first blocker that holds."""
    if not setting:
        return _off(off_setting)
    for blocked, why in blockers:
        if blocked:
            return _off(why)
    return ON


def apply(model: torch.nn.Module, levers: Levers, cfg: Config, *, seed: int) -> tuple[torch.nn.Module, Levers]:
    """Wire `levers` into the loaded base `model`, in order; returns the trainable (PEFT) model and the levers
    as they turned out (a switch the model's modules refuse is off, with the module's reason)."""
    from qflash.model.loading import enable_activation_checkpointing
    from qflash.model.lora import add_lora

    if levers.checkpointing.on:
        enable_activation_checkpointing(model, offload=levers.offload_activations.on,
                                        keep_attention=levers.keep_attention.on)
    model = add_lora(model, cfg.lora, seed=seed, fused=levers.fused_lora.on, residual_fp32=levers.residual_fp32.on)
    if levers.lean_recompute.on:
        from qflash.model.fused_lora import mark_lean_tails

        mark_lean_tails(model, in_graph=levers.lean_tail_in_graph.on)
    if levers.traced_dequant.on:
        from qflash.model.fused_lora import use_traced_dequant

        use_traced_dequant(model)
    if levers.fused_norm.on:
        from qflash.kernels.rmsnorm import swap_rms_norms

        swap_rms_norms(model, compiled=next(model.parameters()).is_cuda)
    if levers.fused_ce.on:
        from qflash.train.loss import fused_ce_blocker

        blocked = fused_ce_blocker(model)  # after PEFT, which may have wrapped lm_head to train it
        if blocked is not None:
            levers = dataclasses.replace(levers, fused_ce=_off(blocked))
    if levers.embedding_on_cpu.on:
        from qflash.model.host_embedding import keep_input_embedding_on_host, why_not_on_host

        blocked = why_not_on_host(model)
        if blocked is None:
            keep_input_embedding_on_host(model, fp32_rows=levers.residual_fp32.on)
        else:
            levers = dataclasses.replace(levers, embedding_on_cpu=_off(blocked))
    if levers.compile_layers.on:
        from qflash.kernels.compile import compile_decoder_layers

        compile_decoder_layers(model)
    return model, levers
