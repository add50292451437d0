"""Micro-benchmark of one Qwen2.5-7B decoder layer's projections at 8192 tokens (issue 5 groundwork).

For each projection: the plain bf16 GEMM (the floor), bitsandbytes' NF4 dequantize alone, and the
NF4 linear forward + input-gradient backward as training runs it (bnb matmul_4bit), with and
without a LoRA r=64 branch through PEFT-style math.

    python bench/experiments/linear_micro.py
"""

from __future__ import annotations

import torch


def timeit(fn, reps: int = 20) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps  # ms


def main() -> None:
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    tokens, hidden, inter, kv = 8192, 3584, 18944, 512
    shapes = {"q/o": (hidden, hidden), "k/v": (kv, hidden), "gate/up": (inter, hidden), "down": (hidden, inter)}
    dev = "cuda"
    print(f"{torch.cuda.get_device_name()}, {tokens} tokens, bf16")
    total = {"gemm": 0.0, "dequant": 0.0, "nf4_fwd_bwd": 0.0, "lora_fwd_bwd": 0.0}
    count = {"q/o": 2, "k/v": 2, "gate/up": 2, "down": 1}
    for name, (out_f, in_f) in shapes.items():
        w = torch.randn(out_f, in_f, device=dev, dtype=torch.bfloat16) * 0.02
        x = torch.randn(tokens, in_f, device=dev, dtype=torch.bfloat16, requires_grad=True)
        g = torch.randn(tokens, out_f, device=dev, dtype=torch.bfloat16)
        q, state = F.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
        a = (torch.randn(64, in_f, device=dev) * 0.01).requires_grad_()
        b = (torch.randn(out_f, 64, device=dev) * 0.01).requires_grad_()

        gemm = timeit(lambda: x @ w.t())
        deq = timeit(lambda: F.dequantize_4bit(q, state))

        def nf4_step():
            y = bnb.matmul_4bit(x, q.t(), quant_state=state)
            y.backward(g)

        def lora_step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = bnb.matmul_4bit(x, q.t(), quant_state=state) + (x @ a.t()) @ b.t() * 0.25
            y.backward(g)

        nf4 = timeit(nf4_step)
        lora = timeit(lora_step)
        flops = 2 * tokens * in_f * out_f
        print(f"{name:8s} gemm {gemm:6.2f} ms ({flops / gemm / 1e9:5.0f} TFLOP/s) | dequant {deq:5.2f} ms | "
              f"nf4 fwd+bwd {nf4:6.2f} ms (2 gemms = {2 * gemm:6.2f}) | +lora {lora:6.2f} ms")
        for k, v in (("gemm", gemm), ("dequant", deq), ("nf4_fwd_bwd", nf4), ("lora_fwd_bwd", lora)):
            total[k] += v * count[name]
    print("per layer (7 projections):", {k: round(v, 2) for k, v in total.items()})
    print("x 28 layers:", {k: round(v * 28, 1) for k, v in total.items()}, "ms")


if __name__ == "__main__":
    main()
