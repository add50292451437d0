"""Pinned host <-> GPU copy bandwidth for one offloaded layer input (fp32 and bf16, 8192 x 3584), each way and both at once."""
import torch, time
n = 8192 * 3584
for dt, name in ((torch.float32, "fp32 layer input 117MB"), (torch.bfloat16, "bf16 58MB")):
    g = torch.randn(n, device="cuda").to(dt)
    h = torch.empty(n, dtype=dt, pin_memory=True)
    for direction in ("d2h", "h2d"):
        for _ in range(3):
            (h.copy_(g, non_blocking=True) if direction == "d2h" else g.copy_(h, non_blocking=True))
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(20):
            (h.copy_(g, non_blocking=True) if direction == "d2h" else g.copy_(h, non_blocking=True))
        torch.cuda.synchronize()
        dt_s = (time.perf_counter() - t) / 20
        print(f"{name} {direction}: {dt_s*1e3:.2f} ms, {g.numel()*g.element_size()/dt_s/1e9:.1f} GB/s")
# both directions at once on two streams
g2 = torch.randn(n, device="cuda"); h2 = torch.empty(n, pin_memory=True)
g = torch.randn(n, device="cuda"); h = torch.empty(n, pin_memory=True)
s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
torch.cuda.synchronize(); t = time.perf_counter()
for _ in range(20):
    with torch.cuda.stream(s1): h.copy_(g, non_blocking=True)
    with torch.cuda.stream(s2): g2.copy_(h2, non_blocking=True)
torch.cuda.synchronize(); dt_s = (time.perf_counter() - t) / 20
print(f"fp32 d2h+h2d concurrently: {dt_s*1e3:.2f} ms per pair")
