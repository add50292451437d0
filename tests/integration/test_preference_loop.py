"""The training loop's guarantees hold for preference tuning (train.objective=dpo; orpo too where its NLL
weighs in), as they do for SFT (test_train_tiny.py, test_crash_safety.py, test_distributed.py): the step's loss
is the mean over its pairs however they are split into micro-batches; a run killed with SIGKILL resumes bitwise,
reusing the saved reference log-probabilities (or recomputing the same ones from the starting weights); a
non-finite step is skipped with weights and optimizer untouched; two processes train like one; model.adapter
starts from a trained adapter, which is then also the reference (and a retrained one is another run). Tiny
Qwen2, NF4, fp32 on the CPU."""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import tiny_config
from qflash.errors import ConfigError
from qflash.train import loop
from qflash.train.faults import Faults
from qflash.train.loop import build_setup, run_training
from qflash.train.preference import REFERENCE_FILE

REPO = Path(__file__).resolve().parents[2]
QUESTIONS = ["What is rain?", "Name a prime number.", "How do bees talk?", "Why is the sea salty?",
             "What is a verb?", "How far is the moon?", "What do plants need?", "Who wrote Hamlet?",
             "What is two plus five?", "Why do we sleep?", "Where do rivers go?", "What is a comet?"]
DPO = ("train.objective=dpo", "train.schedule=constant", "train.lr=2e-3")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    """12 TRL-format pairs whose answers differ in length and wording."""
    rows = [{"prompt": q, "chosen": f"Ahoy! {q[:-1].split()[-1]} be a fine thing, matey.",
             "rejected": f"That is a good question about {q[:-1].split()[-1]}."} for q in QUESTIONS]
    path = tmp_path_factory.mktemp("pairs") / "pairs.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


