"""Issue 5, memory: each memory lever on and off, on the bench's qflash training step (CUDA).

    PYTHONPATH=src python bench/experiments/memory_levers.py [--shape qwen2.5-7b] [--workload fixed]
        [--variants baseline,offload,embedding,both] [--steps 5] [--warmup 2] [--set key=value ...]

Levers (both exact): `train.offload_activations` (checkpointed decoder-layer inputs in pinned CPU memory)
and `train.embedding_on_cpu` (input-embedding table in CPU memory). Each variant runs in its own process
(a crash or an out-of-memory in one leaves the others measured) through the bench's qflash path
(runner.qflash_model: NF4 load, checkpointing, LoRA r=64 on all 7 projections, fused AdamW, bf16
autocast, the chunked loss). Reported per variant: tok/s from the median step time after warm-up,
torch.cuda.max_memory_allocated over all steps (warm-up included: the first step allocates the AdamW
states), memory allocated after setup and after the steps, the losses (the levers are exact: they
should match the baseline's to float noise), and what is resident (NF4 weights, 16-bit weights, LoRA).
The JSON goes to bench/results/<stamp>_<shape>_<workload>_memory-levers_<gpu>.json.

`--breakdown VARIANTS` (default: both): after the timed steps, record the CUDA allocator's history over
one more step and print what was allocated during it and still alive at its peak, grouped by the line
that allocated it (activations, LoRA gradients, logits chunks, dequantized weights...); `--snapshot
PREFIX` also dumps the snapshot (view at https://pytorch.org/memory_viz).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
if importlib.util.find_spec("qflash") is None:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO / "src"))
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO / "src")] + [p for p in [os.environ.get("PYTHONPATH")] if p])
VARIANTS = {
    "baseline": ["train.offload_activations=false", "train.embedding_on_cpu=false"],
    "offload": ["train.offload_activations=true", "train.embedding_on_cpu=false"],
    "embedding": ["train.offload_activations=false", "train.embedding_on_cpu=true"],
    "both": ["train.offload_activations=true", "train.embedding_on_cpu=true"],
}
GB = 1e9


def _resident(model, optimizer) -> dict:
    """Bytes on the GPU by kind: NF4 weights (packed + quantization state), other frozen weights, LoRA."""
    nf4 = frozen = lora = 0
    seen: set[int] = set()
    for p in model.parameters():
        if not p.is_cuda or p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        size = p.numel() * p.element_size()
        if p.requires_grad:
            lora += size
        elif type(p).__name__ == "Params4bit":
            nf4 += size
            qs = getattr(p, "quant_state", None)
            for t in (getattr(qs, "absmax", None), getattr(getattr(qs, "state2", None), "absmax", None),
                      getattr(qs, "code", None), getattr(getattr(qs, "state2", None), "code", None)):
                if isinstance(t, torch.Tensor) and t.is_cuda:
                    nf4 += t.numel() * t.element_size()
        else:
            frozen += size
    states = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                 if isinstance(t, torch.Tensor) and t.is_cuda)
    emb = model.get_input_embeddings()
    # LoRA gradients take as much as the parameters once the backward has reached every layer.
    return {"nf4_gb": nf4 / GB, "frozen_16bit_gb": frozen / GB, "lora_params_gb": lora / GB, "adam_states_gb": states / GB,
            "input_embedding": f"{type(emb).__name__} on {getattr(emb, 'weight').device}"}


def _where(frames: list[dict]) -> str:
    """The innermost frame in the libraries that make up the model (else in torch): file:line function."""
    for packages in (("/qflash/", "/transformers/", "/peft/", "/bitsandbytes/"), ("/torch/",)):
        for f in frames:
            name = f.get("filename", "")
            if any(k in name for k in packages):
                return f"{name.split('site-packages/')[-1].split('src/')[-1]}:{f.get('line')} {f.get('name')}"
    return "?"


def _live_at_peak(snapshot: dict, device: int, top: int = 20) -> dict:
    """Replay the allocator trace of the recorded step: what was allocated during it and still alive at
    its peak, grouped by the innermost qflash/transformers/peft/bitsandbytes/torch frame."""
    live: dict[int, tuple[int, str]] = {}
    total = peak = 0
    at_peak: dict[int, tuple[int, str]] = {}
    for ev in snapshot["device_traces"][device]:
        action, addr, size = ev.get("action"), ev.get("addr"), ev.get("size", 0)
        if action == "alloc":
            where = _where(ev.get("frames") or [])
            live[addr] = (size, where)
            total += size
            if total > peak:
                peak, at_peak = total, dict(live)
        elif action == "free_completed" and addr in live:
            total -= live.pop(addr)[0]
    groups: dict[str, list[int]] = {}
    for size, where in at_peak.values():
        g = groups.setdefault(where, [0, 0])
        g[0] += size
        g[1] += 1
    rows = sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]
    return {"step_peak_over_start_gb": peak / GB,
            "groups": [{"where": w, "gb": b / GB, "tensors": n} for w, (b, n) in rows]}


def child(args) -> dict:
    """One variant in this process."""
    from qflash.bench import runner
    from qflash.bench.shapes import model_config, random_model_dir
    from qflash.paths import qflash_home

    overrides = list(args.set) + VARIANTS[args.variant]
    for o in [o for o in overrides if o.startswith("env:")]:  # env:NAME=VALUE: an experiment switch
        name, _, value = o[4:].partition("=")
        os.environ[name] = value
    runner.QFLASH_OVERRIDES[:] = [o for o in overrides if not o.startswith("env:")]
    torch.manual_seed(0)
    rec: dict = {"variant": args.variant, "overrides": overrides}
    t0 = time.perf_counter()
    model_dir = random_model_dir(args.shape, qflash_home() / "bench-models")
    docs = runner.workload_docs(args.workload, model_config(args.shape).vocab_size)
    model, optimizer, params = runner.qflash_model(model_dir, args.dropout, 2e-4, "auto", 0)
    batches = runner.qflash_batches(docs, 2048)
    torch.cuda.synchronize()
    rec["setup_s"] = time.perf_counter() - t0
    rec["allocated_after_setup_gb"] = torch.cuda.memory_allocated() / GB
    micro = (runner.qflash_loss(model, params, runner.qflash_config(args.dropout, 2e-4, "auto"))
             if args.workload == "fixed" else None)  # as runner.measure decides
    step = lambda: runner.qflash_step(model, optimizer, params, batches, micro)  # noqa: E731
    torch.cuda.reset_peak_memory_stats()
    losses, times = runner._timed(step, args.warmup, args.steps)
    rec["peak_gb"] = torch.cuda.max_memory_allocated() / GB
    rec["allocated_after_steps_gb"] = torch.cuda.memory_allocated() / GB
    rec["reserved_peak_gb"] = torch.cuda.max_memory_reserved() / GB
    rec["step_s"] = statistics.median(times)
    rec["step_times_s"] = times
    rec["tokens_per_s"] = sum(len(d) for d in docs) / rec["step_s"]
    rec["losses"] = losses
    rec["resident"] = _resident(model, optimizer)
    print(f"{args.variant}: {rec['tokens_per_s']:,.0f} tok/s (step {rec['step_s'] * 1e3:.0f} ms), "
          f"peak {rec['peak_gb']:.2f} GB, after setup {rec['allocated_after_setup_gb']:.2f} GB, "
          f"setup {rec['setup_s']:.0f}s", flush=True)
    if args.variant in args.breakdown.split(","):
        try:
            rec["breakdown"] = _breakdown(step, args)
        except Exception as e:  # noqa: BLE001 - the measurement above stands without it
            traceback.print_exc()
            rec["breakdown_error"] = f"{type(e).__name__}: {e}"
    return rec


def _breakdown(step, args) -> dict:
    """One more step under the allocator's history recorder; what it allocated and held at its peak."""
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    torch.cuda.memory._record_memory_history(max_entries=300_000, stacks="python")
    try:
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        snap = torch.cuda.memory._snapshot()
        if args.snapshot:
            torch.cuda.memory._dump_snapshot(args.snapshot)
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    live = _live_at_peak(snap, torch.cuda.current_device())
    out = {"allocated_at_step_start_gb": start / GB, "peak_of_recorded_step_gb": torch.cuda.max_memory_allocated() / GB,
           "snapshot": args.snapshot, **live}
    print(f"{args.variant}: {start / GB:.2f} GB allocated at the step's start, peak {out['peak_of_recorded_step_gb']:.2f} GB; "
          f"allocated during the step and alive at its peak: {live['step_peak_over_start_gb']:.2f} GB", flush=True)
    for g in live["groups"]:
        print(f"  {g['gb']:7.3f} GB  x{g['tensors']:4d}  {g['where']}", flush=True)
    return out


