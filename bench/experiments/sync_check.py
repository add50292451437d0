"""Which lines of a qflash training step make the CPU wait for the GPU? (issue 5: varlen's idle GPU)

Runs the bench's qflash step on a shape/workload (warm-up steps first, so compiling is done), then one more
step under torch.cuda.set_sync_debug_mode("warn") and prints each synchronizing call once, with its count
and the Python stack that made it.

    python bench/experiments/sync_check.py --shape qwen2.5-0.5b --workload varlen
"""

from __future__ import annotations

import argparse
import traceback
import warnings
from collections import Counter

import torch

from qflash.bench import runner


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen2.5-0.5b")
    ap.add_argument("--workload", default="varlen")
    ap.add_argument("--set", action="append", default=[], help="qflash config override, repeatable")
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()

    step, _ = runner.prepared_step(args.shape, args.workload, args.set)
    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()

    sites: Counter[str] = Counter()
    original = warnings.showwarning

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchronizing" not in str(message):
            return original(message, category, filename, lineno, file, line)
        stack = [f for f in traceback.format_stack()[:-1] if "warnings.py" not in f]
        sites["".join(stack[-14:])] += 1

    warnings.showwarning = record
    warnings.simplefilter("always")
    torch.cuda.set_sync_debug_mode("warn")
    try:
        loss = step()  # its final float() is the one expected sync
    finally:
        torch.cuda.set_sync_debug_mode("default")
        warnings.showwarning = original
    print(f"{args.shape} {args.workload}: loss {loss:.4f}; {sum(sites.values())} synchronizing calls "
          f"at {len(sites)} sites in one step")
    for stack, n in sites.most_common():
        print(f"--- x{n}\n{stack}")


if __name__ == "__main__":
    main()
