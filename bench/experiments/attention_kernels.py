"""FA2 varlen (torch) vs cuDNN attention (ragged and dense) on the 7B attention shapes: speed and agreement."""
import torch, time
from torch.nn.attention import sdpa_kernel, SDPBackend
from torch.nn.attention.varlen import varlen_attn
torch.manual_seed(0)
print("torch", torch.__version__, "cudnn", torch.backends.cudnn.version(), torch.cuda.get_device_name())
H, KV, D = 28, 4, 128
scale = D ** -0.5
def timeit(fn, n=20):
    for _ in range(3): fn()
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(n): fn()
    torch.cuda.synchronize(); return (time.perf_counter() - t) / n * 1e3

def case(name, lens):
    T = sum(lens)
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device="cuda")
    mx = max(lens)
    q = torch.randn(T, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(T, KV, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(T, KV, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(T, H, D, device="cuda", dtype=torch.bfloat16)
    def fa2():
        ke = k.repeat_interleave(H // KV, dim=1); ve = v.repeat_interleave(H // KV, dim=1)
        return varlen_attn(q, ke, ve, cu, cu, mx, mx, scale=scale, window_size=(-1, 0))
    def cudnn_ragged():
        ke = k.repeat_interleave(H // KV, dim=1); ve = v.repeat_interleave(H // KV, dim=1)
        return torch.ops.aten._cudnn_attention_forward(q, ke, ve, None, cu, cu, mx, mx, True, 0.0, True, False, scale=scale)[0]
    out = {}
    fns = {"fa2_varlen": fa2, "cudnn_ragged": cudnn_ragged}
    if len(set(lens)) == 1:
        B, S = len(lens), lens[0]
        def dense(backend, gqa):
            def f():
                qd = q.view(B, S, H, D).transpose(1, 2)
                kd = k.view(B, S, KV, D).transpose(1, 2); vd = v.view(B, S, KV, D).transpose(1, 2)
                if not gqa:
                    kd = kd.repeat_interleave(H // KV, dim=1); vd = vd.repeat_interleave(H // KV, dim=1)
                with sdpa_kernel(backend):
                    o = torch.nn.functional.scaled_dot_product_attention(qd, kd, vd, is_causal=True, scale=scale, enable_gqa=gqa)
                return o.transpose(1, 2).reshape(T, H, D)
            return f
        fns["cudnn_dense_expand"] = dense(SDPBackend.CUDNN_ATTENTION, False)
        fns["cudnn_dense_gqa"] = dense(SDPBackend.CUDNN_ATTENTION, True)
        fns["flash_dense_gqa"] = dense(SDPBackend.FLASH_ATTENTION, True)
    for n, f in fns.items():
        try:
            with torch.no_grad():
                tf = timeit(f)
            def fb():
                q.grad = k.grad = v.grad = None
                f().backward(g)
            tfb = timeit(fb)
            q.grad = k.grad = v.grad = None
            o = f(); o.backward(g)
            out[n] = (o.detach().float(), q.grad.float(), k.grad.float(), v.grad.float())
            ref = out["fa2_varlen"]
            diffs = [((a - b).norm() / b.norm()).item() for a, b in zip(out[n], ref)]
            print(f"{name:8s} {n:20s} fwd {tf:6.3f} ms  fwd+bwd {tfb:6.3f} ms  bwd~{tfb-tf:6.3f}  rel diff out/dq/dk/dv vs fa2 "
                  + " ".join(f"{d:.1e}" for d in diffs), flush=True)
        except Exception as e:
            print(f"{name:8s} {n:20s} FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)

import sys
CASES = {"fixed": [2048] * 4, "varlen": [3000, 1500, 900, 700, 500, 400, 300, 250, 200, 150, 100, 92, 60, 40],
         "long": [16384], "two": [4096, 4096], "odd": [1000, 2000, 3000, 2192]}
# one case per process: a CUDA error (the ragged cuDNN path) poisons the context for the rest
case(sys.argv[1] if len(sys.argv) > 1 else "fixed", CASES[sys.argv[1] if len(sys.argv) > 1 else "fixed"])