def _lora(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------
# 1. gradient accumulation


def _accumulated(model_dir, data, out, mbs, ga, *extra):
    cfg = tiny_config(model_dir, data, out, *DPO, f"train.micro_batch_size={mbs}", f"train.grad_accum={ga}",
                      "train.max_steps=3", *extra)
    setup = build_setup(cfg, quiet=True)
    start = _lora(setup.model)
    result = run_training(setup, quiet=True)
    return result.losses, start, _lora(setup.model)


def _same_steps(a, b, dpo: bool = True) -> None:
    (losses_a, start_a, w_a), (losses_b, start_b, w_b) = a, b
    assert losses_a == pytest.approx(losses_b, abs=2e-6, rel=1e-6), (losses_a, losses_b)
    if dpo:
        assert losses_a[0] == pytest.approx(math.log(2), abs=1e-6), "step 1: policy == reference (LoRA B is zero)"
    assert losses_a[-1] < losses_a[0] - 1e-3, "the steps train"
    for n in w_a:
        assert torch.equal(start_a[n], start_b[n])
        assert not torch.equal(w_a[n], start_a[n]), f"{n} moved"
        torch.testing.assert_close(w_b[n], w_a[n], atol=1e-5, rtol=0, msg=n)


@pytest.fixture(scope="module")
def four_in_one(tiny_models, pairs, tmp_path_factory):
    return _accumulated(tiny_models["qwen2"], pairs, tmp_path_factory.mktemp("whole") / "run", 4, 1)


@pytest.mark.parametrize("mbs, ga", [(2, 2), (1, 4)])
def test_accumulation_splits_give_the_same_steps(mbs, ga, four_in_one, tiny_models, pairs, tmp_path):
    """4 pairs a step as 1 micro-batch of 4, 2 of 2 or 4 of 1: the same per-step losses (the mean over the
    step's pairs) and the same LoRA weights after 3 steps."""
    _same_steps(four_in_one, _accumulated(tiny_models["qwen2"], pairs, tmp_path / "split", mbs, ga))


@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_step_split_unevenly_gives_the_same_steps(objective, tiny_models, pairs, tmp_path, monkeypatch):
    """3 pairs a step as micro-batches of 2 + 1 (each pair weighted 1/3, not 1/2 and 1/1; orpo's NLL per chosen
    token of the whole step) equals one micro-batch of 3. One process always fills its micro-batches (a step
    holds micro_batch_size x grad_accum pairs); across processes a step splits unevenly for real
    (test_two_processes_match_one), here the step is made 3 pairs with micro_batch_size 2 by hand."""
    whole = _accumulated(tiny_models["qwen2"], pairs, tmp_path / "whole", 3, 1, f"train.objective={objective}")
    monkeypatch.setattr(loop.Run, "per_step", property(lambda self: 3))
    split = _accumulated(tiny_models["qwen2"], pairs, tmp_path / "split", 2, 1, f"train.objective={objective}")
    _same_steps(whole, split, dpo=objective == "dpo")


# ---------------------------------------------------------------------------------------------
# 2. kill -9 and resume


# 12 pairs, 2 a step, 16 steps; checkpoints every 4; dropout on (the RNG state must be restored too)
RESUMED = ("train.max_steps=16", "train.micro_batch_size=2", "train.save_every=4", "train.keep=2", "lora.dropout=0.1")


def _start(config: Path, out: Path, launcher: tuple[str, ...] = ()) -> subprocess.Popen:
    # one thread each: the runs of a test go two at a time on the CPU, every one computes alike
    env = {**os.environ, "QFLASH_FAULTS": "", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", *launcher, "qflash.cli", "train", str(config), f"output_dir={out}"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(p: subprocess.Popen) -> str:
    log, _ = p.communicate(timeout=300)
    assert p.returncode == 0, log[-3000:]
    return log


def _steps_logged(out: Path) -> int:
    log = out / "samples.jsonl"
    return log.read_text().count("\n") if log.exists() else 0


def _kill_after(config: Path, out: Path, steps: int) -> None:
    p = _start(config, out)
    t_end = time.monotonic() + 120
    while _steps_logged(out) < steps and p.poll() is None and time.monotonic() < t_end:
        time.sleep(0.01)
    assert p.poll() is None, "the run ended before it could be killed"
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL


SCORED = "reference: the starting model scores the pairs"


def test_sigkill_resumes_bitwise_with_the_saved_or_recomputed_reference(tiny_models, pairs, tmp_path):
    cfg = tiny_config(tiny_models["qwen2"], pairs, tmp_path / "unused", *DPO, *RESUMED)
    tree = cfg.to_dict()
    tree.pop("output_dir")
    config = tmp_path / "dpo.yaml"
    config.write_text(yaml.safe_dump(tree), encoding="utf-8")

    whole, killed = tmp_path / "whole", tmp_path / "killed"
    uninterrupted = _start(config, whole)
    _kill_after(config, killed, 6)  # the step-4 checkpoint is complete before step 5 starts
    assert SCORED in _finish(uninterrupted)
    ref_file = killed / REFERENCE_FILE
    saved = torch.load(ref_file, weights_only=True)
    assert torch.equal(saved["logps"], torch.load(whole / REFERENCE_FILE, weights_only=True)["logps"])
    # a copy of the killed run resumes without the reference: it is computed again from the starting weights
    # (the loop scores the pairs before it restores the checkpoint's), so the same numbers and the same run
    recomputed = tmp_path / "recomputed"
    shutil.copytree(killed, recomputed)
    (recomputed / REFERENCE_FILE).unlink()
    before = ref_file.stat()

    resumed = [_start(config, killed), _start(config, recomputed)]
    log, log_recomputed = map(_finish, resumed)
    assert "resuming from" in log and SCORED not in log, log[-3000:]
    after = ref_file.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns), "the saved reference is reused"
    assert "resuming from" in log_recomputed and SCORED in log_recomputed, log_recomputed[-3000:]
    assert torch.equal(torch.load(recomputed / REFERENCE_FILE, weights_only=True)["logps"], saved["logps"])

    expected = [(m["step"], m["loss"], m["rewards/margin"]) for m in _metrics(whole)]
    assert [m[0] for m in expected] == list(range(1, 17))
    adapter = (whole / "adapter" / "adapter_model.safetensors").read_bytes()
    for run in (killed, recomputed):
        assert [(m["step"], m["loss"], m["rewards/margin"]) for m in _metrics(run)] == expected, run.name
        assert (run / "adapter" / "adapter_model.safetensors").read_bytes() == adapter, run.name
        assert (run / "samples.jsonl").read_text() == (whole / "samples.jsonl").read_text()


# ---------------------------------------------------------------------------------------------
# 3. a non-finite step


def test_non_finite_dpo_step_is_skipped_untouched(tiny_models, pairs, tmp_path, monkeypatch):
    optimizers = []
    build = loop.build_optimizer
    monkeypatch.setattr(loop, "build_optimizer", lambda *a, **k: optimizers.append(build(*a, **k)) or optimizers[-1])
    cfg = tiny_config(tiny_models["qwen2"], pairs, tmp_path / "run", *DPO, "train.max_steps=5", "train.save_every=5")
    setup = build_setup(cfg, quiet=True)
    after: dict[int, tuple[dict, dict]] = {}
    on_step = lambda step, v: after.__setitem__(step, (_lora(setup.model),  # noqa: E731
                                                       copy.deepcopy(optimizers[0].state_dict())))
    result = run_training(setup, quiet=True, faults=Faults(nan_steps={3}), on_step=on_step)

    logged = _metrics(tmp_path / "run")
    assert [m["skipped"] for m in logged] == [False, False, True, False, False]
    assert math.isnan(result.losses[2]) and all(math.isfinite(x) for i, x in enumerate(result.losses) if i != 2)
    assert logged[2]["loss"] is None and logged[2]["rewards/accuracy"] is None, "nothing reported of a skipped step"
    (w2, opt2), (w3, opt3), (w4, _) = after[2], after[3], after[4]
    for n in w2:
        assert torch.equal(w2[n], w3[n]), f"{n}: the skipped step left the weights as they were"
        assert not torch.equal(w3[n], w4[n]), f"{n}: the next good step moves it"
    for k, state in opt2["state"].items():
        for name, t in state.items():
            assert torch.equal(t, opt3["state"][k][name]), f"optimizer {k}.{name} untouched by the skipped step"
    from qflash.train.checkpoint import load_checkpoint

    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "step-00000005")
    assert {float(s["step"]) for s in ckpt.optimizer["state"].values()} == {4.0}, "4 optimizer steps, not 5"
    assert ckpt.scheduler["last_epoch"] == 4
    assert ckpt.state["bad_total"] == 1 and ckpt.state["consecutive_bad"] == 0


