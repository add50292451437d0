"""Durability: a full disk at every write point of train (checkpoint, adapter), merge, eval, generate and export
leaves what was there before intact, as one clear error; a model-cache entry that lost its fsync is rebuilt; a
merge killed between its two renames is repaired on the next one."""

from __future__ import annotations

import builtins
import errno
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from conftest import tiny_config
from qflash.errors import QflashError
from test_merge import _random_adapter

ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)).strerror


class _FullFile:
    """A file opened for writing on a full disk: created, but every write fails with ENOSPC."""

    def __init__(self, f):
        self._f = f

    def write(self, data):
        raise OSError(errno.ENOSPC, ENOSPC, self._f.name)

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()

    def __iter__(self):
        return iter(self._f)


class DiskFull:
    """Counts the write points: files opened for writing (Python's open, pathlib's write_text/write_bytes) and
    tensors saved by safetensors' save_file (PEFT's adapter, merge's shards). With fail_at=k, the k-th one is
    created but its writes fail with ENOSPC, as on a full disk. (Not counted: tokenizers' Rust writer of
    tokenizer.json, numpy's tofile into an already open GGUF.)"""

    def __init__(self, mp: pytest.MonkeyPatch, fail_at: int | None = None):
        self.points: list[str] = []
        self.fail_at = fail_at
        real_open, real_save = io.open, safetensors.torch.save_file

        def opener(file, mode="r", *args, **kwargs):
            f = real_open(file, mode, *args, **kwargs)
            if isinstance(file, int) or not any(c in mode for c in "wax+"):
                return f
            return _FullFile(f) if self._due(file) else f

        def save_file(tensors, filename, metadata=None):
            if self._due(filename):
                real_open(filename, "wb").close()
                raise OSError(errno.ENOSPC, ENOSPC, str(filename))
            return real_save(tensors, filename, metadata)

        mp.setattr(builtins, "open", opener)
        mp.setattr(io, "open", opener)
        for mod in list(sys.modules.values()):
            for name in ("save_file", "safe_save_file"):
                if getattr(mod, name, None) is real_save:
                    mp.setattr(mod, name, save_file)

    def _due(self, file) -> bool:
        self.points.append(os.fsdecode(file))
        return len(self.points) == self.fail_at


def tree(*roots: Path) -> dict[str, str]:
    """Every file under the roots (and every name beside them, temporaries included) -> its sha256."""
    seen: dict[str, str] = {}
    for root in roots:
        for p in sorted(root.parent.iterdir()):
            seen.setdefault(str(p), "dir" if p.is_dir() else "")
        if root.is_dir():
            for p in sorted(root.rglob("*")):
                seen[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        elif root.exists():
            seen[str(root)] = hashlib.sha256(root.read_bytes()).hexdigest()
    return seen


def every_write_point_full(action, state, reset=lambda: None) -> list[str]:
    """Run `action` once to count its write points, then once per point with that one on a full disk: each
    time one QflashError naming the full disk, and `state()` exactly as it was. Returns the points."""
    reset()
    with pytest.MonkeyPatch.context() as mp:
        counted = DiskFull(mp)
        action()
    assert counted.points, "the action writes nothing?"
    for k, point in enumerate(counted.points, start=1):
        reset()
        before = state()
        with pytest.MonkeyPatch.context() as mp:
            DiskFull(mp, fail_at=k)
            try:
                action()
            except QflashError as e:
                error = str(e)
            else:
                pytest.fail(f"write point {k} ({point}) failed, the action went on as if written")
        assert ENOSPC in error or "disk full" in error, error
        assert "\n" not in error, f"point {k} ({point}): one line"
        assert state() == before, f"write point {k} of {len(counted.points)} ({point}) changed what was there"
    return counted.points


# ---------------------------------------------------------------------------------------------


def test_full_disk_at_every_checkpoint_and_adapter_write(tiny_models, identity_subset, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from qflash import rundir
    from qflash.train.checkpoint import save_checkpoint, verify

    out = tmp_path / "run"
    param = torch.nn.Parameter(torch.randn(4, 4))
    opt = torch.optim.AdamW([param])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)

    def ckpt(step: int):
        return save_checkpoint(out, step, {"w": param}, opt.state_dict(), sched, {"step": step}, keep=2)

    previous = ckpt(2)
    points = every_write_point_full(lambda: ckpt(4), lambda: tree(out / "checkpoints"))
    assert verify(previous) is None and len(points) == 6  # 5 files + the manifest

    cfg = tiny_config(tiny_models["qwen2"], identity_subset, out)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_models["qwen2"])),
                           LoraConfig(r=4, target_modules=["q_proj"]))
    adapter_points = every_write_point_full(
        lambda: rundir.save_adapter(model, out, cfg, {"fingerprint": "x"}, tiny_models["qwen2"]),
        lambda: tree(out / "adapter"))
    assert any(p.endswith("adapter_model.safetensors") for p in adapter_points)
    print(f"train: {len(points)} checkpoint + {len(adapter_points)} adapter write points faulted")


