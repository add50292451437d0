"""Crash-proof training: kill -9 and resume bitwise, SIGTERM, NaN guard, disk full, refusals, safe loading."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import tiny_config
from qflash.errors import ConfigError
from qflash.train.checkpoint import CheckpointWriteError, find_resumable, verify
from qflash.train.faults import Faults
from qflash.train.loop import TrainingAborted, build_setup, run_training

REPO = Path(__file__).resolve().parents[2]

# 16 samples, 2 per step, 24 steps = 3 epochs: the kills land in epochs 1-3.
RUN = ["train.max_steps=24", "train.micro_batch_size=2", "train.save_every=4", "train.keep=2",
       "lora.dropout=0.1"]  # dropout on: the RNG state must be restored too


def write_config(path: Path, model_dir: Path, data: Path) -> Path:
    cfg = tiny_config(model_dir, data, path.parent / "unused", *RUN)
    tree = cfg.to_dict()
    tree.pop("output_dir")
    path.write_text(yaml.safe_dump(tree), encoding="utf-8")
    return path


def start(config: Path, out: Path, faults: str = "") -> subprocess.Popen:
    env = {**os.environ, "QFLASH_FAULTS": faults, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "qflash.cli", "train", str(config), f"output_dir={out}"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def steps_logged(out: Path) -> int:
    log = out / "samples.jsonl"
    return log.read_text().count("\n") if log.exists() else 0


def sample_log(out: Path) -> list[list[int]]:
    return [json.loads(line)["sample_ids"] for line in (out / "samples.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def config_file(tmp_path_factory, tiny_models, identity_subset) -> Path:
    return write_config(tmp_path_factory.mktemp("cfg") / "tiny.yaml", tiny_models["qwen2"], identity_subset)


@pytest.fixture(scope="module")
def reference(config_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "run"
    p = start(config_file, out)
    log, _ = p.communicate(timeout=300)
    assert p.returncode == 0, log[-3000:]
    return out


def test_sigkill_at_random_moments_resumes_bitwise(config_file, reference, tmp_path):
    out = tmp_path / "run"
    rng = random.Random(20261122)
    kills = 0
    # Five kills at random steps (one of them while a checkpoint is being written), then a clean finish.
    # Targets stay well before the last step so that no attempt can finish before its kill; the
    # in-save kill comes early, while checkpoint writes are still ahead.
    plan: list = sorted(rng.sample(range(1, 19), 4))
    plan.insert(rng.randrange(3), "in-save")
    for target in plan:
        if target == "in-save":
            p = start(config_file, out, faults="save_pause=0.25")
            tmp_dirs = lambda: list((out / "checkpoints").glob(".tmp-step-*")) if (out / "checkpoints").exists() else []  # noqa: E731
            t_end = time.monotonic() + 120
            while not tmp_dirs() and p.poll() is None and time.monotonic() < t_end:
                time.sleep(0.01)
            time.sleep(rng.uniform(0.05, 0.5))
            assert p.poll() is None, "the run ended before a checkpoint write could be interrupted"
            p.send_signal(signal.SIGKILL)
            p.wait()
            assert tmp_dirs(), "killed inside a checkpoint write: its temporary directory is left behind"
        else:
            p = start(config_file, out)
            t_end = time.monotonic() + 120
            while steps_logged(out) < target and p.poll() is None and time.monotonic() < t_end:
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.2))
            assert p.poll() is None, "the run ended before it could be killed"
            p.send_signal(signal.SIGKILL)
            p.wait()
        assert p.returncode == -signal.SIGKILL
        kills += 1
        # A killed run never leaves a checkpoint that resume would pick up half-written.
        ckpt, _ = find_resumable(out)
        assert ckpt is None or verify(ckpt) is None
    assert kills == 5
    p = start(config_file, out)
    log, _ = p.communicate(timeout=300)
    assert p.returncode == 0, log[-3000:]
    assert "resuming from" in log

    ours = (out / "adapter" / "adapter_model.safetensors").read_bytes()
    theirs = (reference / "adapter" / "adapter_model.safetensors").read_bytes()
    assert ours == theirs, "LoRA weights after 5 kills are bitwise equal to the uninterrupted run's"
    assert sample_log(out) == sample_log(reference), "no sample consumed twice, none skipped"
    assert len(sample_log(out)) == 24
    metrics = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics == list(range(1, 25))


def test_sigterm_saves_and_exits_143_then_resumes(config_file, reference, tmp_path):
    out = tmp_path / "run"
    p = start(config_file, out)
    t_end = time.monotonic() + 120
    while steps_logged(out) < 2 and p.poll() is None and time.monotonic() < t_end:
        time.sleep(0.01)
    p.send_signal(signal.SIGTERM)
    log, _ = p.communicate(timeout=120)
    assert p.returncode == 143, log[-2000:]
    m = re.search(r"SIGTERM received: stopped after step (\d+), checkpoint saved to (\S+);", log)
    assert m, log[-2000:]
    step = int(m.group(1))
    assert step < 24 and verify(Path(m.group(2))) is None
    p = start(config_file, out)
    log, _ = p.communicate(timeout=300)
    assert p.returncode == 0, log[-2000:]
    assert f"resuming from {m.group(2)} (step {step}" in log
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == (
        reference / "adapter" / "adapter_model.safetensors").read_bytes()


def _lora(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_non_finite_steps_are_skipped_untouched(tiny_models, identity_subset, tmp_path):
    cfg = tiny_config(tiny_models["qwen2"], identity_subset, tmp_path / "run", "train.max_steps=6")
    setup = build_setup(cfg)
    snapshots: dict[int, dict] = {}
    result = run_training(setup, quiet=True, faults=Faults(nan_steps={3, 4}),
                          on_step=lambda step, v: snapshots.__setitem__(step, _lora(setup.model)))
    logged = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in logged] == [False, False, True, True, False, False]
    for n in snapshots[2]:
        assert torch.equal(snapshots[2][n], snapshots[4][n]), "skipped steps leave the weights as they were"
        assert not torch.equal(snapshots[4][n], snapshots[5][n]), f"{n}: a good step after the skipped ones moves it"
    assert result.steps == 6
    from qflash.train.checkpoint import load_checkpoint

    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "step-00000006")
    adam_steps = {float(s["step"]) for s in ckpt.optimizer["state"].values()}
    assert adam_steps == {4.0}, "the optimizer stepped 4 times, not 6"
    assert ckpt.scheduler["last_epoch"] == 4, "the scheduler did not advance on skipped steps"
    assert ckpt.state["bad_total"] == 2 and ckpt.state["consecutive_bad"] == 0


def test_consecutive_bad_steps_abort_keeping_last_good_checkpoint(tiny_models, identity_subset, tmp_path):
    cfg = tiny_config(tiny_models["qwen2"], identity_subset, tmp_path / "run", "train.max_steps=8",
                      "train.save_every=2", "train.max_bad_steps=3")
    with pytest.raises(TrainingAborted, match=r"3 consecutive steps \(up to step 5\).*Last good checkpoint: .*step-00000002"):
        run_training(build_setup(cfg), quiet=True, faults=Faults(nan_steps={3, 4, 5}))
    ckpt, _ = find_resumable(tmp_path / "run")
    assert ckpt is not None and ckpt.name == "step-00000002" and verify(ckpt) is None


def test_disk_full_during_save_keeps_previous_checkpoint(tiny_models, identity_subset, tmp_path):
    out = tmp_path / "run"
    args = ("train.max_steps=6", "train.save_every=2")
    with pytest.raises(CheckpointWriteError, match=r"No space left on device; the previous checkpoint .*step-00000002 is intact"):
        run_training(build_setup(tiny_config(tiny_models["qwen2"], identity_subset, out, *args)), quiet=True,
                     faults=Faults(enospc_at_save=2))
    assert not list((out / "checkpoints").glob(".tmp-*")), "no partial checkpoint is left behind"
    ckpt, notes = find_resumable(out)
    assert ckpt.name == "step-00000002" and notes == []
    resumed = run_training(build_setup(tiny_config(tiny_models["qwen2"], identity_subset, out, *args)), quiet=True)
    clean = run_training(build_setup(tiny_config(tiny_models["qwen2"], identity_subset, tmp_path / "clean", *args)), quiet=True)
    assert resumed.steps == 6
    assert (resumed.adapter_dir / "adapter_model.safetensors").read_bytes() == (
        clean.adapter_dir / "adapter_model.safetensors").read_bytes()


def test_unwritable_output_dir(tiny_models, identity_subset, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cfg = tiny_config(tiny_models["qwen2"], identity_subset, blocker / "run", "train.max_steps=1")
    with pytest.raises(ConfigError, match=r"output_dir: .*cannot write there"):
        run_training(build_setup(cfg), quiet=True)


def test_changed_config_is_refused_unless_forced(tiny_models, identity_subset, tmp_path):
    out = tmp_path / "run"
    run_training(build_setup(tiny_config(tiny_models["qwen2"], identity_subset, out, "train.max_steps=2")), quiet=True)
    changed = tiny_config(tiny_models["qwen2"], identity_subset, out, "train.max_steps=4", "train.lr=2e-2")
    with pytest.raises(ConfigError, match=r"belongs to a different run: train.lr: 0.01 -> 0.02.*--force"):
        run_training(build_setup(changed), quiet=True)
    other_rank = tiny_config(tiny_models["qwen2"], identity_subset, out, "train.max_steps=4", "lora.r=4")
    with pytest.raises(ConfigError, match=r"lora.r: 8 -> 4.*LoRA tensor shapes changed"):
        run_training(build_setup(other_rank), quiet=True)
    # Only the run length changed: a continuation.
    longer = run_training(build_setup(tiny_config(tiny_models["qwen2"], identity_subset, out, "train.max_steps=3")), quiet=True)
    assert longer.steps == 3
    forced = run_training(build_setup(changed), quiet=True, force=True)
    assert forced.steps == 4


def test_changed_data_is_refused(tiny_models, identity_subset, tmp_path):
    out = tmp_path / "run"
    data = tmp_path / "d.json"
    data.write_bytes(identity_subset.read_bytes())
    run_training(build_setup(tiny_config(tiny_models["qwen2"], data, out, "train.max_steps=2")), quiet=True)
    records = json.loads(data.read_text())
    records[0]["output"] = "I am {{name}}, changed."
    data.write_text(json.dumps(records))
    with pytest.raises(ConfigError, match="the training data changed"):
        run_training(build_setup(tiny_config(tiny_models["qwen2"], data, out, "train.max_steps=3")), quiet=True)


def test_damaged_checkpoint_is_not_resumed(tiny_models, identity_subset, tmp_path):
    out = tmp_path / "run"
    run_training(build_setup(tiny_config(tiny_models["qwen2"], identity_subset, out, "train.max_steps=4",
                                          "train.save_every=2")), quiet=True)
    newest = out / "checkpoints" / "step-00000004"
    with open(newest / "lora.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x01\x02\x03")
    ckpt, notes = find_resumable(out)
    assert ckpt.name == "step-00000002"
    assert notes == ["ignored damaged checkpoint step-00000004: lora.safetensors does not match its sha256"]


def test_symlink_out_of_output_dir_is_refused(tiny_models, identity_subset, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (out / "checkpoints").symlink_to(elsewhere)
    with pytest.raises(ConfigError, match="leads outside"):
        run_training(build_setup(tiny_config(tiny_models["qwen2"], identity_subset, out, "train.max_steps=1")), quiet=True)


def test_paths_from_names_stay_inside(tmp_path):
    from qflash.paths import inside

    assert inside(tmp_path, "adapter") == tmp_path / "adapter"
    for bad in ("../x", "/etc/passwd", "a/../../b"):
        with pytest.raises(ConfigError):
            inside(tmp_path, bad)


def test_source_has_no_unsafe_loading():
    """Weights through safetensors, torch.load only with weights_only=True, YAML only with safe_load (or the
    config's StrictLoader, a SafeLoader that refuses duplicate keys)."""
    import yaml

    from qflash.config import StrictLoader

    assert issubclass(StrictLoader, yaml.SafeLoader)
    offenders = []
    for path in (REPO / "src").rglob("*.py"):
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#", 1)[0]
            if "torch.load(" in code and "weights_only=True" not in code:
                offenders.append(f"{path}:{n}: torch.load without weights_only=True")
            if re.search(r"\byaml\.(load|unsafe_load|full_load)\(", code) and "Loader=StrictLoader)" not in code:
                offenders.append(f"{path}:{n}: yaml load other than safe_load")
            if re.search(r"\b(pickle|dill|cloudpickle)\.loads?\(", code):
                offenders.append(f"{path}:{n}: pickle load")
            if re.search(r"trust_remote_code\s*=\s*True", code):
                offenders.append(f"{path}:{n}: trust_remote_code forced on")
    assert offenders == []


def _checkpoint_steps(out: Path) -> list[int]:
    return [int(p.name.split("-")[1]) for p in sorted((out / "checkpoints").glob("step-*"))]


def test_second_run_on_a_live_output_dir_is_refused_and_touches_nothing(config_file, tmp_path):
    """A run in progress; a second `qflash train` on its output_dir, without and with --overwrite, is refused
    ("in use") before it deletes or cleans anything: the first's checkpoints, logs, TensorBoard files and its
    adapter being written stay."""
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "QFLASH_FAULTS": "save_pause=0.2"}
    cmd = [sys.executable, "-m", "qflash.cli", "train", str(config_file), f"output_dir={out}"]
    first = subprocess.Popen([*cmd, "train.max_steps=100000", "train.keep=100000"], cwd=REPO, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        t_end = time.monotonic() + 300
        while not (find_resumable(out)[0] and steps_logged(out) > 4) and time.monotonic() < t_end:
            assert first.poll() is None, "the first run ended early"
            time.sleep(0.05)
        assert find_resumable(out)[0] and steps_logged(out) > 4, "the first run did not get going in 300 s"
        in_flight = out / ".adapter.tmp-inflight"  # as the first run's adapter looks while it is written
        in_flight.mkdir()
        (in_flight / "adapter_model.safetensors").write_bytes(b"being written")
        checkpoints, metrics = _checkpoint_steps(out), (out / "metrics.jsonl").read_bytes()
        for extra in ([], ["--overwrite"]):
            second = subprocess.run([*cmd, *extra], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
            assert second.returncode == 2, second.stderr[-2000:]
            assert f"output_dir: {out} is in use by another qflash run (pid {first.pid})" in second.stderr
        assert first.poll() is None, "the first run goes on"
        assert set(checkpoints) <= set(_checkpoint_steps(out)), "the first's checkpoints are all there"
        assert (out / "metrics.jsonl").read_bytes().startswith(metrics), "its metrics log only grew"
        assert (out / "tensorboard").is_dir() and (out / "samples.jsonl").is_file()
        assert (in_flight / "adapter_model.safetensors").read_bytes() == b"being written"
    finally:
        first.kill()
        first.wait()


def test_rewind_sets_later_checkpoints_aside_and_rotation_keeps_the_new_ones(tiny_models, identity_subset, tmp_path,
                                                                            capsys):
    """Resuming from an older checkpoint while later ones exist: those go to checkpoints/abandoned-*/ (said once),
    so that `keep` rotates the new checkpoints (not delete each right after it is written) and a later auto-resume
    continues the new line, not the abandoned one."""
    out = tmp_path / "run"
    model = tiny_models["qwen2"]
    run_training(build_setup(tiny_config(model, identity_subset, out, "train.max_steps=6", "train.save_every=2",
                                         "train.keep=3")), quiet=True)
    assert _checkpoint_steps(out) == [2, 4, 6]
    older = out / "checkpoints" / "step-00000002"
    rewind = tiny_config(model, identity_subset, out, "train.max_steps=5", "train.save_every=3", "train.keep=2",
                         f"train.resume={older}")
    result = run_training(build_setup(rewind, quiet=True))
    assert result.steps == 5
    assert _checkpoint_steps(out) == [3, 5], "rotation with keep=2 over the new checkpoints"
    aside = list((out / "checkpoints").glob("abandoned-*"))
    assert len(aside) == 1 and sorted(p.name for p in aside[0].iterdir()) == ["step-00000004", "step-00000006"]
    said = capsys.readouterr().err.replace("\n", "")
    assert said.count("rewinding to step 2: the later checkpoints step-00000004, step-00000006 were moved") == 1
    ckpt, _ = find_resumable(out)
    assert ckpt.name == "step-00000005", "auto-resume continues the new line"
