"""LoRA adapters on a frozen base, through PEFT."""

from __future__ import annotations

from pathlib import Path

import torch

from qflash.config import LoraConfig


def peft_lora_config(cfg: LoraConfig):
    from peft import LoraConfig as PeftLoraConfig

    targets: str | list[str] = cfg.target_modules
    if targets == ["all-linear"]:
        targets = "all-linear"  # PEFT: every nn.Linear / Linear4bit of the blocks, never lm_head
    return PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        use_rslora=cfg.rslora,
        use_dora=cfg.dora,
        bias="none",
        task_type="CAUSAL_LM",
    )


def add_lora(model, cfg: LoraConfig, *, seed: int, fused: bool | None = None, residual_fp32: bool = False):
    """Wrap `model` with fresh LoRA weights initialized from `seed`. PEFT keeps them in fp32 (master weights).

    `fused` (default: lora.fused and not DoRA): the 4-bit layers get qflash's fused forward
    (model/fused_lora.py); parameter names, initialization and the saved adapter are PEFT's either way.
    `residual_fp32` (quant.residual_dtype=fp32 with 16-bit compute): the fused layers that write into the
    residual stream return fp32. What else the fused layers do (lean recompute, traced dequantization, fused
    norms) is switched on by train/levers.py `apply`.
    """
    from peft import get_peft_model

    if fused is None:
        fused = cfg.fused and not cfg.dora
    peft_cfg = peft_lora_config(cfg)
    if fused:
        from qflash.model.fused_lora import register_fused

        register_fused(peft_cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, peft_cfg)
    if fused and residual_fp32:
        from qflash.model.fused_lora import mark_residual_writers

        mark_residual_writers(peft_model)
    return peft_model


def load_adapter(model, adapter_dir: Path, trainable: bool = False):
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)


def lora_state(model) -> dict[str, torch.Tensor]:
    """The trainable (LoRA) tensors by name, detached copies on CPU."""
    return {n: p.detach().to("cpu").clone() for n, p in model.named_parameters() if p.requires_grad}


def layer_paths(model: torch.nn.Module) -> str:
    """Which implementation each kind of layer runs, in one line (the training banner): the adapted projections
    (qflash's fused NF4 + LoRA, or PEFT's own layer), the norms and their dtype, the attention backend, and how
    many layers a Hugging Face Hub kernel replaced (none: qflash loads with use_kernels=False)."""
    from collections import Counter

    from qflash.model import attention

    lora, norms = Counter(), Counter()
    hub = 0
    for module in model.modules():
        name = type(module).__name__
        hub += "_kernel_repo" in module.__dict__
        if hasattr(module, "lora_A") and hasattr(module, "base_layer"):
            lora["fused NF4+LoRA (qflash)" if name == "FusedLoraLinear4bit" else f"{name} (PEFT)"] += 1
        elif name.endswith("Norm") and isinstance(getattr(module, "weight", None), torch.Tensor):
            norms[f"{name} {str(module.weight.dtype).replace('torch.', '')}"] += 1
    parts = [", ".join(f"{n} projections {k}" for k, n in lora.items()) or "no LoRA projections",
             ", ".join(f"{n} {k}" for k, n in norms.items()) or "no norms",
             f"attention {attention.choice_of(model).backend}",
             f"{hub} layers replaced by Hub kernels"]
    return "layers: " + "; ".join(parts)
