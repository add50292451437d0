"""`qflash bench --gpus N [--strategy ddp|fsdp2|deepspeed]`: multi-GPU throughput and per-GPU memory, and
the loss of N GPUs vs one GPU on the same global batch.

The N processes are started by `accelerate launch` with the shipped configs/accelerate/<strategy>.yaml,
and each step runs through qflash's own training mechanics (train/distributed.py Parallel: the
model + loss wrapped by Accelerate for the strategy, the loss token-weighted over the global batch).
Each process trains the workload's micro-batch (fixed: 4 x 2048 tokens, its own random tokens,
seed = rank). Throughput = global real tokens / median step time. `--gpus 1 --as-ranks N` runs the
same global batch (all N ranks' micro-batches) on one GPU as gradient accumulation.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from qflash.bench import runner
from qflash.bench.shapes import model_config, random_model_dir

STRATEGY_CONFIGS = {"ddp": "ddp.yaml", "fsdp2": "fsdp2.yaml", "deepspeed": "deepspeed_zero2.yaml"}


def accelerate_config(strategy: str) -> Path:
    import qflash

    path = Path(qflash.__file__).resolve().parents[2] / "configs" / "accelerate" / STRATEGY_CONFIGS[strategy]
    if not path.exists():
        raise SystemExit(f"qflash bench --strategy {strategy}: {path} not found (run from a qflash checkout)")
    return path


def relaunch(gpus: int, strategy: str, argv: list[str]) -> int:
    """Run this same `qflash bench` command under `accelerate launch` with `gpus` processes."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accelerate_config(strategy)),
           f"--num_processes={gpus}", "-m", "qflash.cli", *argv]
    print("launching:", " ".join(cmd), flush=True)
    return subprocess.call(cmd)


def run_data_parallel(shape: str, workload: str, *, steps: int, warmup: int, dropout: float, attention: str,
                      out_dir: Path, cache: Path, overrides: list[str], loss_steps: int, as_ranks: int) -> dict | None:
    from qflash.data.batching import trained_tokens
    from qflash.model.attention import choose
    from qflash.train.distributed import Parallel, fsdp_requested, make_accelerator

    accelerator = make_accelerator(cpu=False)
    world, rank = accelerator.num_processes, accelerator.process_index
    runner.QFLASH_OVERRIDES[:] = overrides
    choice = choose(attention)
    backend = choice.backend
    with accelerator.main_process_first():  # process 0 writes the random model, the others then read it
        model_dir = random_model_dir(shape, cache)
    vocab = model_config(shape).vocab_size
    # This process's share of the global batch: rank r's micro-batch; one GPU "as N ranks" takes all N.
    shares = [rank] if world > 1 else list(range(as_ranks))
    docs = [d for r in shares for d in runner.workload_docs(workload, vocab, seed=r)]
    gb = lambda: round(torch.cuda.memory_allocated() / 1e9, 2)  # noqa: E731
    timeline: dict[str, float] = {}
    model, optimizer, _ = runner.qflash_model(model_dir, dropout, 1e-4, attention, seed=0, sharded=fsdp_requested())
    timeline["loaded"] = gb()
    par = Parallel(accelerator, model, optimizer, micro_batch_size=4, max_grad_norm=1.0, autocast_dtype=torch.bfloat16,
                   fused_ce=runner.Precision.fused_ce)
    timeline["prepared"] = gb()
    batches = runner.qflash_batches(docs, 2048, model)

    def step() -> float:
        local_tokens = sum(trained_tokens(b) for b in batches)
        counts = torch.tensor([float(local_tokens)], device="cuda", dtype=torch.float64)
        if world > 1:
            torch.distributed.all_reduce(counts)
        n = counts.item()
        total = torch.zeros((), device="cuda", dtype=torch.float64)
        for i, b in enumerate(batches):
            with par.micro_step(i == len(batches) - 1):
                token_loss = par.loss(b)  # bf16 autocast inside the loss module
                timeline.setdefault("after_forward", gb())
                par.backward(token_loss * (world / n))
                timeline.setdefault("after_backward", gb())
                timeline.setdefault("peak_first_backward", round(torch.cuda.max_memory_allocated() / 1e9, 2))
            total += token_loss.detach()
        par.step(True)
        timeline.setdefault("after_step", gb())
        if world > 1:
            torch.distributed.all_reduce(total)
        return float(total.item() / n)

    torch.cuda.reset_peak_memory_stats()
    losses, times = [], []
    for i in range(max(warmup + steps, loss_steps)):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        losses.append(step())
        torch.cuda.synchronize()
        if warmup <= i < warmup + steps:
            times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    tokens = sum(len(d) for d in docs) * (world if world > 1 else 1)
    peak = torch.tensor([torch.cuda.max_memory_allocated() / 1e9, torch.cuda.max_memory_reserved() / 1e9], device="cuda")
    if world > 1:
        torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
    rec = None
    if rank == 0:
        rec = {
            "device": torch.cuda.get_device_name(), "gpus": world, "as_ranks": as_ranks if world == 1 else world,
            "shape": shape, "workload": workload, "attention_backend": backend,
            "attention_cudnn_equal_length": choice.equal_dense_max > 0, "lora_r": 64, "lora_alpha": 16,
            "lora_dropout": dropout, "overrides": overrides, "strategy": par.strategy,
            "global_real_tokens_per_step": tokens, "step_s": step_s, "tokens_per_s": tokens / step_s,
            "peak_mem_gb_per_gpu": float(peak[0].item()), "peak_reserved_gb_per_gpu": float(peak[1].item()),
            "memory_timeline_gb_rank0": timeline,
            "losses": losses, "steps_timed": steps, "warmup_steps": warmup,
            "git_commit": os.environ.get("QFLASH_GIT_COMMIT"), "versions": runner.versions(),
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
        print(f"{shape} {workload} x{world} GPU(s) ({rec['strategy']}): {rec['tokens_per_s']:,.0f} tok/s, "
              f"step {step_s * 1e3:.0f} ms, peak {rec['peak_mem_gb_per_gpu']:.1f} GB allocated "
              f"({rec['peak_reserved_gb_per_gpu']:.1f} reserved) per GPU; memory {timeline}; "
              f"losses {[round(x, 4) for x in losses]}", flush=True)
        out_dir.mkdir(parents=True, exist_ok=True)
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
        tag = rec["device"].replace(" ", "-").replace("/", "-")
        (out_dir / f"{stamp}_{shape}_{workload}_{world}gpu_{rec['strategy']}_{tag}.json").write_text(json.dumps(rec, indent=1))
    accelerator.wait_for_everyone()
    return rec
