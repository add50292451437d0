"""The fused NF4 + LoRA layer against PEFT's own 4-bit LoRA layer (CPU, fp32 compute)."""

import pytest
import torch

from conftest import tiny_config
from qflash.model.fused_lora import FusedLoraLinear4bit, NF4LoraLinear
from qflash.train.loop import build_setup, micro_batches
from qflash.train.loss import loss_sum


def _nf4_layer(out_f: int, in_f: int, bias: bool, seed: int):
    """A bitsandbytes NF4 linear (double quant) with random weights, quantized on the CPU."""
    import bitsandbytes as bnb

    torch.manual_seed(seed)
    layer = bnb.nn.Linear4bit(in_f, out_f, bias=bias, compute_dtype=torch.float32, quant_type="nf4",
                              compress_statistics=True)
    return layer.to("cpu")  # moving to a device is what quantizes Params4bit


@pytest.mark.parametrize("bias, separate_lora_input", [(True, False), (False, True)])
def test_function_matches_unfused_math(bias, separate_lora_input):
    """Outputs and every gradient equal the plain composition dequant-linear + s * B(A(x))."""
    import bitsandbytes.functional as bnbf

    layer = _nf4_layer(24, 40, bias, seed=0)
    w = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    torch.manual_seed(1)
    x = torch.randn(3, 5, 40, requires_grad=True)
    xl = (torch.randn(3, 5, 40) if separate_lora_input else None)
    if xl is not None:
        xl.requires_grad_()
    a = torch.randn(8, 40, requires_grad=True)
    b = torch.randn(24, 8, requires_grad=True)
    s, g = 0.7, torch.randn(3, 5, 24)

    y = NF4LoraLinear.apply(x, xl, layer.weight, layer.weight.quant_state, layer.bias, a, b, s, torch.float32, False)
    y.backward(g)
    got = [y.detach(), x.grad, a.grad, b.grad] + ([xl.grad] if xl is not None else [])

    for t in (x, a, b) + ((xl,) if xl is not None else ()):
        t.grad = None
    ref = torch.nn.functional.linear(x, w, layer.bias) + ((x if xl is None else xl) @ a.t() @ b.t()) * s
    ref.backward(g)
    want = [ref.detach(), x.grad, a.grad, b.grad] + ([xl.grad] if xl is not None else [])
    for name, u, v in zip(["y", "grad_x", "grad_A", "grad_B", "grad_x_lora"], got, want):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("arch, switch", [("qwen2", "lora.rslora=false"), ("llama", "lora.rslora=false"),
                                          ("qwen3", "lora.rslora=false"), ("mistral", "lora.rslora=false"),
                                          ("gemma3", "lora.rslora=false"),
                                          ("qwen2", "lora.rslora=true"), ("qwen2", "lora.dora=true")])
def test_fused_model_matches_peft_loss_and_lora_grads(arch, switch, tiny_models, identity_subset, tmp_path):
    """A whole tiny NF4 model: the fused layers give PEFT's loss and LoRA gradients, and keep its names; under
    rsLoRA (scale alpha/sqrt(r), 5.66 here, not alpha/r = 2) too; DoRA is left to PEFT's own layer."""
    results = {}
    dora = switch == "lora.dora=true"
    for fused in (True, False):
        # DoRA with lora.fused left at its default (an explicit lora.fused=true with DoRA is refused by the config)
        fused_key = [] if (dora and fused) else [f"lora.fused={str(fused).lower()}"]
        cfg = tiny_config(tiny_models[arch], identity_subset, tmp_path / f"run{fused}", *fused_key, "lora.dropout=0.0",
                          switch)
        setup = build_setup(cfg)
        kinds = {type(m).__name__ for m in setup.model.modules() if hasattr(m, "lora_A")}
        assert kinds == ({"FusedLoraLinear4bit"} if fused and not dora else {"Linear4bit"}), kinds
        # LoRA B starts at zero; give it values so the update is visible in the loss.
        with torch.no_grad():
            gen = torch.Generator().manual_seed(3)
            for n, p in sorted(setup.model.named_parameters()):
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
        batch = micro_batches(setup, list(range(8)))[0]
        loss = loss_sum(setup.model, batch, fused_ce=setup.levers.fused_ce.on)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in setup.model.named_parameters() if p.requires_grad}
        results[fused] = (loss.item(), grads)
    (lf, gf), (lu, gu) = results[True], results[False]
    assert gf.keys() == gu.keys() and len(gf) == 2 * 7 * (3 if dora else 2)
    assert abs(lf - lu) <= 1e-4 * abs(lu), (lf, lu)
    for n in gu:
        torch.testing.assert_close(gf[n], gu[n], rtol=1e-4, atol=1e-4 * gu[n].abs().max().item(), msg=lambda m: f"{n}: {m}")


