"""A PEFT LoRA adapter read as merge instructions: per adapted module, which tensors and which scale.

The LoRA math comes from adapter_config.json (r, lora_alpha, use_rslora, rank/alpha patterns,
fan_in_fan_out, use_dora) and the tensor names of adapter_model.safetensors:

  base_model.model.<module>.lora_A.weight            (r, in)      \
  base_model.model.<module>.lora_B.weight            (out, r)      } W += scale * B @ A
  base_model.model.<module>.lora_B.bias              (out,)          bias += scale * lora_B.bias (lora_bias)
  base_model.model.<module>.lora_embedding_A         (r, vocab)   \
  base_model.model.<module>.lora_embedding_B         (dim, r)      } E += scale * (B @ A).T
  base_model.model.<module>.lora_magnitude_vector    (out,)          DoRA: W' = m / ||W + dW||_row * (W + dW)
  base_model.model.<name>  (anything else)                          a whole tensor that replaces the base's
                                                                     (modules_to_save, trained biases, saved
                                                                     embedding layers)

Anything else that names a `lora_*` part is a variant this module does not know, and is refused.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from safetensors import SafetensorError, safe_open

from qflash.errors import QflashError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."

# adapter_config.json fields that change what the adapter computes in ways a weight merge cannot
# reproduce (or that qflash merge does not implement): refused when set.
_UNSUPPORTED = {
    "layer_replication": "layer replication changes the architecture",
    "target_parameters": "LoRA on raw parameters (MoE experts) is not handled",
    "trainable_token_indices": "trainable token deltas are not handled",
    "use_qalora": "QA-LoRA is not handled",
    "alora_invocation_tokens": "an activated LoRA only acts after its invocation tokens; merging would make it act everywhere",
    "arrow_config": "Arrow routing is not a weight update",
    "use_bdlora": "BD-LoRA is not handled",
    "kasa_config": "KaSA is not handled",
    "velora_config": "VeLoRA is not handled",
    "monteclora_config": "MonteCLoRA is not handled",
}


class AdapterError(QflashError):
    """An adapter that cannot be merged (unknown format, variant, or tensors)."""


@dataclass
class LoraModule:
    """One adapted module: where its tensors are in the adapter file and how they combine."""

    module: str
    """PEFT's module path without the `base_model.model.` prefix, e.g. model.layers.0.self_attn.q_proj."""
    kind: Literal["linear", "embedding"] = "linear"
    a_key: str = ""
    b_key: str = ""
    bias_key: str | None = None
    magnitude_key: str | None = None
    scale: float = 1.0
    rank: int = 0
    fan_in_fan_out: bool = False


@dataclass
class Adapter:
    dir: Path
    file: Path
    config: dict
    modules: dict[str, LoraModule] = field(default_factory=dict)
    """module path -> its LoRA tensors."""
    replacements: dict[str, str] = field(default_factory=dict)
    """tensor name in the model (e.g. lm_head.weight) -> adapter key of the tensor that replaces it."""
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    """adapter key -> shape."""

    @property
    def dora(self) -> bool:
        return any(m.magnitude_key for m in self.modules.values())

    def read(self, key: str) -> torch.Tensor:
        # A handle per read, like the base model's reads: nothing stays mapped between tensors.
        with safe_open(str(self.file), framework="pt") as f:
            return f.get_tensor(key)


def _load_config(adapter_dir: Path) -> dict:
    path = adapter_dir / ADAPTER_CONFIG
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise AdapterError(f"{path}: not a readable JSON adapter config ({e})") from None
    if not isinstance(cfg, dict):
        raise AdapterError(f"{path}: expected a JSON object")
    kind = cfg.get("peft_type", "LORA")
    if str(kind).upper() != "LORA":
        raise AdapterError(f"{path}: peft_type is {kind}; qflash merge merges LoRA adapters only")
    for key in ("r", "lora_alpha"):
        if not isinstance(cfg.get(key), (int, float)) or cfg[key] <= 0:
            raise AdapterError(f"{path}: {key} must be a positive number, got {cfg.get(key)!r}")
    for key, why in _UNSUPPORTED.items():
        if cfg.get(key):
            raise AdapterError(f"{path}: {key} is set ({cfg[key]!r}): {why}; qflash merge refuses this adapter")
    return cfg


