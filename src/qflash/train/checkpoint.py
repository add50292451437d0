"""Atomic checkpoints and their verification.

A checkpoint is a directory `checkpoints/step-00000040/` holding:
  lora.safetensors      the trainable (LoRA) tensors, by parameter name
  optimizer.pt          optimizer state_dict   (loaded with torch.load(weights_only=True))
  scheduler.pt          LR scheduler state_dict (idem)
  rng.pt                torch CPU and CUDA generator states (idem)
  trainer_state.json    step, data position, python/numpy RNG, bad-step counters, config, fingerprints
  manifest.json         sha256 and size of every file above — written last

It is written into a temporary sibling directory, every file and the directory fsync'd, the
manifest last, and only then renamed into place. A directory without a manifest, or whose files
do not match it, is incomplete and never resumed from.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from qflash.errors import QflashError, StorageError
from qflash.paths import fsync_dir, sha256_file
from qflash.train.faults import Faults

CKPT_DIR = "checkpoints"
MANIFEST = "manifest.json"
STATE = "trainer_state.json"
_NAME = re.compile(r"^step-(\d{8})$")
FORMAT_VERSION = 1


class CheckpointWriteError(StorageError):
    """A checkpoint could not be written (disk full, permissions); the previous one is intact."""


def write_durable(path: Path, data: bytes, faults: Faults | None = None) -> None:
    """Write bytes and fsync them. The one place checkpoint bytes reach the disk (and faults are injected)."""
    if faults is not None:
        faults.before_write(path)
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# RNG state: python and numpy go to JSON, torch generators to rng.pt.

def rng_state_json() -> dict:
    py = random.getstate()
    np_state = np.random.get_state()
    return {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }


def restore_rng(state_json: dict, rng_pt: dict) -> None:
    v, internal, gauss = state_json["python"]
    random.setstate((v, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state_json["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(rng_pt["torch"])
    if torch.cuda.is_available() and rng_pt.get("cuda"):
        _restore_cuda_rng(rng_pt)


def _restore_cuda_rng(rng_pt: dict) -> None:
    """The saving process's own GPU generator into this process's GPU, and no other: a resume may see fewer
    GPUs than the run that saved (the others' states would name devices that do not exist here), and this
    process draws its dropout masks from its current device only."""
    saved = rng_pt["cuda"]
    here = torch.cuda.current_device()
    # Checkpoints from before "cuda_device" was saved: the state of the device of the same index, else the first.
    index = rng_pt.get("cuda_device", here if here < len(saved) else 0)
    torch.cuda.set_rng_state(saved[index], device=here)


def _torch_rng() -> dict:
    on_cuda = torch.cuda.is_available()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if on_cuda else [],
        **({"cuda_device": torch.cuda.current_device()} if on_cuda else {}),
    }


# ---------------------------------------------------------------------------------------------

def checkpoint_dir(out: Path, step: int) -> Path:
    return out / CKPT_DIR / f"step-{step:08d}"


def save_checkpoint(
    out: Path,
    step: int,
    trainable: dict[str, torch.Tensor],
    optimizer_state: dict,
    scheduler: Any,
    state: dict,
    keep: int,
    faults: Faults | None = None,
) -> Path:
    """Write checkpoint `step` atomically, then drop all but the newest `keep` complete ones.

    `trainable` and `optimizer_state` are whole (not sharded): torch AdamW's state_dict layout of a
    single process, whatever strategy and number of processes trained (train/distributed.py).
    """
    root = out / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = checkpoint_dir(out, step)
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    if faults is not None:
        faults.start_save()
    try:
        tmp.mkdir()
        files = {
            "lora.safetensors": st_save({k: v.detach().to("cpu").contiguous() for k, v in trainable.items()}),
            "optimizer.pt": _torch_bytes(optimizer_state),
            "scheduler.pt": _torch_bytes(scheduler.state_dict()),
            "rng.pt": _torch_bytes(_torch_rng()),
            STATE: json.dumps({**state, "rng": rng_state_json(), "format": FORMAT_VERSION}, indent=1).encode(),
        }
        manifest = {"step": step, "files": {}}
        for name, data in files.items():
            write_durable(tmp / name, data, faults)
            manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        write_durable(tmp / MANIFEST, json.dumps(manifest, indent=1).encode(), faults)
        fsync_dir(tmp)
        if final.exists():  # a checkpoint of this step from an earlier attempt: replace it whole
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(root)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        prev = newest_complete(out)
        kept = f"the previous checkpoint {prev} is intact" if prev else "no earlier checkpoint exists"
        raise CheckpointWriteError(
            f"could not write checkpoint {final}: {e.strerror or e}; {kept}. "
            "Free space or fix permissions, then rerun the same command to resume."
        ) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _prune(out, keep, final)
    return final


def _prune(out: Path, keep: int, just_written: Path) -> None:
    """All but the newest `keep` complete checkpoints go; never the one just written (after a rewind the
    newer ones are set aside first: set_aside_newer)."""
    complete = complete_checkpoints(out)
    for _, path in complete[:-keep] if keep > 0 else []:
        if path != just_written:
            shutil.rmtree(path, ignore_errors=True)


ABANDONED = "abandoned-"


def set_aside_newer(out: Path, step: int) -> tuple[Path, list[str]] | None:
    """A rewind (resuming from `step` while checkpoints of later steps exist): those move into
    checkpoints/abandoned-<time>/, where resume never looks and pruning never reaches; (where, their
    names), or None when there are none. Without this, pruning would keep the abandoned later steps and
    delete each new checkpoint as soon as it is written, and a later resume would pick an abandoned one."""
    root = out / CKPT_DIR
    newer = sorted(p for p in root.iterdir() if (m := _NAME.match(p.name)) and int(m.group(1)) > step) \
        if root.is_dir() else []
    if not newer:
        return None
    aside = root / f"{ABANDONED}{time.strftime('%Y%m%d-%H%M%S')}-step-{step:08d}"
    aside.mkdir()
    for p in newer:
        os.replace(p, aside / p.name)
    fsync_dir(aside)
    fsync_dir(root)
    return aside, [p.name for p in newer]


def complete_checkpoints(out: Path) -> list[tuple[int, Path]]:
    """(step, dir) of checkpoints that have a manifest, oldest first (contents not yet verified)."""
    root = out / CKPT_DIR
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and (p / MANIFEST).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def verify(path: Path) -> str | None:
    """None when every file matches the manifest, else the reason it does not."""
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return f"unreadable manifest ({e})"
    for name, meta in manifest.get("files", {}).items():
        f = path / name
        if not f.is_file():
            return f"{name} missing"
        if f.stat().st_size != meta["bytes"] or sha256_file(f) != meta["sha256"]:
            return f"{name} does not match its sha256"
    return None


def newest_complete(out: Path) -> Path | None:
    return find_resumable(out)[0]


def find_resumable(out: Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint whose files verify, and notes on the ones skipped on the way."""
    notes = []
    root = out / CKPT_DIR
    if root.is_dir():
        for p in sorted(root.iterdir()):
            if p.name.startswith(".tmp-"):
                notes.append(f"ignored incomplete checkpoint {p.name} (interrupted write)")
    for _, path in reversed(complete_checkpoints(out)):
        problem = verify(path)
        if problem is None:
            return path, notes
        notes.append(f"ignored damaged checkpoint {path.name}: {problem}")
    return None, notes


def remove_stale_temporaries(out: Path) -> None:
    """Temporary checkpoint directories left by a killed run (the run lock guarantees it is dead)."""
    root = out / CKPT_DIR
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".tmp-"):
                shutil.rmtree(p, ignore_errors=True)


@dataclass
class LoadedCheckpoint:
    step: int
    state: dict
    trainable: dict[str, torch.Tensor]
    optimizer: dict
    scheduler: dict
    rng: dict


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> LoadedCheckpoint:
    problem = verify(path)
    if problem is not None:
        raise QflashError(f"{path}: checkpoint is damaged: {problem}; pass another train.resume or remove it")
    state = json.loads((path / STATE).read_text(encoding="utf-8"))
    trainable = st_load((path / "lora.safetensors").read_bytes())
    # weights_only=True: a checkpoint is data, never code.
    optimizer = torch.load(path / "optimizer.pt", map_location=map_location, weights_only=True)
    scheduler = torch.load(path / "scheduler.pt", map_location="cpu", weights_only=True)
    rng = torch.load(path / "rng.pt", map_location="cpu", weights_only=True)
    return LoadedCheckpoint(int(state["step"]), state, trainable, optimizer, scheduler, rng)