# ---------------------------------------------------------------------------------------------
# 4. two processes


def _torchrun(procs: int) -> tuple[str, ...]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return ("torch.distributed.run", f"--nproc_per_node={procs}", f"--master_port={port}", "-m")


@pytest.mark.slow
def test_two_processes_match_one(tiny_models, pairs, tmp_path):
    """3 pairs a step, one per micro-batch: process 0 takes two micro-batches, process 1 one (and a zero-weighted
    filler, so both reach the gradient sync together): each pair still weighs 1/3 of the step."""
    cfg = tiny_config(tiny_models["qwen2"], pairs, tmp_path / "unused", *DPO, "train.micro_batch_size=1",
                      "train.grad_accum=3", "train.max_steps=4")
    cfg_path = tmp_path / "dpo.yaml"
    cfg_path.write_text(cfg.to_yaml(), encoding="utf-8")
    one, two = tmp_path / "one", tmp_path / "two"
    runs = [_start(cfg_path, one), _start(cfg_path, two, _torchrun(2))]
    assert "2 processes (ddp" in [_finish(p) for p in runs][1]
    m1, m2 = _metrics(one), _metrics(two)
    assert [m["step"] for m in m1] == [m["step"] for m in m2] == [1, 2, 3, 4]
    for a, b in zip(m1, m2):
        for key in ("loss", "rewards/margin", "logps/chosen"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (key, m1, m2)
        assert (b["tokens"], b["trained_tokens"]) == (a["tokens"], a["trained_tokens"])
    assert m1[0]["loss"] == pytest.approx(math.log(2), abs=1e-6), "step 1: the mean over the pairs of log 2"
    assert m1[-1]["loss"] < m1[0]["loss"] - 1e-3, "the steps train"
    assert (two / "samples.jsonl").read_text() == (one / "samples.jsonl").read_text()
    assert torch.equal(torch.load(two / REFERENCE_FILE, weights_only=True)["logps"],
                       torch.load(one / REFERENCE_FILE, weights_only=True)["logps"])
    a1 = load_file(str(one / "adapter" / "adapter_model.safetensors"))
    a2 = load_file(str(two / "adapter" / "adapter_model.safetensors"))
    assert a1.keys() == a2.keys()
    for k in a1:
        # Adam's normalized steps carry the all-reduce's rounding (~1e-6 of the weights) into every element
        assert float((a2[k] - a1[k]).norm() / a1[k].norm()) < 1e-4, k
        torch.testing.assert_close(a2[k], a1[k], rtol=0, atol=5e-5, msg=k)


def _fsdp2(procs: int) -> tuple[str, ...]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return ("accelerate.commands.launch", "--config_file", str(REPO / "configs" / "accelerate" / "fsdp2.yaml"),
            f"--num_processes={procs}", f"--main_process_port={port}", "-m")


@pytest.mark.slow
def test_dpo_resumes_across_process_counts_under_fsdp2_and_ddp(tiny_models, pairs, tmp_path):
    """Issue 28's CPU part: 3 steps under FSDP2 x2 then resumed in one process, and 3 steps in one process then
    resumed under DDP x2: every step's loss and rewards are one process's, the reference is scored once (by the
    first launch) and read back by the second, and the adapter ends as one process's."""
    cfg = tiny_config(tiny_models["qwen2"], pairs, tmp_path / "unused", *DPO, "train.micro_batch_size=1",
                      "train.grad_accum=3", "train.max_steps=6", "train.save_every=3", "quant.mode=none")
    cfg_path = tmp_path / "dpo.yaml"
    cfg_path.write_text(cfg.to_yaml(), encoding="utf-8")
    one = tmp_path / "one"
    _finish(_start(cfg_path, one))
    m1 = _metrics(one)
    a1 = load_file(str(one / "adapter" / "adapter_model.safetensors"))
    for name, first, then in (("down", _fsdp2(2), ()), ("up", (), _torchrun(2))):
        run = tmp_path / name
        short = tmp_path / f"{name}.yaml"
        short.write_text(cfg_path.read_text().replace("max_steps: 6", "max_steps: 3"), encoding="utf-8")
        assert "max_steps: 3" in short.read_text()
        log1 = _finish(_start(short, run, first))
        assert SCORED in log1
        if first:
            assert "2 processes (fsdp2" in log1
        log2 = _finish(_start(cfg_path, run, then))
        assert "resuming from" in log2 and SCORED not in log2, "the second launch reads the saved reference"
        if then:
            assert "2 processes (ddp" in log2
        m = _metrics(run)
        assert [x["step"] for x in m] == [1, 2, 3, 4, 5, 6]
        for a, b in zip(m1, m):
            for key in ("loss", "rewards/margin", "rewards/accuracy", "logps/chosen"):
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (name, key, m1, m)
        a = load_file(str(run / "adapter" / "adapter_model.safetensors"))
        for k in a1:
            torch.testing.assert_close(a[k], a1[k], rtol=1e-3, atol=1e-5, msg=f"{name}: {k}")


# ---------------------------------------------------------------------------------------------
# 5. model.adapter


def test_dpo_starts_from_an_sft_adapter(tiny_models, identity_subset, pairs, tmp_path):
    from peft import get_peft_model_state_dict

    model = tiny_models["qwen2"]
    sft = run_training(build_setup(tiny_config(model, identity_subset, tmp_path / "sft", "train.max_steps=3"),
                                   quiet=True), quiet=True)
    sft_weights = load_file(str(sft.adapter_dir / "adapter_model.safetensors"))
    assert any("lora_B" in k and t.abs().max() > 0 for k, t in sft_weights.items()), "SFT moved LoRA B off zero"

    setup = build_setup(tiny_config(model, pairs, tmp_path / "dpo", *DPO, "train.max_steps=3",
                                    f"model.adapter={tmp_path / 'sft'}"), quiet=True)
    start = get_peft_model_state_dict(setup.model)
    assert start.keys() == sft_weights.keys()
    for k in start:
        assert torch.equal(start[k], sft_weights[k]), f"{k}: starts as the SFT adapter's"
    result = run_training(setup, quiet=True)
    # the reference is the starting adapter: policy == reference at step 1, every margin zero
    assert result.losses[0] == pytest.approx(math.log(2), abs=1e-6), result.losses
    assert _metrics(tmp_path / "dpo")[0]["rewards/margin"] == pytest.approx(0.0, abs=1e-6)
    assert result.losses[-1] < result.losses[0] - 1e-3, "the steps train"

    with pytest.raises(ConfigError, match=r"model.adapter: .*sft.*other LoRA settings \(lora.r: 8 there, 4 here\)"):
        build_setup(tiny_config(model, pairs, tmp_path / "dpo-r4", *DPO, "lora.r=4",
                                f"model.adapter={tmp_path / 'sft'}"), quiet=True)


def test_a_retrained_start_adapter_is_another_run(tiny_models, identity_subset, pairs, tmp_path):
    """model.adapter names a path; the run there trained again is another start: a dpo run that had saved its
    reference but no checkpoint yet (killed early) scores the pairs again under the new adapter, and one with
    checkpoints is refused as a different run."""
    model = tiny_models["qwen2"]

    def sft(steps: int) -> None:
        run_training(build_setup(tiny_config(model, identity_subset, tmp_path / "sft", f"train.max_steps={steps}"),
                                 quiet=True), overwrite=True, quiet=True)

    def dpo(out: Path, steps: int) -> list[float]:
        cfg = tiny_config(model, pairs, out, *DPO, f"train.max_steps={steps}", f"model.adapter={tmp_path / 'sft'}")
        return run_training(build_setup(cfg, quiet=True), quiet=True).losses

    sft(2)
    early, resumable = tmp_path / "early", tmp_path / "resumable"
    dpo(early, 1)
    dpo(resumable, 1)
    shutil.rmtree(early / "checkpoints")  # as a run killed before its first checkpoint leaves it: the reference,
    shutil.rmtree(early / "adapter")      # no checkpoint, no adapter
    sft(4)
    assert dpo(early, 1)[0] == pytest.approx(math.log(2), abs=1e-6), "the new adapter is the reference"
    with pytest.raises(ConfigError, match=r"belongs to a different run: model.adapter's weights changed"):
        dpo(resumable, 2)