def lora_scale(cfg: dict, module: str) -> tuple[int, float]:
    """(rank, scale) of one module: alpha/r, or alpha/sqrt(r) with rslora; rank/alpha patterns matched as PEFT does."""
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    r, alpha = cfg["r"], cfg["lora_alpha"]
    if rank_pattern or alpha_pattern:
        # PEFT's own matcher, so a pattern means here what it meant in training (imported only when
        # needed: importing peft costs seconds and memory)
        from peft.utils.other import get_pattern_key

        r = rank_pattern.get(get_pattern_key(list(rank_pattern), module), r)
        alpha = alpha_pattern.get(get_pattern_key(list(alpha_pattern), module), alpha)
    return int(r), alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def _model_name(key: str) -> str:
    """A saved whole tensor's name in the model: PEFT prefix and wrapper levels removed.

    base_model.model.lm_head.weight -> lm_head.weight; ...q_proj.base_layer.bias -> ...q_proj.bias;
    ...lm_head.modules_to_save.default.weight -> lm_head.weight.
    """
    parts = (key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key).split(".")
    out: list[str] = []
    i = 0
    while i < len(parts):
        if parts[i] == "base_layer":
            i += 1
        elif parts[i] == "modules_to_save" and i + 1 < len(parts) - 1:
            i += 2  # the wrapper level and the adapter name
        else:
            out.append(parts[i])
            i += 1
    return ".".join(out)


# (part, last name) -> role of the tensor in the LoRA math
_ROLES = {
    ("lora_A", "weight"): "A", ("lora_B", "weight"): "B", ("lora_B", "bias"): "bias",
    ("lora_embedding_A", None): "emb_A", ("lora_embedding_B", None): "emb_B",
    ("lora_magnitude_vector", None): "magnitude", ("lora_magnitude_vector", "weight"): "magnitude",
}


def _classify(key: str, file: Path) -> tuple[str, str] | None:
    """A LoRA tensor key -> (module path, role); None for a whole tensor; AdapterError for an unknown lora_* part."""
    parts = (key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key).split(".")
    at = next((i for i, p in enumerate(parts) if p.startswith("lora_")), None)
    if at is None:
        return None
    rest = parts[at + 1:]  # [], ["weight"], or ["<adapter name>", "weight"] in a live state_dict
    last = rest[-1] if rest and rest[-1] in ("weight", "bias") else None
    role = _ROLES.get((parts[at], last))
    if role is None or at == 0:
        raise AdapterError(f"{file}: tensor '{key}': '{parts[at]}' belongs to a LoRA variant qflash merge does not handle")
    return ".".join(parts[:at]), role


def read_adapter(adapter_dir: Path) -> Adapter:
    """Parse a PEFT LoRA adapter directory into per-module merge instructions. Reads no tensor data."""
    adapter_dir = Path(adapter_dir)
    cfg = _load_config(adapter_dir)
    file = adapter_dir / ADAPTER_WEIGHTS
    if not file.is_file():
        found = sorted(p.name for p in adapter_dir.glob("adapter_model.*"))
        raise AdapterError(f"{adapter_dir}: no {ADAPTER_WEIGHTS}"
                           + (f" (found {', '.join(found)}; only safetensors adapters are merged)" if found else ""))
    adapter = Adapter(adapter_dir, file, cfg)
    try:
        with safe_open(str(file), framework="pt") as f:
            adapter.shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except SafetensorError as e:
        raise AdapterError(f"{file}: not a readable safetensors file ({e})") from None
    fan_in_fan_out = bool(cfg.get("fan_in_fan_out"))
    for key in adapter.shapes:
        found = _classify(key, file)
        if found is None:
            name = _model_name(key)
            if name in adapter.replacements:
                raise AdapterError(f"{file}: two tensors replace '{name}': {adapter.replacements[name]} and {key}")
            adapter.replacements[name] = key
            continue
        module, role = found
        m = adapter.modules.setdefault(module, LoraModule(module, fan_in_fan_out=fan_in_fan_out))
        if role in ("A", "emb_A"):
            m.a_key, m.kind = key, "embedding" if role == "emb_A" else "linear"
        elif role in ("B", "emb_B"):
            m.b_key = key
        elif role == "bias":
            m.bias_key = key
        else:
            m.magnitude_key = key
    for m in adapter.modules.values():
        _finish_module(adapter, m)
    if not adapter.modules and not adapter.replacements:
        raise AdapterError(f"{file}: holds no tensors")
    return adapter


