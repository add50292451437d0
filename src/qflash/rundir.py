"""A run directory: what `qflash train` leaves in output_dir and what every other command reads back.

    output_dir/
      adapter/                 the PEFT adapter (adapter_config.json, adapter_model.safetensors), plus
        qflash_config.yaml     the run's full config (RUN_CONFIG)
        data_fingerprint.json  what the data was (FINGERPRINT)
        base_model_dir.txt     where the base model was read from (BASE_MODEL_FILE)
      checkpoints/             train/checkpoint.py
      config.yaml, metrics.jsonl, samples.jsonl, tensorboard/, eval/

Train writes it (save_adapter); infer, eval and export find the adapter and the run's config in it
(find_adapter, is_adapter_path).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from qflash.config import Config, config_from_dict, read_yaml
from qflash.errors import ConfigError
from qflash.once import log_once
from qflash.paths import inside, replaced_atomically

log = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"
RUN_CONFIG = "qflash_config.yaml"
FINGERPRINT = "data_fingerprint.json"
BASE_MODEL_FILE = "base_model_dir.txt"
SAMPLES_LOG = "samples.jsonl"


def save_adapter(model, out: Path, cfg: Config, fingerprint: dict, model_dir: Path, weights: dict | None = None,
                 tokenizer=None) -> Path:
    """Write the PEFT adapter plus run metadata to out/adapter, atomically (temp dir, then rename).

    `weights`: the trainable tensors whole, by parameter name (Parallel.full_trainable), for models
    whose own parameters are sharded (FSDP2); by default the model's. `tokenizer`: saved beside the adapter when
    the run added tokens (model.add_tokens): the base's own tokenizer does not know them.
    """
    final = inside(out, ADAPTER_DIR, "adapter directory")
    if weights is not None:
        weights = _with_shared_names(model, weights)
    with replaced_atomically(final, "adapter") as tmp:
        # Only the trained copies of lora.modules_to_save, not also the base's (resized) tables beside them.
        model.save_pretrained(str(tmp), safe_serialization=True, save_embedding_layers=False,
                              **({"state_dict": weights} if weights is not None else {}))
        if tokenizer is not None and cfg.model.add_tokens:
            tokenizer.save_pretrained(str(tmp))
        (tmp / RUN_CONFIG).write_text(cfg.to_yaml(), encoding="utf-8")
        (tmp / FINGERPRINT).write_text(json.dumps(fingerprint, indent=2, ensure_ascii=False), encoding="utf-8")
        (tmp / BASE_MODEL_FILE).write_text(str(model_dir.resolve()) + "\n", encoding="utf-8")
    return final


def _with_shared_names(model, weights: dict) -> dict:
    """`weights` (by parameter name, each parameter once) with every other name a parameter is known by: a trained
    embedding tied to lm_head (lora.modules_to_save) is one parameter with two names, and PEFT saves both."""
    first = {id(p): n for n, p in model.named_parameters()}
    out = dict(weights)
    for name, p in model.named_parameters(remove_duplicate=False):
        if name not in out and first.get(id(p)) in weights:
            out[name] = weights[first[id(p)]]
    return out


def find_adapter(path: str | Path, trust_remote_code: bool = False) -> tuple[Path, Config | None]:
    """A run directory or an adapter directory -> (adapter dir, the run's config if saved beside it).

    model.trust_remote_code of the returned config is `trust_remote_code` (the command line's), never the saved
    config's: a run directory may come from anyone, and its config must not switch on running the model's code.
    """
    p = Path(path)
    for cand in (p / ADAPTER_DIR, p):
        if (cand / "adapter_config.json").is_file():
            cfg = None
            if (cand / RUN_CONFIG).is_file():
                tree = read_yaml(cand / RUN_CONFIG)
                cfg = config_from_dict(tree, where=str(cand / RUN_CONFIG))
                _distrust_saved_config(cfg, cand / RUN_CONFIG, trust_remote_code)
            return cand, cfg
    if (p / "config.yaml").is_file() and not (p / ADAPTER_DIR).exists():
        raise ConfigError(f"--adapter: {p}: this run has no adapter yet (did training finish?)")
    raise ConfigError(f"--adapter: {p}: no adapter_config.json here or in {p / ADAPTER_DIR}")


def _distrust_saved_config(cfg: Config, where: Path, trust_remote_code: bool) -> None:
    if cfg.model.trust_remote_code and not trust_remote_code:
        log_once(log, f"{where}: model.trust_remote_code: true is ignored (a run directory's saved config never "
                      f"runs a model's own code); pass --trust-remote-code if you trust {cfg.model.path}")
    cfg.model.trust_remote_code = trust_remote_code


def tokenizer_dir(model_dir: Path, adapter_dir: Path | None) -> Path:
    """Where a run's tokenizer is: beside its adapter when training added tokens to it, else the base model's."""
    if adapter_dir is not None and (Path(adapter_dir) / "tokenizer_config.json").is_file():
        return Path(adapter_dir)
    return Path(model_dir)


def is_adapter_path(path: str | Path) -> bool:
    """A run directory (with or without its adapter yet) or an adapter directory."""
    p = Path(path)
    if (p / "adapter_config.json").is_file() or (p / ADAPTER_DIR / "adapter_config.json").is_file():
        return True
    return (p / "config.yaml").is_file() and not (p / "config.json").is_file()


def run_name(adapter_dir: Path) -> str:
    """A short name for a run: its directory's (the adapter directory's own when it stands alone)."""
    p = adapter_dir.resolve()
    return p.parent.name if p.name == ADAPTER_DIR else p.name
