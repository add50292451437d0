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


WARM_UP = 4  # steps
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
        batches = qflash_batches([rng.integers(0, 512, n) for n in lengths], 1024, model)
        if compiled and i == WARM_UP:  # after warm-up: any recompile now is a failure with its reason
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
    # Packed totals and document counts differ every step (varlen: cu_seqlens and max_seqlen change). A row whose
    # documents all have one length runs cuDNN's dense kernel (attention.cudnn=auto), any other the varlen one: the
    # layer has a compiled variant per kernel (and per grad mode), so the warm-up holds rows of both kinds, with
    # one document and with several; after it, new lengths and counts of both kinds reuse them.
    steps = [(300, 200, 700), (333,), (250, 250, 250, 250), (64, 90),
             (1000, 17, 512, 3), (5, 6, 7, 8, 900), (1024, 1024), (100, 100, 100, 100, 100)]
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


def test_compiled_layer_gradients_match_eager_tensor_by_tensor(tmp_path, monkeypatch):
    """compile_layers (on by default for long runs) with every default lever on: each LoRA gradient is as close to
    the fp32 truth as plain eager bf16 training's (within 1.5x its error, or 1%). The comparison can fail: zero
    gradients, and the gradients of another batch, are both rejected by it. (CPU twin, exact in fp32:
    tests/unit/test_kernels.py::test_compiled_layer_backward_matches_eager_through_aot_autograd.)"""
    from test_gpu import _loss_and_lora_grads as _grads
    from test_gpu import _tiny_dir, rel_err

    from qflash.model import activation_offload

    monkeypatch.setattr(activation_offload, "MIN_OFFLOAD_BYTES", 0)
    # Weights of std 0.02 (as real checkpoints start): with the tiny models' usual 0.2 the network is so sensitive
    # that bf16 alone moves some LoRA gradients by half (measured: 0.53 on layer 0's k_proj B), which hid a compiled
    # backward missing the LoRA term of the input gradient (tools/mutants.py, 2026-12-07).
    model_dir = _tiny_dir(tmp_path, "qwen2", init=0.02)
    rng = np.random.default_rng(5)
    docs = [rng.integers(0, 512, n) for n in (300, 200, 700, 64, 17)]
    torch._dynamo.reset()
    truth_loss, truth = _grads(model_dir, docs, PLAIN + ["lora.fused=false", "kernels.fused_norm=false"],
                               torch.float32)
    eager_loss, eager = _grads(model_dir, docs, PLAIN, torch.bfloat16)
    compiled_loss, compiled = _grads(model_dir, docs, ["kernels.compile_layers=true"], torch.bfloat16)
    other_docs = [rng.integers(0, 512, n) for n in (300, 200, 700, 64, 17)]
    _, other = _grads(model_dir, other_docs, PLAIN, torch.bfloat16)
    assert truth.keys() == compiled.keys() == eager.keys() and len(truth) == 2 * 7 * 2
    bound = {k: max(1.5 * rel_err(eager[k], truth[k]), 1e-2) for k in truth}

    def wrong(grads) -> list[str]:
        return [k for k in truth if not (torch.isfinite(grads[k]).all() and rel_err(grads[k], truth[k]) <= bound[k])]

    worst = max(truth, key=lambda k: rel_err(compiled[k], truth[k]) / bound[k])
    print(f"compiled: worst LoRA grad rel. error {rel_err(compiled[worst], truth[worst]):.4f} (bound "
          f"{bound[worst]:.4f}, {worst}); loss compiled {compiled_loss:.6f} eager {eager_loss:.6f} "
          f"fp32 {truth_loss:.6f}")
    assert wrong(compiled) == []
    assert abs(compiled_loss - truth_loss) <= max(2 * abs(eager_loss - truth_loss), 1e-3 * truth_loss)
    assert len(wrong({k: torch.zeros_like(g) for k, g in truth.items()})) == len(truth)  # an lr=0 / no-grad run
    assert len(wrong(other)) >= len(truth) // 2  # another batch's gradients