def _finish_module(adapter: Adapter, m: LoraModule) -> None:
    """Check that a module's tensors are complete and consistent, and fill in its rank and scale."""
    where = f"{adapter.file}: module '{m.module}'"
    if not m.a_key or not m.b_key:
        raise AdapterError(f"{where} has lora_{'B' if m.a_key else 'A'} but no lora_{'A' if m.a_key else 'B'}")
    a, b = adapter.shapes[m.a_key], adapter.shapes[m.b_key]
    if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
        raise AdapterError(f"{where}: LoRA factors of shapes {a} and {b} do not multiply (conv LoRA is not handled)")
    m.rank, m.scale = lora_scale(adapter.config, m.module)
    if a[0] != m.rank:
        raise AdapterError(f"{where}: adapter_config.json gives rank {m.rank}, the tensors have rank {a[0]}")
    if m.magnitude_key is not None:
        if m.kind == "embedding" or m.fan_in_fan_out:
            raise AdapterError(f"{where}: DoRA on {'an embedding' if m.kind == 'embedding' else 'a fan_in_fan_out layer'} "
                               "is not handled by qflash merge")
        if adapter.shapes[m.magnitude_key] != (b[0],):
            raise AdapterError(f"{where}: DoRA magnitude has shape {adapter.shapes[m.magnitude_key]}, expected ({b[0]},)")
    if m.bias_key is not None and adapter.shapes[m.bias_key] != (b[0],):
        raise AdapterError(f"{where}: lora_B.bias has shape {adapter.shapes[m.bias_key]}, expected ({b[0]},)")


def delta_shape(m: LoraModule, adapter: Adapter) -> tuple[int, int]:
    """Shape of the module's weight as stored in the base checkpoint."""
    a, b = adapter.shapes[m.a_key], adapter.shapes[m.b_key]
    if m.kind == "embedding":
        return (a[1], b[0])  # (vocab, dim)
    return (a[1], b[0]) if m.fan_in_fan_out else (b[0], a[1])


# Rows of the stored weight updated per matmul: bounds the fp32 working memory (~64 MB) even for a
# 150k x 4k embedding.
_CHUNK_ELEMENTS = 16 * 2**20


@torch.no_grad()
def merged_weight(w: torch.Tensor, m: LoraModule, adapter: Adapter, out_dtype: torch.dtype) -> torch.Tensor:
    """The base weight `w` (as stored) with the module's LoRA (or DoRA) update, computed in fp32, cast to out_dtype.

    The stored weight's rows are updated in blocks: dW[rows] = L[rows] @ R, with
      linear:                 L = B (out, r),      R = A (r, in)
      linear, fan_in_fan_out: L = A.T (in, r),     R = B.T (r, out)   (stored as (in, out), GPT-2 Conv1D)
      embedding:              L = A.T (vocab, r),  R = B.T (r, dim)
    DoRA (linear only) rescales each output row to the trained magnitude: m / ||W + dW||_row.
    """
    a, b = adapter.read(m.a_key).float(), adapter.read(m.b_key).float()
    left, right = (b, a) if (m.kind == "linear" and not m.fan_in_fan_out) else (a.T, b.T)
    left = left * m.scale
    magnitude = adapter.read(m.magnitude_key).float() if m.magnitude_key else None
    out = torch.empty(w.shape, dtype=out_dtype)
    step = max(1, _CHUNK_ELEMENTS // max(1, w.shape[1]))
    for r0 in range(0, w.shape[0], step):
        rows = w[r0:r0 + step].float().addmm_(left[r0:r0 + step], right)  # (rows, cols) fp32
        if magnitude is not None:
            rows *= (magnitude[r0:r0 + step] / torch.linalg.norm(rows, dim=1)).unsqueeze(1)
        out[r0:r0 + step] = rows.to(out_dtype)
    return out


@torch.no_grad()
def merged_bias(bias: torch.Tensor, m: LoraModule, adapter: Adapter, out_dtype: torch.dtype) -> torch.Tensor:
    """bias + scale * lora_B.bias (PEFT's lora_bias), in fp32."""
    return (bias.float() + m.scale * adapter.read(m.bias_key).float()).to(out_dtype)
