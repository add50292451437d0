"""Deciding whether and from where a run resumes, and refusing a resume that would mix two runs."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from qflash.errors import ConfigError, QflashError
from qflash.train.checkpoint import find_resumable

# Settings that only say how long or how often: changing them between attempts is a continuation.
RUN_LENGTH_KEYS = {
    "train.max_steps", "train.epochs", "train.save_every", "train.keep", "train.resume", "train.log_every",
    "train.max_bad_steps", "train.eval_every", "output_dir",
}
# ... and settings that change how, not what, is computed (kernels.*: speed switches that keep the math,
# several absent from older checkpoints' configs; a resume may turn them on or off).
RUN_LENGTH_PREFIXES = ("eval.", "attention.", "kernels.")
# Memory switches that keep every value exact (and were absent from older checkpoints' configs).
EXACT_MEMORY_KEYS = {"train.offload_activations", "train.embedding_on_cpu"}


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    flat: dict[str, object] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            flat.update(flatten(v, key + "."))
        else:
            flat[key] = v
    return flat


def run_identity(cfg_dict: dict, fingerprint: dict, lora_shapes: dict[str, list[int]],
                 start_adapter: str | None = None) -> dict:
    """What must be equal for a checkpoint to continue this run. `start_adapter`: the sha256 of model.adapter's
    weights (the config names only its path; the run there may have been trained again since)."""
    config = {
        k: v for k, v in flatten(cfg_dict).items()
        if k not in RUN_LENGTH_KEYS and k not in EXACT_MEMORY_KEYS and not k.startswith(RUN_LENGTH_PREFIXES)
    }
    identity = {
        "config": config,
        "data_fingerprint": fingerprint.get("fingerprint"),
        "tokenizer": fingerprint.get("tokenizer"),
        "lora_shapes": lora_shapes,
    }
    if start_adapter is not None:  # absent without model.adapter: those runs' identities stay as they were
        identity["start_adapter"] = start_adapter
    return identity


def _default_settings() -> dict[str, object]:
    from qflash.config import Config

    return flatten(Config().to_dict())


def differences(saved: dict, current: dict) -> list[str]:
    """What differs between a checkpoint's identity and this run's. A setting the checkpoint does not name (one
    added to qflash after it was written, e.g. data.encoding) is the same run while it is left at its default."""
    diffs = []
    old_cfg, new_cfg = saved.get("config", {}), current["config"]
    defaults = _default_settings()
    for key in sorted(set(old_cfg) | set(new_cfg)):
        if key not in old_cfg and key in defaults and new_cfg.get(key) == defaults[key]:
            continue
        if old_cfg.get(key) != new_cfg.get(key):
            diffs.append(f"{key}: {old_cfg.get(key)!r} -> {new_cfg.get(key)!r}")
    if saved.get("data_fingerprint") != current["data_fingerprint"]:
        diffs.append("the training data changed (data fingerprint differs)")
    if saved.get("tokenizer") != current["tokenizer"]:
        diffs.append("the tokenizer changed")
    if saved.get("lora_shapes") != current["lora_shapes"]:
        diffs.append("the LoRA tensor shapes changed")
    if saved.get("start_adapter") != current.get("start_adapter"):
        diffs.append("model.adapter's weights changed (the adapter there was trained again or replaced)")
    return diffs


def pick_checkpoint(out: Path, resume: str) -> tuple[Path | None, list[str]]:
    """train.resume -> the checkpoint to load (or None) and notes to show."""
    if resume == "never":
        return None, []
    if resume == "auto":
        return find_resumable(out)
    path = Path(resume)
    if not path.is_dir():
        raise ConfigError(f"train.resume: {path}: no such checkpoint directory")
    return path, []


class RunLock:
    """One training process per output_dir: a second one would interleave checkpoints (and --overwrite would
    delete a live run's files). Re-entrant within a process: `train` takes it before building anything,
    run_training takes it again."""

    _held: dict[Path, int] = {}
    """Lock files this process holds -> how many times it entered them."""

    def __init__(self, out: Path):
        self.path = out / ".qflash.lock"
        self._key = self.path.resolve()
        self._fd: int | None = None

    def __enter__(self) -> "RunLock":
        if self._key in RunLock._held:
            RunLock._held[self._key] += 1
            return self
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 32, 0).decode(errors="replace").strip()
            os.close(self._fd)
            self._fd = None
            raise QflashError(f"output_dir: {self.path.parent} is in use by another qflash run (pid {holder or '?'}); "
                              "wait for it to finish, or choose another output_dir") from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, str(os.getpid()).encode(), 0)
        RunLock._held[self._key] = 1
        return self

    def __exit__(self, *exc) -> None:
        RunLock._held[self._key] -= 1
        if RunLock._held[self._key]:
            return
        del RunLock._held[self._key]
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