def test_fused_layer_falls_back_when_adapter_disabled(tiny_models, identity_subset, tmp_path):
    cfg = tiny_config(tiny_models["qwen2"], identity_subset, tmp_path / "run")
    setup = build_setup(cfg)
    layer = next(m for m in setup.model.modules() if isinstance(m, FusedLoraLinear4bit))
    x = torch.randn(2, 3, layer.in_features)
    with torch.no_grad():
        layer.lora_B["default"].weight.fill_(0.1)
        with setup.model.disable_adapter():
            off = layer(x)
        on = layer(x)
        base = layer.base_layer(x)
    torch.testing.assert_close(off, base)
    assert (on - base).abs().max() > 1e-3


def test_accumulating_gemms_are_opaque_ops_under_compile():
    """update_then_base / grad_input: the ops equal the plain math, pass torch's op checks (fake shapes for
    dynamic compile), and a traced call (aot_eager: functionalized like inductor's input) gives the eager values."""
    from qflash.model import fused_lora

    torch.manual_seed(0)
    x, w, xa, b = torch.randn(10, 8), torch.randn(6, 8), torch.randn(10, 4), torch.randn(6, 4)
    g, gb, a = torch.randn(10, 6), torch.randn(10, 4), torch.randn(4, 8)
    want_y, want_gx = x @ w.t() + 0.5 * (xa @ b.t()), g @ w + 0.5 * (gb @ a)
    for fn in (fused_lora.update_then_base, fused_lora._update_then_base_op):
        torch.testing.assert_close(fn(x, w, xa, b, 0.5), want_y)
    for fn in (fused_lora.grad_input, fused_lora._grad_input_op):
        torch.testing.assert_close(fn(g, w, gb, a, 0.5), want_gx)
    torch.library.opcheck(fused_lora._update_then_base_op, (x, w, xa, b, 0.5))
    torch.library.opcheck(fused_lora._grad_input_op, (g, w, gb, a, 0.5))

    def both(*t):
        return fused_lora.update_then_base(*t[:4], 0.5), fused_lora.grad_input(*t[4:], 0.5)

    graphs = []

    def recording(gm, example_inputs):
        graphs.append(str(gm.graph))
        return torch._dynamo.backends.debugging.aot_eager(gm, example_inputs)

    torch._dynamo.reset()
    y, gx = torch.compile(both, backend=recording, dynamic=True)(x, w, xa, b, g, w, gb, a)
    torch.testing.assert_close(y, want_y)
    torch.testing.assert_close(gx, want_gx)
    assert len(graphs) == 1 and "qflash.update_then_base" in graphs[0] and "qflash.grad_input" in graphs[0], graphs


def test_fp32_output_projection_sums_base_and_update_in_fp32():
    """Projections writing into an fp32 residual (o_proj, down_proj under quant.residual_dtype=fp32): base GEMM and
    scaled LoRA update summed in fp32 from 16-bit operands, eagerly and through the op torch.compile sees."""
    from qflash.model import fused_lora

    torch.manual_seed(0)
    x, w = torch.randn(64, 32).bfloat16(), torch.randn(48, 32).bfloat16()
    xa, b = torch.randn(64, 4).bfloat16(), torch.randn(48, 4).bfloat16()
    want = x.double() @ w.double().t() + 0.25 * (xa.double() @ b.double().t())
    for fn in (fused_lora._update_then_base_fp32, torch.ops.qflash.update_then_base_fp32,
               fused_lora.update_then_base_fp32):
        for autocast in (False, True):  # CPU autocast (bf16 training on the CPU) must not round the sum
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                got = fn(x, w, xa, b, 0.25)
            assert got.dtype == torch.float32 and got.shape == (64, 48)
            assert (got.double() - want).abs().max() < 1e-5 * want.abs().max()
    # rounded to bf16 before the sum, the update would lose bits: the fp32 sum is not that
    rounded = (x.float() @ w.float().t()).bfloat16().double() + 0.25 * (xa.double() @ b.double().t())
    assert (rounded - want).abs().max() > 1e-3 * want.abs().max()
