"""kernels.lean_recompute (CPU): the activation-checkpoint recompute skips mlp.down_proj's GEMMs, and the
loss and LoRA gradients stay those of plain checkpointing (and of no checkpointing)."""

import pytest
import torch

from qflash.kernels.compile import compile_decoder_layers
from qflash.model import fused_lora
from qflash.model.activation_offload import offload_checkpointed_layers
from qflash.train.loop import micro_batches
from qflash.train.loss import loss_sum
from test_memory_levers import _setup


def _run(model_dir, data, out, monkeypatch, *extra):
    """The memory-lever tests' setup (random LoRA B, training mode) with LoRA dropout 0.1."""
    return _setup(model_dir, data, out, "lora.dropout=0.1", *extra)


def _loss_grads_gemms(setup, batch, monkeypatch, count: bool = True):
    """Loss, LoRA gradients, and how many times each projection kind ran its base GEMM (a dequantize)."""
    calls: dict[str, int] = {}
    real = fused_lora._dequantize
    # By the weight's (out, in) shape, a plain tuple dynamo reads as a constant when the layers are compiled
    # (the tiny model's shapes: q/o, k/v and gate/up share theirs; down_proj's is its own).
    kinds: dict[tuple, str] = {}
    for n, m in setup.model.named_modules():
        if isinstance(m, fused_lora.FusedLoraLinear4bit):
            key, kind = tuple(m.base_layer.weight.quant_state.shape), n.rsplit(".", 1)[-1]
            kinds[key] = "+".join(sorted(set(kinds.get(key, kind).split("+")) | {kind}))

    def counting(weight, quant_state, traced=False):
        kind = kinds[tuple(quant_state.shape)]
        calls[kind] = calls.get(kind, 0) + 1
        return real(weight, quant_state, traced)

    if count:
        monkeypatch.setattr(fused_lora, "_dequantize", counting)
    torch.manual_seed(11)  # the LoRA dropout masks
    loss = loss_sum(setup.model, batch, fused_ce=setup.levers.fused_ce.on)
    loss.backward()
    monkeypatch.setattr(fused_lora, "_dequantize", real)
    grads = {n: p.grad.clone() for n, p in setup.model.named_parameters() if p.requires_grad}
    return loss.item(), grads, calls


@pytest.mark.parametrize("arch, offload", [("qwen2", False), ("llama", False), ("qwen3", False), ("qwen2", True)])
def test_lean_recompute_skips_down_proj_and_keeps_gradients(arch, offload, tiny_models, identity_subset, tmp_path,
                                                            monkeypatch):
    results = {}
    for variant in ("no-checkpointing", "lean", "full"):
        setup = _run(tiny_models[arch], identity_subset, tmp_path / variant, monkeypatch,
                     f"train.gradient_checkpointing={str(variant != 'no-checkpointing').lower()}",
                     f"kernels.lean_recompute={str(variant == 'lean').lower()}")
        marked = {n for n, m in setup.model.named_modules() if getattr(m, "lean_tail", False)}
        layers = setup.model.config.num_hidden_layers
        if variant == "lean":
            assert len(marked) == layers and all(n.endswith("mlp.down_proj") for n in marked), marked
        else:
            assert not marked
        if offload and variant != "no-checkpointing":
            assert offload_checkpointed_layers(setup.model) == layers
        results[variant] = _loss_grads_gemms(setup, micro_batches(setup, list(range(8)))[0], monkeypatch)

    (ref_loss, ref_grads, plain), (lean_loss, lean_grads, lean), (_, _, full) = (
        results["no-checkpointing"], results["lean"], results["full"])
    layers = setup.model.config.num_hidden_layers
    # forward + backward without checkpointing; + a recompute with it; the lean recompute has no down_proj GEMM
    assert plain["down_proj"] == 2 * layers and full["down_proj"] == 3 * layers, (plain, full)
    assert lean["down_proj"] == 2 * layers and lean["gate_proj+up_proj"] == full["gate_proj+up_proj"] == 6 * layers, (
        lean, full)
    assert abs(lean_loss - ref_loss) <= 1e-6 * abs(ref_loss)
    for n, g in ref_grads.items():
        assert g.abs().max() > 0, n
        torch.testing.assert_close(lean_grads[n], g, rtol=1e-5, atol=1e-6 * g.abs().max().item(),
                                   msg=lambda m: f"{n}: {m}")