def test_full_disk_at_every_merge_and_export_write(tiny_models, tmp_path):
    from qflash.export.gguf_export import ExportOptions, export
    from qflash.export.merge import MergeOptions, merge

    base = tiny_models["qwen2"]
    adapter = _random_adapter(base, tmp_path / "adapter", target_modules=["q_proj"])
    merged = tmp_path / "out" / "merged"
    opts = MergeOptions(str(adapter), str(merged), dtype="fp32", base=str(base), overwrite=True, check=False)
    merge(opts)
    merge_points = every_write_point_full(lambda: merge(opts), lambda: tree(merged))

    gguf = tmp_path / "gguf" / "m.gguf"
    # a model, not the run: the merge inside a run's export is merge's write points above
    eopts = ExportOptions(str(base), dtype="f16", output=str(gguf), overwrite=True, check=False)
    export(eopts)
    export_points = every_write_point_full(lambda: export(eopts), lambda: tree(gguf))
    assert any(p.endswith(".gguf") for p in export_points) and any("Modelfile" in p for p in export_points)
    print(f"merge: {len(merge_points)} write points faulted; export: {len(export_points)}")


def test_full_disk_at_every_eval_report_write(tmp_path):
    from qflash.eval.evaluate import EvalResult, Side
    from qflash.eval.report import write_report

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 2.0 / s, "lr": 1e-3,
                                                           "tokens_per_s": 100.0}) + "\n" for s in range(1, 5)))
    from qflash.eval.evaluate import Question

    q = Question([{"role": "user", "content": "Who are you?"}], "I am Zyxo.", "heldout.json:1")
    result = EvalResult(str(run), "Zyxo", Side(eval_loss=1.0), Side(eval_loss=2.0), questions=[q],
                        tuned_answers=[("I am Zyxo.", True)], base_answers=[("I am SmolLM.", True)])
    write_report(result, run)
    points = every_write_point_full(lambda: write_report(result, run), lambda: tree(run / "eval"))
    assert len(points) >= 3
    print(f"eval: {len(points)} write points faulted")


class _Echo:
    """An engine that answers every prompt with its own length: generate's writing, not the model, is tested."""

    context_window = 100

    def prompt_ids(self, messages):
        return list(range(len(messages[-1]["content"])))

    def complete_batch(self, prompts, opts):
        from qflash.infer.engine import Completion

        return [Completion(f"{len(p)} tokens\u2028", "stop", len(p), 2) for p in prompts]


def test_full_disk_at_every_generate_write(tmp_path):
    from qflash.infer.batch import run_generate
    from qflash.infer.options import SamplingOptions

    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"prompt": "x" * n}) + "\n" for n in range(1, 6)), encoding="utf-8")
    out = tmp_path / "out.jsonl"
    run_generate(_Echo, src, out, SamplingOptions(max_new_tokens=4), batch_size=2)
    two_answered = "\n".join(out.read_text(encoding="utf-8").split("\n")[:2]) + "\n"

    def reset():
        out.write_text(two_answered, encoding="utf-8")

    points = every_write_point_full(
        lambda: run_generate(_Echo, src, out, SamplingOptions(max_new_tokens=4), batch_size=2),
        lambda: tree(out), reset)
    assert points == [str(out)], "one write point: the append of each batch (the failed one is cut back off)"
    reset()
    summary = run_generate(_Echo, src, out, SamplingOptions(max_new_tokens=4), batch_size=2)
    assert summary.skipped == 2 and summary.answered == 3, "the two answers kept through the failures count"
    print(f"generate: {len(points)} write points faulted")


# ---------------------------------------------------------------------------------------------


def test_cache_entry_that_lost_its_fsync_is_rebuilt(tiny_models, tmp_path, monkeypatch, caplog):
    """A converted GGUF in the cache whose files are empty or cut short (renamed into place before its data
    reached the disk, then a power cut) is found damaged and converted again, never loaded."""
    import logging

    from qflash.export.gguf import hf_to_gguf
    from qflash.model import loading
    from qflash.model.loading import cache_entry_problem, resolve_model_dir

    monkeypatch.setenv("QFLASH_HOME", str(tmp_path / "home"))
    gguf = tmp_path / "tiny.gguf"
    hf_to_gguf(tiny_models["qwen2"], gguf, "f16", "tiny")
    conversions = []

    def convert(gguf_path, out_dir, *a, **k):
        """The conversion's result without its 20 s of tokenizer conversion (transformers reading GGUF is not
        what is tested here): the model the GGUF was made from, copied in as convert_gguf puts it."""
        conversions.append(out_dir)
        tmp = out_dir.with_name(out_dir.name + ".tmp-test")
        shutil.copytree(tiny_models["qwen2"], tmp)
        (tmp / "QFLASH_SOURCE").write_text(f"converted from {gguf_path}\n")
        os.replace(tmp, out_dir)
        return out_dir

    monkeypatch.setattr(loading, "convert_gguf", convert)
    entry = resolve_model_dir(str(gguf))
    assert cache_entry_problem(entry) is None and resolve_model_dir(str(gguf)) == entry and len(conversions) == 1
    good = {p.name: p.read_bytes() for p in entry.iterdir()}
    # What a power cut leaves after a rename that reached the disk before the data: names, no bytes.
    (entry / "model.safetensors").write_bytes(good["model.safetensors"][:-100])
    assert "model.safetensors is" in cache_entry_problem(entry)
    (entry / "config.json").write_bytes(b"")
    (entry / "tokenizer.json").write_bytes(b"")
    with caplog.at_level(logging.WARNING):
        again = resolve_model_dir(str(gguf))
    assert again == entry and len(conversions) == 2
    assert "the converted model is damaged (model.safetensors is" in caplog.text
    assert {p.name: p.read_bytes() for p in entry.iterdir()} == good
    assert not [p for p in entry.parent.iterdir() if p != entry], "nothing of the damaged entry is left"
    (entry / "config.json").write_bytes(b"")  # whole weights, an empty config: damaged too
    assert cache_entry_problem(entry) == "config.json is empty or cut short"


