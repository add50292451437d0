"""Two processes (gloo on the CPU) train like one: same per-step loss, one set of files, and a
checkpoint written by two processes resumes in one (and the other way round). DDP through torchrun,
FSDP2 through `accelerate launch` with the shipped configs/accelerate/fsdp2.yaml."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


REPO = Path(__file__).resolve().parents[2]


def _train(cfg_path: Path, procs: int, *overrides: str, accelerate_config: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if accelerate_config:
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                    str(REPO / "configs" / "accelerate" / accelerate_config), f"--num_processes={procs}",
                    f"--main_process_port={_free_port()}", "-m"]
    elif procs > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={procs}",
                    f"--master_port={_free_port()}", "-m"]
    else:
        launcher = [sys.executable, "-m"]
    p = subprocess.run([*launcher, "qflash.cli", "train", str(cfg_path), *overrides], env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def _metrics(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def _losses(run: Path) -> dict[int, float]:
    return {step: r["loss"] for step, r in _metrics(run).items()}


@pytest.fixture(scope="module")
def tiny_run(tiny_models, identity_subset, tmp_path_factory) -> tuple[Path, Path]:
    """The tiny config, and its run by one process (the reference for every launcher)."""
    # 3 samples a step, one per micro-batch: process 0 gets two micro-batches, process 1 one (plus a
    # zero-weighted filler, so both reach the gradient sync together). lr 1e-2 constant: the Adam
    # moments restored on resume decide the later steps' losses.
    root = tmp_path_factory.mktemp("dist")
    cfg = tiny_config(tiny_models["qwen2"], identity_subset, root / "unused", "train.micro_batch_size=1",
                      "train.grad_accum=3", "train.max_steps=6", "train.save_every=3", "train.lr=1e-2", "train.schedule=constant",
                      "data.packing=false")
    cfg_path = root / "tiny.yaml"
    cfg_path.write_text(cfg.to_yaml(), encoding="utf-8")
    one = root / "one"
    _train(cfg_path, 1, f"output_dir={one}")
    return cfg_path, one


def _same_adapter(run: Path, ref: Path) -> None:
    a1 = load_file(str(ref / "adapter" / "adapter_model.safetensors"))
    a2 = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert a1.keys() == a2.keys()
    for k in a1:
        torch.testing.assert_close(a2[k], a1[k], rtol=1e-3, atol=1e-5)


@pytest.mark.slow
def test_fsdp2_matches_one_process_and_resumes_across_process_counts(tiny_run, tmp_path):
    cfg_path, one = tiny_run
    two = tmp_path / "two"
    p = _train(cfg_path, 2, f"output_dir={two}", accelerate_config="fsdp2.yaml")
    # sharded for real (not DDP): root (embedding tied to lm_head, norm) + each decoder layer (2)
    assert "2 processes (fsdp2 over 3 modules" in p.stdout + p.stderr
    l1, l2 = _losses(one), _losses(two)
    assert sorted(l2) == list(range(1, 7))
    for step in l1:
        assert l2[step] == pytest.approx(l1[step], rel=1e-4), (step, l1, l2)
    m1, m2 = _metrics(one), _metrics(two)
    assert [(m2[k]["tokens"], m2[k]["trained_tokens"]) for k in m2] == [(m1[k]["tokens"], m1[k]["trained_tokens"]) for k in m1]
    assert (two / "samples.jsonl").read_text() == (one / "samples.jsonl").read_text()
    _same_adapter(two, one)  # gathered whole from the shards

    # sharded checkpoint state saved whole: FSDP2 x2 -> 1 process, and 1 process -> FSDP2 x2
    for first, then, name in ((2, 1, "down"), (1, 2, "up")):
        run = tmp_path / name
        _train(cfg_path, first, f"output_dir={run}", "train.max_steps=3",
               accelerate_config="fsdp2.yaml" if first == 2 else None)
        p = _train(cfg_path, then, f"output_dir={run}", accelerate_config="fsdp2.yaml" if then == 2 else None)
        assert "resuming from" in p.stdout + p.stderr
        lm = _losses(run)
        for step in range(1, 7):
            assert lm[step] == pytest.approx(l1[step], rel=1e-4), (name, step, lm, l1)
        _same_adapter(run, one)


@pytest.mark.slow
def test_two_processes_match_one_and_resume_in_one(tiny_run, tmp_path):
    cfg_path, one = tiny_run
    two, mixed = tmp_path / "two", tmp_path / "mixed"
    p = _train(cfg_path, 2, f"output_dir={two}")
    assert "2 processes (ddp" in p.stdout + p.stderr

    l1, l2 = _losses(one), _losses(two)
    assert sorted(l1) == sorted(l2) == list(range(1, 7))
    for step in l1:
        assert l2[step] == pytest.approx(l1[step], rel=1e-4), (step, l1, l2)
    # each sample once: the two processes together saw exactly the tokens one process saw
    m1, m2 = _metrics(one), _metrics(two)
    assert [(m2[k]["tokens"], m2[k]["trained_tokens"]) for k in m2] == [(m1[k]["tokens"], m1[k]["trained_tokens"]) for k in m1]
    # process 0 alone wrote the run's files: one line per step, one sample log, one adapter
    assert len((two / "samples.jsonl").read_text().splitlines()) == 6
    assert (two / "samples.jsonl").read_text() == (one / "samples.jsonl").read_text()
    _same_adapter(two, one)

    # 3 steps with two processes, then the rest with one: the same run as one process throughout
    _train(cfg_path, 2, f"output_dir={mixed}", "train.max_steps=3")
    assert _losses(mixed).keys() == {1, 2, 3}
    p = _train(cfg_path, 1, f"output_dir={mixed}")
    assert "resuming from" in p.stdout + p.stderr
    lm = _losses(mixed)
    for step in range(1, 7):
        assert lm[step] == pytest.approx(l1[step], rel=1e-4), (step, lm, l1)
    _same_adapter(mixed, one)


@pytest.mark.slow
def test_two_nodes_of_one_process_match_one(tiny_run, tmp_path):
    """Multi-node as the README shows it: two torchrun "nodes" (`--nnodes 2 --node_rank 0|1`, one process each,
    c10d rendezvous at one endpoint), here both on this host, train as one process does."""
    cfg_path, one = tiny_run
    run = tmp_path / "nodes"
    endpoint = f"127.0.0.1:{_free_port()}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={rank}",
                               "--nproc_per_node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}",
                               "--rdzv-id=qflash-test", "-m", "qflash.cli", "train", str(cfg_path), f"output_dir={run}"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in (0, 1)]
    logs = [p.communicate(timeout=600)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert "2 processes (ddp" in logs[0] + logs[1]
    l1, ln = _losses(one), _losses(run)
    assert sorted(ln) == list(range(1, 7))
    for step in l1:
        assert ln[step] == pytest.approx(l1[step], rel=1e-4), (step, l1, ln)
    _same_adapter(run, one)
