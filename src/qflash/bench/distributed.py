"""`qflash bench --gpus N`: data-parallel throughput, and the loss of N GPUs vs one GPU on the same global batch.

Each of the N processes (torchrun) trains the workload's micro-batch (fixed: 4 x 2048 tokens, its own
random tokens, seed = rank) through qflash's model and loss wrapped in DDP, the loss token-weighted
over the global batch as in training. Throughput = global real tokens / median step time.
`--gpus 1 --as-ranks N` runs the same global batch (all N ranks' micro-batches) on one GPU as
gradient accumulation, for the loss comparison.
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


def relaunch(gpus: int, argv: list[str]) -> int:
    """Run this same `qflash bench` command under torchrun with `gpus` processes."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
           "-m", "qflash.cli", *argv]
    print("launching:", " ".join(cmd), flush=True)
    return subprocess.call(cmd)


def run_data_parallel(shape: str, workload: str, *, steps: int, warmup: int, dropout: float, attention: str,
                      out_dir: Path, cache: Path, overrides: list[str], loss_steps: int, as_ranks: int) -> dict | None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from qflash.data.batching import trained_tokens
    from qflash.model.attention import activate
    from qflash.train.distributed import LossModule, batch_fields

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local)
    if world > 1:
        torch.distributed.init_process_group("nccl", device_id=torch.device("cuda", local))
    runner.QFLASH_OVERRIDES[:] = overrides
    backend = activate(attention)
    model_dir = random_model_dir(shape, cache) if rank == 0 else None
    if world > 1:
        torch.distributed.barrier()
        model_dir = random_model_dir(shape, cache)
    vocab = model_config(shape).vocab_size
    # This process's share of the global batch: rank r's micro-batch; one GPU "as N ranks" takes all N.
    shares = [rank] if world > 1 else list(range(as_ranks))
    docs = [d for r in shares for d in runner.workload_docs(workload, vocab, seed=r)]
    model, optimizer, params = runner.qflash_model(model_dir, dropout, 1e-4, attention, seed=0)
    wrapped = LossModule(model)
    if world > 1:
        wrapped = DDP(wrapped, device_ids=[local])
    batches = runner.qflash_batches(docs, 2048)

    def step() -> float:
        local_tokens = sum(trained_tokens(b) for b in batches)
        counts = torch.tensor([float(local_tokens)], device="cuda", dtype=torch.float64)
        if world > 1:
            torch.distributed.all_reduce(counts)
        n = counts.item()
        total = torch.zeros((), device="cuda", dtype=torch.float64)
        for i, b in enumerate(batches):
            sync = wrapped.no_sync() if (world > 1 and i < len(batches) - 1) else _null()
            with sync:
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    token_loss = wrapped(**batch_fields(b))
                (token_loss * (world / n)).backward()
            total += token_loss.detach()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if world > 1:
            torch.distributed.all_reduce(total)
        return float(total.item() / n)

    # the same initial LoRA weights on every rank (they are seeded, but make it explicit)
    if world > 1:
        for p in params:
            torch.distributed.broadcast(p.data, 0)
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
    peak = torch.cuda.max_memory_allocated() / 1e9
    peaks = torch.tensor([peak], device="cuda")
    if world > 1:
        torch.distributed.all_reduce(peaks, op=torch.distributed.ReduceOp.MAX)
    rec = None
    if rank == 0:
        rec = {
            "device": torch.cuda.get_device_name(), "gpus": world, "as_ranks": as_ranks if world == 1 else world,
            "shape": shape, "workload": workload, "attention_backend": backend, "lora_r": 64, "lora_alpha": 16,
            "lora_dropout": dropout, "overrides": overrides, "strategy": "ddp" if world > 1 else "single",
            "global_real_tokens_per_step": tokens, "step_s": step_s, "tokens_per_s": tokens / step_s,
            "peak_mem_gb_per_gpu": float(peaks.item()), "losses": losses, "steps_timed": steps, "warmup_steps": warmup,
            "git_commit": os.environ.get("QFLASH_GIT_COMMIT"), "versions": runner.versions(),
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
        print(f"{shape} {workload} x{world} GPU(s) ({rec['strategy']}): {rec['tokens_per_s']:,.0f} tok/s, "
              f"step {step_s * 1e3:.0f} ms, peak {rec['peak_mem_gb_per_gpu']:.1f} GB per GPU; "
              f"losses {[round(x, 4) for x in losses]}", flush=True)
        out_dir.mkdir(parents=True, exist_ok=True)
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
        tag = rec["device"].replace(" ", "-").replace("/", "-")
        (out_dir / f"{stamp}_{shape}_{workload}_{world}gpu_{tag}.json").write_text(json.dumps(rec, indent=1))
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return rec


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
