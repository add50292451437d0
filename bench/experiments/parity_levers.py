"""Which speed lever moves the loss? Per-step loss over N steps of qflash variants vs one reference run.

Same data (two fixed batches alternating), same initial LoRA weights, dropout 0, lr 1e-4.

    python bench/experiments/parity_levers.py --variant "" --variant "lora.fused=false" ...
"""

from __future__ import annotations

import argparse

from qflash.bench import runner
from qflash.bench.shapes import model_config, random_model_dir
from qflash.model.attention import activate
from qflash.paths import qflash_home


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen2.5-7b")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--reference", default="reference-amp")
    ap.add_argument("--variant", action="append", default=[], help="space-separated overrides; '' = defaults")
    args = ap.parse_args()
    import numpy as np

    activate("auto")
    model_dir = random_model_dir(args.shape, qflash_home() / "bench-models")
    vocab = model_config(args.shape).vocab_size
    rng = np.random.default_rng(1)
    data = [[rng.integers(0, vocab, 2048) for _ in range(4)] for _ in range(2)]
    runner.QFLASH_OVERRIDES[:] = []
    _, init = runner._losses("qflash", model_dir, data, 1, "auto", None)  # the initial LoRA weights
    runner._free()
    ref, _ = runner._losses(args.reference, model_dir, data, args.steps, "auto", init)
    runner._free()
    print(f"{args.reference}: {[round(x, 4) for x in ref]}", flush=True)
    for v in args.variant:
        import os

        words = v.split()
        for w in words:
            if w.startswith("env:"):
                key, _, val = w[4:].partition("=")
                os.environ[key] = val
        runner.QFLASH_OVERRIDES[:] = [w for w in words if not w.startswith("env:")]
        ours, _ = runner._losses("qflash", model_dir, data, args.steps, "auto", init)
        runner._free()
        for w in words:
            if w.startswith("env:"):
                os.environ.pop(w[4:].partition("=")[0], None)
        rel = [abs(a - b) / abs(b) for a, b in zip(ours, ref)]
        print(f"[{v or 'defaults'}] max rel diff {max(rel):.4%} (last step {rel[-1]:.4%}); "
              f"losses {[round(x, 4) for x in ours]}", flush=True)


if __name__ == "__main__":
    main()
