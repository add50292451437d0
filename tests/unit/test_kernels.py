"""Kernels' pure-PyTorch twins against the transformers modules they replace (CPU)."""

import pytest
import torch

from qflash.kernels.rmsnorm import FusedRMSNorm, swap_rms_norms


@pytest.mark.parametrize("cls_name, shape", [("Qwen2RMSNorm", (3, 7, 64)), ("LlamaRMSNorm", (3, 7, 64)),
                                             ("MistralRMSNorm", (3, 7, 64)), ("Qwen3RMSNorm", (3, 7, 64)),
                                             ("Qwen3RMSNorm", (3, 7, 4, 128)), ("Gemma3RMSNorm", (3, 7, 64)),
                                             ("Gemma3RMSNorm", (3, 4, 7, 256))], ids=str)
def test_fused_rms_norm_equals_transformers_norm_then_cast(cls_name, shape):
    """fp32 residual in: the output is exactly transformers' fp32 norm output rounded to the compute dtype
    (what autocast would hand to the next matmul), and the input gradient matches. (3, 7, 4, 128): Qwen3's
    per-head q_norm / k_norm, over head_dim on (batch, seq, heads, head_dim); (3, 4, 7, 256) Gemma 3's (1 + w) ones
    on (batch, heads, seq, head_dim)."""
    import importlib

    module = importlib.import_module(f"transformers.models.{cls_name[:-7].lower()}.modeling_{cls_name[:-7].lower()}")
    cls = getattr(module, cls_name)
    width = shape[-1]
    torch.manual_seed(0)
    ref = cls(width, eps=1e-6)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(width) * 0.3 + 1)
    offset = 1.0 if cls_name.startswith("Gemma") else 0.0
    ours = FusedRMSNorm(ref.weight, getattr(ref, "variance_epsilon", getattr(ref, "eps", None)), compiled=False,
                        offset=offset)
    x = (torch.randn(shape) * 4).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    g = torch.randn(shape)

    want = ref(x)  # fp32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ours(x2)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, want.to(torch.bfloat16))
    # Gradients: ours receives the bf16-rounded upstream gradient (as autocast's cast would pass on).
    want.backward(g.to(torch.bfloat16).float())
    got.backward(g.to(torch.bfloat16))
    torch.testing.assert_close(x2.grad, x.grad, rtol=1e-5, atol=1e-6)

    # Without autocast (the CPU's fp32 path) it is the transformers norm itself.
    torch.testing.assert_close(ours(x.detach()), ref(x.detach()), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "mistral", "gemma3"])
def test_swap_shares_weights_and_keeps_state_dict(arch, tiny_models):
    """Every RMSNorm is swapped, Qwen3's per-head q_norm / k_norm (over head_dim) included, Gemma 3's (1 + w) ones
    (pre- and post-attention, pre- and post-feedforward, q and k) too, and the model computes what it did."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_models[arch]), dtype=torch.float32)
    keys = list(model.state_dict())
    norms = {name: m for name, m in model.named_modules() if type(m).__name__.endswith("RMSNorm")}
    ids = torch.randint(0, 100, (2, 9))
    before = model(ids).logits
    n = swap_rms_norms(model, compiled=False)
    # input and post-attention norms (+ q_norm and k_norm; + Gemma's pre- and post-feedforward norms) per layer
    per_layer = {"qwen3": 4, "gemma3": 6}.get(arch, 2)
    assert n == per_layer * 2 + 1 == len(norms)  # ... and the final norm
    if arch == "qwen3":
        assert model.model.layers[0].self_attn.k_norm.weight.shape == (128,)
    assert list(model.state_dict()) == keys
    for name, old in norms.items():  # the swapped-in norm holds the same weight tensor, not a copy
        new = model.get_submodule(name)
        assert new is not old and new.weight is old.weight, name
    torch.testing.assert_close(model(ids).logits, before, rtol=1e-5, atol=1e-5)


def test_compiling_layers_raises_the_recompile_limit(tiny_models):
    """The compiled layers' variants must never spill into silent eager fallback (dropout masks would differ
    between a compiled forward and an eager recompute); compile_decoder_layers lifts torch's limit of 8."""
    import torch._dynamo.config as dynamo_config
    from transformers import AutoModelForCausalLM

    from qflash.kernels.compile import RECOMPILE_LIMIT, compile_decoder_layers

    model = AutoModelForCausalLM.from_pretrained(str(tiny_models["qwen2"]))
    with dynamo_config.patch(recompile_limit=8):  # torch's default; patch() puts back what was there
        assert compile_decoder_layers(model) == model.config.num_hidden_layers
        assert dynamo_config.recompile_limit == RECOMPILE_LIMIT >= 64
    torch._dynamo.reset()


