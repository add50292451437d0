"""LoRA adapters on a frozen base, through PEFT."""

from __future__ import annotations

from pathlib import Path

import torch

from qflash.config import KernelsConfig, LoraConfig


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


def add_lora(model, cfg: LoraConfig, *, seed: int, kernels: KernelsConfig | None = None):
    """Wrap `model` with fresh LoRA weights initialized from `seed`. PEFT keeps them in fp32 (master weights).

    With `cfg.fused` (and not DoRA) the 4-bit layers get qflash's fused forward (model/fused_lora.py);
    parameter names, initialization and the saved adapter are PEFT's either way. With it, and
    `kernels.fused_norm`, the RMSNorms hand the compute dtype straight to the fused layers. (Not
    without: PEFT's 4-bit layer returns its input's dtype, and in bf16 base + update is rounded
    after the base, which drops small updates; with an fp32 input it keeps them in fp32.)
    With `kernels.lean_recompute`, each layer's mlp.down_proj skips its GEMMs in the checkpoint recompute.
    With `kernels.traced_dequant`, compiled layers dequantize NF4 in their own graph (kernels/nf4.py).
    With `kernels.fused_ce`, lm_head is marked for the fused lm_head + cross-entropy (train/loss.py).
    With train.embedding_on_cpu recorded on `model` (CUDA), the frozen input-embedding table moves to
    CPU memory (model/host_embedding.py).
    """
    from peft import get_peft_model

    peft_cfg = peft_lora_config(cfg)
    if cfg.fused and not cfg.dora:
        from qflash.model.fused_lora import register_fused

        register_fused(peft_cfg)
    residual_fp32 = getattr(model, "qflash_residual_fp32", False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, peft_cfg)
    if cfg.fused and not cfg.dora:
        if residual_fp32:
            from qflash.model.fused_lora import mark_residual_writers

            mark_residual_writers(peft_model)
        if kernels is not None and kernels.lean_recompute:
            from qflash.model.fused_lora import mark_lean_tails

            mark_lean_tails(peft_model, in_graph=kernels.lean_tail_in_graph)
        if kernels is not None and kernels.traced_dequant:
            from qflash.model.fused_lora import use_traced_dequant

            use_traced_dequant(peft_model)
        if kernels is not None and kernels.fused_norm:
            from qflash.kernels.rmsnorm import swap_rms_norms

            swap_rms_norms(peft_model, compiled=next(peft_model.parameters()).is_cuda)
    if kernels is not None and kernels.fused_ce:
        from qflash.train.loss import use_fused_ce

        use_fused_ce(peft_model)  # read by loss_sum; after PEFT, which may have wrapped lm_head to train it
    memory = getattr(model, "qflash_memory", None)  # recorded by load_configured_base
    if memory is not None and memory.embedding_on_cpu:
        from qflash.model.host_embedding import keep_input_embedding_on_host

        keep_input_embedding_on_host(peft_model)  # now that PEFT has wrapped what it trains
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