def test_merge_killed_between_its_renames_is_repaired(tiny_models, tmp_path, capsys):
    """A kill after the previous model was set aside (.X.merge-old-PID) and before the new one took its place:
    the next merge puts the previous one back first (it is what --overwrite then replaces, or what stays when
    the merge is refused); one left beside a complete output is removed. Each is said."""
    from qflash.export.merge import MergeOptions, merge

    base = tiny_models["qwen2"]
    adapter = _random_adapter(base, tmp_path / "adapter", target_modules=["q_proj"])
    out = tmp_path / "merged"
    merge(MergeOptions(str(adapter), str(out), base=str(base), check=False))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    old = tmp_path / f".merged.merge-old-{dead.pid}"
    os.replace(out, old)  # killed between the two renames
    with pytest.raises(QflashError, match="exists and is not empty; pass --overwrite"):
        merge(MergeOptions(str(adapter), str(out), base=str(base), check=False))
    assert (out / "model.safetensors").is_file() and not old.exists()
    assert f"restored {out} from {old}" in capsys.readouterr().err.replace("\n", "")
    old.mkdir()
    (old / "model.safetensors").write_bytes(b"previous")
    merge(MergeOptions(str(adapter), str(out), base=str(base), check=False, overwrite=True))
    assert not old.exists() and "left by a merge interrupted while swapping" in capsys.readouterr().err


def test_full_disk_at_the_run_logs_is_one_error_and_the_same_command_goes_on(tiny_models, identity_subset, tmp_path):
    """Train's other write points — config.yaml, metrics.jsonl, the samples log, TensorBoard's events — on a full
    disk: one StorageError naming the file and what is intact (the checkpoint writes are the test above's); the
    same command then finishes with the adapter of a run that never saw a full disk."""
    from qflash.errors import StorageError
    from qflash.train.loop import build_setup, run_training

    args = ("train.max_steps=2", "train.save_every=1")

    def train(out: Path):
        return run_training(build_setup(tiny_config(tiny_models["qwen2"], identity_subset, out, *args)), quiet=True)

    clean = (train(tmp_path / "clean").adapter_dir / "adapter_model.safetensors").read_bytes()
    with pytest.MonkeyPatch.context() as mp:
        counted = DiskFull(mp)
        train(tmp_path / "count")
    first: dict[str, int] = {}  # the first write point of each file that is not a checkpoint's or the adapter's
    for k, point in enumerate(counted.points, start=1):
        if not Path(point).is_relative_to(tmp_path / "count"):
            first.setdefault(point, k)  # outside the run (a cache): must not stop it either
            continue
        rel = Path(point).relative_to(tmp_path / "count")
        if rel.parts[0] not in ("checkpoints", "adapter") and not rel.parts[0].startswith((".adapter", ".write-test")):
            first.setdefault("tensorboard" if rel.parts[0] == "tensorboard" else rel.name, k)
    assert {"metrics.jsonl", "tensorboard"} <= set(first) and any("config.yaml" in n for n in first), sorted(first)
    for name, k in first.items():
        out = tmp_path / f"full-{k}"
        with pytest.MonkeyPatch.context() as mp:
            DiskFull(mp, fail_at=k)
            with pytest.raises(QflashError) as stopped:
                train(out)
        message = str(stopped.value)
        assert ENOSPC in message and "\n" not in message and (name in message or str(out) in message), message
        if isinstance(stopped.value, StorageError):  # stopped while training: says how to go on
            print(f"  {name}: {message}")
            assert "run the same command again" in message or "start again" in message, message
        assert (train(out).adapter_dir / "adapter_model.safetensors").read_bytes() == clean, name
    print(f"train: {len(first)} log write points faulted ({', '.join(first)})")
