"""Where does a qflash training step spend its GPU time? (issue 5 groundwork)

Runs the bench's qflash step on a shape/workload, then one step under torch.profiler, and prints:
wall time per step, the sum of GPU kernel time (the gap = GPU idle, i.e. launch/CPU bound), and kernel
time grouped into categories (GEMM, NF4 dequant, attention, elementwise/norm, reductions, copies).

    python bench/experiments/profile_step.py --shape qwen2.5-7b --workload fixed --set quant.residual_dtype=fp32
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict

import torch

from qflash.bench import runner

CATEGORIES = [
    ("gemm", ("gemm", "cutlass", "sm90_xmma", "nvjet", "cublas", "ampere_bf16", "sm80_xmma")),
    ("nf4-dequant", ("dequantize", "kDequantize", "kdequant")),
    ("attention", ("flash", "fmha", "attention", "varlen")),
    ("cross-entropy", ("cross_entropy", "log_softmax", "nll_loss", "softmax")),
    ("copy/cast", ("copy", "cast", "to_copy", "convert")),
    ("reduce", ("reduce", "sum", "mean", "norm")),
    ("elementwise", ("elementwise", "vectorized", "unrolled", "mul", "add", "silu", "pow", "rsqrt")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
]


def categorize(name: str) -> str:
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(k.lower() in low for k in keys):
            return cat
    return "other"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen2.5-7b")
    ap.add_argument("--workload", default="fixed")
    ap.add_argument("--set", action="append", default=[], help="qflash config override, repeatable")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--trace", help="write a chrome trace here")
    ap.add_argument("--gaps", action="store_true", help="where the GPU sits idle, and CPU self time (trace_gaps.py)")
    ap.add_argument("--no-stack", action="store_true",
                    help="profile without Python stacks (their overhead makes the CPU look later than it is)")
    ap.add_argument("--stacks", default="Memcpy DtoD",
                    help="for kernels whose name contains this: GPU time by the CPU op and Python stack that launched them")
    args = ap.parse_args()

    step, docs = runner.prepared_step(args.shape, args.workload, args.set)
    torch.cuda.reset_peak_memory_stats()
    _, times = runner._timed(step, 2, args.steps)
    wall = statistics.median(times)
    tokens = sum(len(d) for d in docs)
    print(f"{args.shape} {args.workload} {' '.join(args.set) or 'defaults'}: step {wall * 1e3:.0f} ms, "
          f"{tokens / wall:,.0f} tok/s, peak {torch.cuda.max_memory_allocated() / 1e9:.1f} GB", flush=True)

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                 with_stack=not args.no_stack and (bool(args.stacks) or args.gaps)) as prof:
        step()
        torch.cuda.synchronize()
    trace = args.trace or ("/tmp/qflash-profile-trace.json" if args.gaps else None)
    if trace:
        prof.export_chrome_trace(trace)
    if args.gaps:
        import json

        from trace_gaps import analyze

        with open(trace, encoding="utf-8") as f:
            print(analyze(json.load(f), top=args.top), flush=True)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.device_time for e in kernels) / 1e3  # ms
    by_cat: dict[str, float] = defaultdict(float)
    by_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for e in kernels:
        by_cat[categorize(e.name)] += e.device_time / 1e3
        by_name[e.name][0] += e.device_time / 1e3
        by_name[e.name][1] += 1
    print(f"GPU kernel time {total:.0f} ms of {wall * 1e3:.0f} ms wall ({total / wall / 10:.0f}% busy), "
          f"{len(kernels)} kernels")
    for cat, ms in sorted(by_cat.items(), key=lambda kv: -kv[1]):
        print(f"  {cat:14s} {ms:8.1f} ms  {ms / total:6.1%}")
    print("top kernels:")
    for name, (ms, n) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[: args.top]:
        print(f"  {ms:8.1f} ms  x{n:5d}  [{categorize(name)}] {name[:150]}")
    if args.stacks:
        print(f"kernels matching {args.stacks!r}, by the CPU op and Python stack that launched them:")
        by_site: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
        for e in prof.events():
            if e.device_type != torch.autograd.DeviceType.CPU:
                continue
            ms = sum(k.duration for k in e.kernels if args.stacks in k.name) / 1e3
            if ms:
                frames = [f for f in (e.stack or []) if "torch/" not in f or "_inductor" in f][:4]
                site = f"{e.name} <- " + " <- ".join(frames)
                by_site[site][0] += ms
                by_site[site][1] += 1
        for site, (ms, n) in sorted(by_site.items(), key=lambda kv: -kv[1][0])[:12]:
            print(f"  {ms:8.1f} ms  x{n:5d}  {site[:400]}")


if __name__ == "__main__":
    main()