@pytest.mark.parametrize("checkpointing", ["offloaded", "torch", "none"])
def test_compiled_layers_run_the_layer_body_compiled(checkpointing, tiny_models, identity_subset, tmp_path):
    """kernels.compile_layers compiles the body the checkpoint runs, whichever way the installed transformers
    checkpoints (around __call__, or inside each layer class's forward: there, compiling the module would only
    compile a wrapper that graph-breaks into the checkpoint, and the body would run eagerly). Seen through a
    recording backend: the MLP's SiLU and the attention projections are in captured graphs, and the loss and
    LoRA gradients are those of the uncompiled model."""
    from test_memory_levers import _setup

    from qflash.kernels.compile import compile_decoder_layers
    from qflash.model.activation_offload import offload_checkpointed_layers
    from qflash.train.loop import micro_batches
    from qflash.train.loss import loss_sum

    def loss_and_grads(setup):
        batch = micro_batches(setup, list(range(8)))[0]
        loss = loss_sum(setup.model, batch, fused_ce=setup.levers.fused_ce.on)
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in setup.model.named_parameters() if p.requires_grad}

    runs, graphs = {}, []

    def recording(gm, example_inputs):
        graphs.append(gm.code)
        return gm.forward

    for compiled in (False, True):
        setup = _setup(tiny_models["qwen2"], identity_subset, tmp_path / str(compiled),
                       f"train.gradient_checkpointing={str(checkpointing != 'none').lower()}")
        if checkpointing == "offloaded":
            offload_checkpointed_layers(setup.model)
        if compiled:
            torch._dynamo.reset()
            assert compile_decoder_layers(setup.model, backend=recording) == setup.model.config.num_hidden_layers
        runs[compiled] = loss_and_grads(setup)
    torch._dynamo.reset()
    code = "\n".join(graphs)
    # the MLP's activation and the attention's projections were traced (not only a wrapper around them)
    assert "silu" in code and "q_proj" in code, code[:3000]
    (loss, grads), (ref_loss, ref_grads) = runs[True], runs[False]
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    for n, g in ref_grads.items():
        torch.testing.assert_close(grads[n], g, rtol=1e-5, atol=1e-7, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("checkpointing", ["torch", "none"])
def test_compiled_layer_backward_matches_eager_through_aot_autograd(checkpointing, tiny_models, identity_subset,
                                                                    tmp_path):
    """The CPU twin of tests/gpu/test_compile.py's gradient check: with AOTAutograd tracing the backward too (the
    aot_eager backend: what Inductor compiles, run as traced ops), each LoRA gradient of the compiled layers equals
    the eager one tensor by tensor (fp32, 1e-5). The comparison can fail: zero gradients and another batch's are
    both rejected by it."""
    from test_memory_levers import _setup

    from qflash.kernels.compile import compile_decoder_layers
    from qflash.train.loop import micro_batches
    from qflash.train.loss import loss_sum

    def grads(setup, ids):
        setup.model.zero_grad(set_to_none=True)
        loss_sum(setup.model, micro_batches(setup, ids)[0], fused_ce=setup.levers.fused_ce.on).backward()
        return {n: p.grad.clone() for n, p in setup.model.named_parameters() if p.requires_grad}

    flag = f"train.gradient_checkpointing={str(checkpointing != 'none').lower()}"
    eager_setup = _setup(tiny_models["qwen2"], identity_subset, tmp_path / "eager", flag)
    eager, other = grads(eager_setup, list(range(8))), grads(eager_setup, list(range(8, 16)))
    setup = _setup(tiny_models["qwen2"], identity_subset, tmp_path / "compiled", flag)
    torch._dynamo.reset()
    try:
        compile_decoder_layers(setup.model, backend="aot_eager")
        compiled = grads(setup, list(range(8)))
    finally:
        torch._dynamo.reset()

    def mismatched(got) -> list[str]:
        return [n for n, g in eager.items() if not torch.allclose(got[n], g, rtol=1e-5, atol=1e-7)]

    assert mismatched(compiled) == []
    assert len(mismatched({n: torch.zeros_like(g) for n, g in eager.items()})) == len(eager)
    assert len(mismatched(other)) == len(eager)


def test_compile_layers_auto_compiles_only_runs_long_enough_to_pay():
    """kernels.compile_layers=auto: the run's planned optimizer steps against PAYS_FROM_STEPS (measured on an H100);
    true and false are obeyed; the reason says how to compile anyway."""
    from qflash.kernels.compile import PAYS_FROM_STEPS, compile_pays

    assert compile_pays("auto", PAYS_FROM_STEPS)[0] and not compile_pays("auto", PAYS_FROM_STEPS - 1)[0]
    off, why = compile_pays("auto", 44)
    assert not off and "44 steps" in why and "kernels.compile_layers=true" in why
    assert compile_pays(True, 1) == (True, "kernels.compile_layers=true")
    assert compile_pays(False, 10**9)[0] is False
    with pytest.raises(ValueError):
        compile_pays("yes", 1)