def _run_child(variant: str, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rec.json"
        cmd = [sys.executable, __file__, "--child", variant, "--child-out", str(out), "--shape", args.shape,
               "--workload", args.workload, "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--dropout", str(args.dropout)]
        for s in args.set:
            cmd += ["--set", s]
        for s in args.variant:
            cmd += ["--variant", s]
        cmd += ["--breakdown", args.breakdown]
        if args.snapshot:
            cmd += ["--snapshot", f"{args.snapshot}.{variant}.pickle"]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, timeout=args.timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
        if out.is_file():
            return json.loads(out.read_text())
        return {"variant": variant, "error": f"exit {code} after {time.perf_counter() - t0:.0f}s (output above)"}


def _git_commit() -> str | None:
    if os.environ.get("QFLASH_GIT_COMMIT"):
        return os.environ["QFLASH_GIT_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="qwen2.5-7b")
    ap.add_argument("--workload", default="fixed")
    ap.add_argument("--variants", default="baseline,offload,embedding,both")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout (0: profile_step.py's 13.4 GB setting)")
    ap.add_argument("--set", action="append", default=[], help="qflash config override for every variant, repeatable")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=KEY=VALUE[,KEY=VALUE...]",
                    help="another variant to measure (its overrides on top of --set), repeatable; name it in --variants")
    ap.add_argument("--timeout", type=int, default=420, help="seconds per variant")
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    ap.add_argument("--breakdown", default="both",
                    help="variants (comma-separated) that record one more step's allocations and print what is "
                         "alive at its peak; empty = none")
    ap.add_argument("--snapshot", help="with --breakdown: also dump the allocator snapshot to PREFIX.<variant>.pickle")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    for spec in args.variant:
        name, _, overrides = spec.partition("=")
        VARIANTS[name] = [o for o in overrides.split(",") if o]

    if not torch.cuda.is_available():
        raise SystemExit("memory_levers.py needs a CUDA GPU")
    if args.child:
        args.variant = args.child
        try:
            rec = child(args)
        except torch.OutOfMemoryError as e:
            rec = {"variant": args.child, "error": f"out of memory: {str(e).splitlines()[0]}"}
        except Exception as e:  # noqa: BLE001 - reported in the JSON, the other variants go on
            traceback.print_exc()
            rec = {"variant": args.child, "error": f"{type(e).__name__}: {e}"}
        Path(args.child_out).write_text(json.dumps(rec))
        return

    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"--variants: unknown {sorted(unknown)}; known: {', '.join(VARIANTS)}")
    from qflash.bench.runner import versions
    from qflash.bench.shapes import random_model_dir
    from qflash.paths import qflash_home

    t0 = time.perf_counter()
    random_model_dir(args.shape, qflash_home() / "bench-models")  # once, before the children race for it
    torch.cuda.empty_cache()  # the generator's blocks: the children need the GPU
    print(f"random {args.shape} weights ready in {time.perf_counter() - t0:.0f}s", flush=True)
    result = {
        "experiment": "memory_levers", "shape": args.shape, "workload": args.workload, "lora_r": 64,
        "lora_alpha": 16, "lora_dropout": args.dropout, "steps_timed": args.steps, "warmup_steps": args.warmup,
        "overrides": args.set, "device": torch.cuda.get_device_name(), "git_commit": _git_commit(),
        "versions": versions(), "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "peak": "torch.cuda.max_memory_allocated over warm-up and timed steps", "variants": [],
    }
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
    tag = torch.cuda.get_device_name().replace(" ", "-").replace("/", "-")
    path = out_dir / f"{stamp}_{args.shape}_{args.workload}_memory-levers_{tag}.json"
    records = result["variants"]
    for v in variants:
        records.append(_run_child(v, args))
        path.write_text(json.dumps(result, indent=1))  # after each variant: a cut-off run keeps what it measured

    base = next((r for r in records if r["variant"] == "baseline" and "error" not in r), None)
    print(f"\n{args.shape} {args.workload}, LoRA dropout {args.dropout}, {torch.cuda.get_device_name()}")
    print(f"{'variant':10s} {'tok/s':>8s} {'vs base':>8s} {'peak GB':>8s} {'saved GB':>9s} {'setup GB':>9s} "
          f"{'max rel loss diff':>18s}")
    for r in records:
        if "error" in r:
            print(f"{r['variant']:10s} error: {r['error']}")
            continue
        if base is not None:
            r["speed_vs_baseline"] = r["tokens_per_s"] / base["tokens_per_s"]
            r["peak_saved_gb"] = base["peak_gb"] - r["peak_gb"]
            r["max_rel_loss_diff_vs_baseline"] = max(abs(a - b) / abs(b) for a, b in zip(r["losses"], base["losses"]))
        print(f"{r['variant']:10s} {r['tokens_per_s']:8,.0f} {r.get('speed_vs_baseline', float('nan')):8.3f} "
              f"{r['peak_gb']:8.2f} {r.get('peak_saved_gb', float('nan')):9.2f} {r['allocated_after_setup_gb']:9.2f} "
              f"{r.get('max_rel_loss_diff_vs_baseline', float('nan')):18.2e}")
    ok = [r for r in records if "error" not in r]
    if ok:
        print("resident (first measured variant):", json.dumps(ok[0]["resident"]))

    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
