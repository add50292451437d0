"""GPU tier: kernels.compile_layers in training, with every other default lever on (activation offload,
embedding on the host, lean recompute, fused lm_head + CE) — packed batches of changing lengths reuse the
compiled layers (no recompile after the first steps), the layers really run compiled, and the losses are
those of plain eager training with every lever off (bf16 tolerance)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


PLAIN = ["kernels.compile_layers=false", "kernels.lean_recompute=false", "kernels.fused_ce=false",
         "train.offload_activations=false", "train.embedding_on_cpu=false"]


def _losses(model_dir, compiled: bool, lengths_per_step, offload: bool = True, in_graph: bool = False) -> list[float]:
    from qflash.bench import runner
    from qflash.bench.runner import qflash_batches, qflash_model, qflash_step

    runner.QFLASH_OVERRIDES[:] = (["kernels.compile_layers=true", f"train.offload_activations={str(offload).lower()}",
                                   f"kernels.lean_tail_in_graph={str(in_graph).lower()}"]
                                  if compiled else PLAIN)
    try:
        model, optimizer, params = qflash_model(model_dir, dropout=0.0, lr=1e-3, attention="auto", seed=0)
    finally:
        runner.QFLASH_OVERRIDES[:] = []
    rng = np.random.default_rng(0)
    losses = []
    for i, lengths in enumerate(lengths_per_step):
        batches = qflash_batches([rng.integers(0, 512, n) for n in lengths], 1024)
        if compiled and i == 2:  # after warm-up: any recompile now is a failure with its reason
            torch._dynamo.config.error_on_recompile = True
        losses.append(qflash_step(model, optimizer, params, batches))
    return losses


@pytest.mark.parametrize("offload, in_graph", [(True, False), (True, True), (False, False)],
                         ids=["offloaded-checkpoint", "offloaded-lean-tail-in-graph", "torch-checkpoint"])
def test_compiled_layers_take_any_packed_length_without_recompiling(offload, in_graph, tmp_path, monkeypatch):
    """With torch's checkpoint the recompute must save what the forward saved (the lean tail runs outside
    the compiled graph for that); with the offloaded one it backprops through its own recompute (and may trace
    the lean tail into it: kernels.lean_tail_in_graph)."""
    from test_gpu import _tiny_dir

    from qflash.model import activation_offload

    monkeypatch.setattr(activation_offload, "MIN_OFFLOAD_BYTES", 0)  # the tiny layers' inputs really leave

    model_dir = _tiny_dir(tmp_path, "qwen2")
    # packed totals and document counts differ every step (varlen: cu_seqlens and max_seqlen change)
    steps = [(300, 200, 700), (64, 90), (1000, 17, 512, 3), (5, 6, 7, 8, 900), (333,), (1024, 1024), (250, 250, 250, 250)]
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    try:
        compiled = _losses(model_dir, True, steps, offload, in_graph)
    finally:
        torch._dynamo.config.error_on_recompile = False
    # the layers ran compiled (inside the offloaded checkpoint too): graphs were captured and called
    assert counters["stats"]["unique_graphs"] >= 1 and counters["frames"]["ok"] >= 1, dict(counters["stats"])
    eager = _losses(model_dir, False, steps)
    for c, e in zip(compiled, eager):
        assert c == pytest.approx(e, rel=2e-2), (compiled, eager)


@pytest.mark.parametrize("shape", [(512, 3584), (18944, 3584), (37, 129)])
def test_traced_dequant_matches_bitsandbytes_cuda_kernel(shape):
    """kernels.traced_dequant: the tensor-op NF4 dequantization, eager and compiled by Inductor (one fused
    kernel), equals bitsandbytes' CUDA kernel bit for bit (double quantization, bf16)."""
    import bitsandbytes.functional as bnbf

    from qflash.kernels.nf4 import dequantize_nf4

    g = torch.Generator(device="cuda").manual_seed(0)
    w = (torch.randn(shape, generator=g, device="cuda") * 0.02).to(torch.bfloat16)
    packed, qs = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4",
                                    quant_storage=torch.uint8)
    want = bnbf.dequantize_4bit(packed, qs)
    eager = dequantize_nf4(packed, qs)
    torch._dynamo.reset()
    compiled = torch.compile(dequantize_nf4, dynamic=True)(packed, qs)
    for got in (eager, compiled):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got.view(torch.int16), want.view(torch.int16))