def test_lean_tail_is_left_alone_outside_a_recompute(tiny_models, identity_subset, tmp_path, monkeypatch):
    """A marked projection computes its output in a plain forward (eval, no checkpointing), and the
    recompute flag is off again after an exception inside it."""
    setup = _run(tiny_models["qwen2"], identity_subset, tmp_path / "run", monkeypatch, "kernels.lean_recompute=true")
    down = next(m for n, m in setup.model.named_modules() if n.endswith("layers.0.mlp.down_proj"))
    assert down.lean_tail
    setup.model.eval()  # no dropout: the two calls below must agree
    x = torch.randn(2, 3, down.in_features)
    want = down(x)
    with pytest.raises(RuntimeError, match="boom"), fused_lora.recomputing():
        assert fused_lora._RECOMPUTE.active
        raise RuntimeError("boom")
    assert not fused_lora._RECOMPUTE.active
    torch.testing.assert_close(down(x), want)
    assert want.abs().max() > 0


@pytest.mark.parametrize("offload, in_graph", [(False, False), (True, False), (True, True)])
def test_lean_recompute_inside_compiled_layers(offload, in_graph, tiny_models, identity_subset, tmp_path, monkeypatch):
    """Compiled decoder layers (aot_eager_decomp_partition: the min-cut partitioned graphs inductor gets) under
    torch's checkpoint, which requires the recompute to save what the forward saved (the lean tail runs
    outside the graph), and under the offloaded one (outside, or traced into the recompute's graph): the
    recompute skips down_proj's GEMMs, and the gradients are those of uncompiled full recompute. The NF4
    weights are dequantized by traced tensor ops inside the graphs (kernels.traced_dequant, the default)."""
    results = {}
    layers = None
    for variant in ("full-eager", "lean-compiled"):
        lean = variant.startswith("lean")
        # LoRA dropout 0: compiled code draws other dropout masks than eager code, which the comparison needs equal
        setup = _run(tiny_models["qwen2"], identity_subset, tmp_path / variant, monkeypatch, "lora.dropout=0",
                     "train.gradient_checkpointing=true", f"kernels.lean_recompute={str(lean).lower()}")
        if offload:
            offload_checkpointed_layers(setup.model)
            if lean:  # as the trainer orders it: checkpointing first, then the LoRA layers are marked
                fused_lora.mark_lean_tails(setup.model, in_graph=in_graph)
        layers = setup.model.config.num_hidden_layers
        tails = [m for m in setup.model.modules() if getattr(m, "lean_tail", False)]
        assert all(m.lean_in_graph == in_graph for m in tails) and len(tails) == lean * 2, tails
        if lean:
            torch._dynamo.reset()
            # the way training compiles them (on newer transformers the body under the checkpoint, not a wrapper)
            assert compile_decoder_layers(setup.model, backend="aot_eager_decomp_partition") == layers
        # Under torch's checkpoint, tracing the counting wrapper around the dequantization sends dynamo into an
        # endless recursion through bitsandbytes' Params4bit.__torch_function__ (transformers 5.23; without the
        # wrapper the same compiled training runs): that case checks the gradients only.
        results[variant] = _loss_grads_gemms(setup, micro_batches(setup, list(range(8)))[0], monkeypatch,
                                             count=offload or not lean)
    torch._dynamo.reset()
    (ref_loss, ref_grads, full), (loss, grads, lean) = results["full-eager"], results["lean-compiled"]
    assert full["down_proj"] == 3 * layers, full
    if offload:
        assert lean["down_proj"] == 2 * layers, (full, lean)
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss)
    for n, g in ref_grads.items():
        torch.testing.assert_close(grads[n], g, rtol=1e-4, atol=1e-5 * g.abs().max().item(), msg=lambda m: f"{n}: {m}")
