"""LoRA adapters on a frozen base, through PEFT."""

from __future__ import annotations

from pathlib import Path

import torch

from qflash.config import LoraConfig
from qflash.errors import ModelError


def peft_lora_config(cfg: LoraConfig, model: torch.nn.Module | None = None):
    """PEFT's LoraConfig for `cfg`; `model` (the base about to be wrapped) decides what depends on it: the linear
    layers `all-linear` means on a GPTQ/AWQ base, and whether trained embeddings stay tied to lm_head."""
    from peft import LoraConfig as PeftLoraConfig

    from qflash.model.loading import embeddings_tied, quantization_of

    targets: str | list[str] = cfg.target_modules
    if targets == ["all-linear"]:
        targets = "all-linear"  # PEFT: every nn.Linear / Linear4bit of the blocks, never lm_head
        quant = quantization_of(model) if model is not None else None
        if quant is not None and not quant.bnb_4bit:
            targets = quantized_linear_names(model)  # PEFT's all-linear matches nn.Linear only
    extra = {}
    if cfg.modules_to_save:
        # A table tied to lm_head stays tied when trained: one trained copy, saved under both names.
        extra = {"modules_to_save": list(cfg.modules_to_save),
                 "ensure_weight_tying": model is not None and embeddings_tied(model)}
    return PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        use_rslora=cfg.rslora,
        use_dora=cfg.dora,
        bias="none",
        task_type="CAUSAL_LM",
        **extra,
    )


def quantized_linear_names(model: torch.nn.Module) -> list[str]:
    """The last names of every linear layer of a GPTQ/AWQ model (gptqmodel's quantized linears, and plain
    nn.Linear ones), lm_head excepted: what `all-linear` means there."""
    head = model.get_output_embeddings()
    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules()
             if m is not head and (isinstance(m, torch.nn.Linear) or "QuantLinear" in type(m).__name__)}
    if not names:
        raise ModelError("lora.target_modules: `all-linear` found no linear layer in this quantized model; "
                         "name the projections, e.g. lora.target_modules=[q_proj,k_proj,v_proj,o_proj]")
    return sorted(names)


def add_lora(model, cfg: LoraConfig, *, seed: int, fused: bool | None = None, residual_fp32: bool = False):
    """Wrap `model` with fresh LoRA weights initialized from `seed`. PEFT keeps them in fp32 (master weights).

    `fused` (default: lora.fused and not DoRA): the 4-bit layers get qflash's fused forward
    (model/fused_lora.py); parameter names, initialization and the saved adapter are PEFT's either way.
    `residual_fp32` (quant.residual_dtype=fp32 with 16-bit compute): the fused layers that write into the
    residual stream return fp32. What else the fused layers do (lean recompute, traced dequantization, fused
    norms) is switched on by train/levers.py `apply`. lora.modules_to_save: those modules are trained whole,
    on fp32 copies (PEFT's modules_to_save; the base keeps its own).
    """
    from peft import get_peft_model

    if fused is None:
        fused = cfg.fused and not cfg.dora
    peft_cfg = peft_lora_config(cfg, model)
    if fused:
        from qflash.model.fused_lora import register_fused

        register_fused(peft_cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, peft_cfg)
    if cfg.modules_to_save:
        _check_modules_to_save(peft_model, cfg.modules_to_save)
        for name, p in peft_model.named_parameters():
            if p.requires_grad and ".modules_to_save." in name and p.dtype != torch.float32:
                p.data = p.data.float()  # master weights, as PEFT keeps LoRA's
    if fused and residual_fp32:
        from qflash.model.fused_lora import mark_residual_writers

        mark_residual_writers(peft_model)
    return peft_model


def _check_modules_to_save(peft_model, names: list[str]) -> None:
    """Every name of lora.modules_to_save trains a module (PEFT skips one that matches nothing, silently)."""
    from peft.utils import ModulesToSaveWrapper

    wrapped = [n for n, m in peft_model.named_modules() if isinstance(m, ModulesToSaveWrapper)]
    lm = peft_model.get_base_model()
    emb, head = lm.get_input_embeddings(), lm.get_output_embeddings()
    here = {m: n for n, m in lm.named_modules()}
    for name in names:
        if not any(w == name or w.endswith("." + name) for w in wrapped):
            raise ModelError(
                f"lora.modules_to_save: '{name}' names no module of this model; its input embedding is "
                f"'{_last(here.get(emb, '?'))}' and its output layer '{_last(here.get(head, '?'))}'")


def _inner(module):
    """The module a PEFT ModulesToSaveWrapper holds (itself when not wrapped)."""
    return getattr(module, "original_module", module)


def _last(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def trained_embeddings_problem(peft_model) -> str | None:
    """Why the rows of tokens added by model.add_tokens would not be trained and saved (None: they are): both the
    input embedding and lm_head must be PEFT modules_to_save wrappers (or tied to one)."""
    from peft.utils import ModulesToSaveWrapper

    lm = peft_model.get_base_model()
    here = {m: n for n, m in lm.named_modules()}
    missing = [_last(here.get(m, "?")) for m in (lm.get_input_embeddings(), lm.get_output_embeddings())
               if m is not None and not isinstance(m, ModulesToSaveWrapper)]
    if not missing:
        return None
    return (f"model.add_tokens: the new tokens' rows would not be trained nor saved: add {', '.join(missing)} to "
            "lora.modules_to_save (the input embedding and the output layer)")


def load_adapter(model, adapter_dir: Path, trainable: bool = False):
    """PEFT's own loading, after the base's embedding grew to the adapter's (model.add_tokens)."""
    from peft import PeftModel

    fit_embeddings_to_adapter(model, adapter_dir)
    return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)


def adapter_embedding_rows(model: torch.nn.Module, adapter_dir: Path) -> int | None:
    """Rows of the input embedding the adapter saved whole (lora.modules_to_save), None when it saved none.
    Read from the safetensors header: no tensor is loaded."""
    import re

    from safetensors import safe_open

    file = Path(adapter_dir) / "adapter_model.safetensors"
    if not file.is_file():
        return None
    emb = _inner(model.get_input_embeddings())
    name = next(n for n, m in model.named_modules() if m is emb) + ".weight"
    with safe_open(str(file), framework="pt") as f:
        for key in f.keys():
            # PEFT's saved name: base_model.model.<module>[.modules_to_save.<adapter>].weight
            plain = re.sub(r"\.modules_to_save(\.[^.]+)?(?=\.weight$)", "", key.removeprefix("base_model.model."))
            if plain == name:
                return int(f.get_slice(key).get_shape()[0])
    return None


def fit_embeddings_to_adapter(model: torch.nn.Module, adapter_dir: Path) -> None:
    """Grow `model`'s embedding (and lm_head) to the rows of the adapter's trained embedding when tokens were added
    in training (model.add_tokens): PEFT then loads it as saved. The grown rows are never used (the adapter's own
    copies replace both tables), so they are left as the resize makes them."""
    rows = adapter_embedding_rows(model, adapter_dir)
    if rows is not None and rows > model.get_input_embeddings().weight.shape[0]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model.resize_token_embeddings(rows, mean_resizing=False)


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
