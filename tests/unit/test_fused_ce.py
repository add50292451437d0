"""The fused lm_head + cross-entropy (kernels.fused_ce) against the checkpointed chunks it replaces (CPU)."""

import logging

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from conftest import tiny_config
from qflash import once
from qflash.data.batching import pack_rows
from qflash.data.template import IGNORE
from qflash.train import loss as loss_mod
from qflash.train.loop import build_setup
from qflash.train.loss import LinearCrossEntropy, fused_ce_rows, linear_cross_entropy, loss_sum

VOCAB, HIDDEN = 97, 32
SCALE = 0.37  # a loss scale, as the loop's 1 / n_tokens: backward must apply grad_output


def _random_problem(rows: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(HIDDEN, VOCAB, bias=False).requires_grad_(False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(VOCAB, HIDDEN, generator=gen) * 0.3)
    hidden = torch.randn(rows, HIDDEN, generator=gen)
    labels = torch.randint(0, VOCAB, (rows,), generator=gen)
    return head, hidden, labels


def _checkpointed_chunks(head, hidden, labels, chunk):
    """Today's path (loss_sum with kernels.fused_ce off): lm_head per chunk under checkpointing."""
    total = hidden.new_zeros((), dtype=torch.float32)
    for s in range(0, hidden.size(0), chunk):
        total = total + checkpoint(loss_mod._ce_chunk, head, hidden[s : s + chunk], labels[s : s + chunk],
                                   use_reentrant=False)
    return total


def _loss_and_grad(fn, hidden, autocast: bool):
    x = hidden.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = fn(x)
    (loss * SCALE).backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("rows, chunk", [(50, 7), (50, 50), (50, 64), (50, 1), (1, 1), (1, 16)])
def test_function_matches_checkpointed_chunks(rows, chunk, autocast):
    head, hidden, labels = _random_problem(rows, seed=rows + chunk)
    want_loss, want_grad = _loss_and_grad(lambda x: _checkpointed_chunks(head, x, labels, 1024), hidden, autocast)
    got_loss, got_grad = _loss_and_grad(lambda x: linear_cross_entropy(x, head.weight, labels, chunk), hidden,
                                        autocast)
    assert got_loss.dtype == torch.float32 and got_grad.dtype == hidden.dtype
    assert head.weight.grad is None
    if autocast:  # the same bf16 logits; the loss scale rounds after the bf16 GEMM instead of before it
        torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_grad, want_grad, rtol=2e-2, atol=2e-2 * want_grad.abs().max().item())
    else:
        torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-6 * want_grad.abs().max().item())
    assert want_grad.abs().max() > 0


def test_bf16_hidden_gets_a_bf16_gradient_and_the_bf16_logits():
    head, hidden, labels = _random_problem(20, seed=5)
    head = head.to(torch.bfloat16)
    x = hidden.to(torch.bfloat16)
    want_loss, want_grad = _loss_and_grad(lambda h: _checkpointed_chunks(head, h, labels, 1024), x, False)
    got_loss, got_grad = _loss_and_grad(lambda h: linear_cross_entropy(h, head.weight, labels, 6), x, False)
    assert got_grad.dtype == torch.bfloat16
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_grad.float(), want_grad.float(), rtol=2e-2, atol=2e-2 * want_grad.abs().max().item())


def test_chunk_rows_bound_the_fp32_logits():
    assert fused_ce_rows(152064) == 384  # Qwen2.5: 441 rows fit in 2**26 logits, 384 = a multiple of 64
    assert fused_ce_rows(49152) == 1344
    assert fused_ce_rows(2**27) == 1
    for vocab in (32000, 128256, 152064, 262144, 5):
        assert fused_ce_rows(vocab) * vocab <= loss_mod.FUSED_CE_ELEMENTS


# ---------------------------------------------------------------------------------------------
# Whole tiny models through loss_sum


class _Counters:
    """How often loss_sum ran a fused chunk and a plain lm_head chunk (forward or checkpoint recompute)."""

    def __init__(self, monkeypatch):
        self.fused = self.plain = 0
        fused_chunk, plain_chunk = loss_mod._ce_chunk_with_grad, loss_mod._ce_chunk

        def count_fused(*args):
            self.fused += 1
            return fused_chunk(*args)

        def count_plain(*args):
            self.plain += 1
            return plain_chunk(*args)

        monkeypatch.setattr(loss_mod, "_ce_chunk_with_grad", count_fused)
        monkeypatch.setattr(loss_mod, "_ce_chunk", count_plain)


def _setup(model_dir, data, out, *extra):
    setup = build_setup(tiny_config(model_dir, data, out, "lora.dropout=0.0", *extra))
    with torch.no_grad():  # LoRA B starts at zero, which would leave every A gradient zero
        gen = torch.Generator().manual_seed(3)
        for n, p in sorted(setup.model.named_parameters()):
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return setup


def _packed(setup):
    batch = pack_rows(setup.examples, list(range(8)), varlen=setup.levers.attention.varlen)
    assert (batch.labels == IGNORE).any() and (batch.labels != IGNORE).any()
    return batch


def _loss_and_grads(setup, batch, autocast=False):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = loss_sum(setup.model, batch, fused_ce=setup.levers.fused_ce.on)
    (loss * SCALE).backward()
    grads = {n: p.grad.clone() for n, p in setup.model.named_parameters() if p.grad is not None}
    return loss.item(), grads


@pytest.mark.parametrize("arch, bf16", [("qwen2", False), ("llama", False), ("qwen2", True), ("gemma3", False)],
                         ids=["qwen2-fp32", "llama-fp32", "qwen2-bf16-autocast", "gemma3-fp32"])
def test_loss_sum_fused_equals_checkpointed_chunks(arch, bf16, tiny_models, identity_subset, tmp_path, monkeypatch):
    """Packed batch with IGNORE labels: same loss and LoRA gradients with kernels.fused_ce on and off; with it
    on, lm_head runs only inside the fused function, once per chunk (several chunks here)."""
    rows = 16
    extra = ["quant.compute_dtype=bf16"] if bf16 else []
    results, counts = {}, {}
    for fused in (True, False):
        setup = _setup(tiny_models[arch], identity_subset, tmp_path / f"run{fused}",
                       f"kernels.fused_ce={str(fused).lower()}", *extra)
        head = setup.model.get_base_model().get_output_embeddings()
        assert setup.levers.fused_ce.on == fused
        monkeypatch.setattr(loss_mod, "FUSED_CE_ELEMENTS", rows * head.out_features)  # chunks of 16 rows
        batch = _packed(setup)
        labelled = int((batch.labels[:, 1:] != IGNORE).sum())
        counter = _Counters(monkeypatch)
        results[fused] = _loss_and_grads(setup, batch, autocast=bf16)
        counts[fused] = (counter.fused, counter.plain)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss_sum(setup.model, batch, fused_ce=fused)  # eval: the plain chunk loop either way
        counts[fused] += (counter.plain,)
    chunks = -(-labelled // rows)
    assert labelled > 2 * rows
    assert counts[True] == (chunks, 0, 1), counts  # lm_head once per chunk, never outside the fused function
    assert counts[False] == (0, 2, 3), counts  # one checkpointed chunk: forward + recompute; then eval
    (lf, gf), (lu, gu) = results[True], results[False]
    assert gf.keys() == gu.keys() and len(gf) == 2 * 7 * 2 and all("lora_" in n for n in gf)
    rtol = 2e-2 if bf16 else 1e-5
    assert abs(lf - lu) <= (1e-4 if bf16 else 1e-6) * abs(lu), (lf, lu)
    for n, g in gu.items():
        assert g.abs().max() > 0, n
        torch.testing.assert_close(gf[n], g, rtol=rtol, atol=rtol * g.abs().max().item(), msg=lambda m: f"{n}: {m}")


def test_trained_lm_head_falls_back_with_correct_gradients(tiny_models, identity_subset, tmp_path, monkeypatch, caplog):
    """lm_head's weight (tied to the input embedding here) trained: the checkpointed chunks, said once,
    and the gradients of LoRA and of the weight equal those of transformers' full-logits loss."""
    monkeypatch.setattr(once, "_said", set())  # each test sees its warning said
    setup = _setup(tiny_models["qwen2"], identity_subset, tmp_path / "run")
    lm = setup.model.get_base_model()
    assert setup.levers.fused_ce.on  # on by default
    weight = lm.get_output_embeddings().weight.requires_grad_(True)
    batch = _packed(setup)
    counter = _Counters(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="qflash.train.loss"):
        got_loss, got = _loss_and_grads(setup, batch)
    assert (counter.fused, counter.plain) == (0, 2)
    assert "kernels.fused_ce: not used, lm_head's weight is trained" in caplog.text
    assert "qflash.train.loss" in {r.name for r in caplog.records}

    setup.model.zero_grad(set_to_none=True)
    logits = setup.model(**batch.model_inputs()).logits[:, :-1].float()  # the whole vocabulary, no chunks
    labels = batch.labels[:, 1:].reshape(-1)
    want_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), labels, ignore_index=IGNORE,
                                                  reduction="sum")
    (want_loss * SCALE).backward()
    name = next(n for n, p in setup.model.named_parameters() if p is weight)
    assert name in got and got[name].abs().max() > 0
    assert abs(got_loss - want_loss.item()) <= 1e-6 * abs(want_loss.item())
    for n, p in setup.model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(got[n], p.grad, rtol=1e-5, atol=1e-6 * p.grad.abs().max().item(),
                                       msg=lambda m: f"{n}: {m}")
    assert len(got) == 2 * 7 * 2 + 1


@pytest.mark.parametrize("change, reason", [
    ("bias", "lm_head has a bias"),
    ("wrapped", "lm_head is a Sequential, not a plain torch.nn.Linear"),
    ("hook", "lm_head has forward hooks"),
    ("scale", "the model scales its logits"),
])
def test_fused_ce_is_refused_where_it_would_not_be_exact(change, reason, tiny_models, identity_subset, tmp_path,
                                                        monkeypatch, caplog):
    monkeypatch.setattr(once, "_said", set())  # each test sees its warning said
    setup = _setup(tiny_models["llama"], identity_subset, tmp_path / "run")
    lm = setup.model.get_base_model()
    head = lm.get_output_embeddings()
    if change == "bias":
        head.bias = torch.nn.Parameter(torch.zeros(head.out_features), requires_grad=False)
    elif change == "wrapped":
        lm.set_output_embeddings(torch.nn.Sequential(head))
    elif change == "hook":
        head.register_forward_pre_hook(lambda module, args: None)
    else:
        lm.config.logit_scale = 0.5
    with caplog.at_level(logging.WARNING, logger="qflash.train.loss"):
        assert loss_mod._fused_ce_head(lm) is None
    assert reason in caplog.text
    if change != "scale":
        counter = _Counters(monkeypatch)
        loss_sum(setup.model, _packed(setup), fused_ce=True).backward()
        assert (counter.fused, counter.plain) == (0, 2)


def test_function_needs_no_weight_in_backward():
    """Only grad_hidden is saved: FSDP2 may reshard lm_head's weight between forward and backward."""
    head, hidden, labels = _random_problem(9, seed=2)
    x = hidden.clone().requires_grad_()
    loss = LinearCrossEntropy.apply(x, head.weight, labels, torch.float32, 4)
    saved = loss.grad_fn.saved_tensors
    assert len(saved) == 1 and saved[0].shape == (9, HIDDEN)
    with torch.no_grad():
        head.weight.zero_()  # a reshard would free it; the gradient must not change
    loss.backward()
    want = _loss_and_grad(lambda h: _checkpointed_chunks(_random_problem(9, seed=2)[0], h, labels, 1024), hidden,
                          False)[1] / SCALE
    torch.testing.assert_close(x.grad, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_softmax_gradient_twin(dtype):
    """xent_grad_inplace (the CPU path, and the reference tests/gpu holds the Triton kernel to): the loss
    is F.cross_entropy's, dlogits is softmax - onehot in the logits' dtype (rows sum to 0)."""
    from qflash.train.loss import xent_grad_inplace

    torch.manual_seed(0)
    logits = (torch.randn(37, 501) * 4).to(dtype)
    y = torch.randint(0, 501, (37,))
    loss, d = xent_grad_inplace(logits.clone(), y)
    assert d.dtype == dtype and d.shape == logits.shape
    torch.testing.assert_close(loss, F.cross_entropy(logits.float(), y, reduction="sum"), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(d.float().sum(1), torch.zeros(37), rtol=0, atol=2e-2 if dtype == torch.bfloat16 else 1e-5)
    p = torch.softmax(logits.float(), 1)
    p[torch.arange(37), y] -= 1
    torch.testing.assert_close(d, p.to(dtype), rtol=0, atol=1e-6 if dtype == torch.float32 else 4e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_softcapped_gradient_twin(dtype):
    """xent_grad_inplace with a soft-cap: the loss and dlogits of autograd through cap * tanh(logits / cap)."""
    from qflash.train.loss import softcapped, xent_grad_inplace

    torch.manual_seed(1)
    logits = (torch.randn(23, 301) * 12).to(dtype)
    y = torch.randint(0, 301, (23,))
    x = logits.float().requires_grad_()
    want = F.cross_entropy(softcapped(x, 10.0), y, reduction="sum")
    want.backward()
    loss, d = xent_grad_inplace(logits.clone(), y, 10.0)
    assert d.dtype == dtype
    torch.testing.assert_close(loss, want.detach(), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(d, x.grad.to(dtype), rtol=0, atol=1e-6 if dtype == torch.float32 else 4e-3)
    plain = xent_grad_inplace(logits.clone(), y)[0]
    assert abs(plain - loss) > 1.0  # the cap changes the loss of these logits


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "chunks"])
def test_softcapped_loss_equals_the_models_own_logits(fused, tiny_models, identity_subset, tmp_path):
    """Gemma 3 soft-caps its logits (the tiny one at 10): loss_sum, fused or in chunks, applies the cap before the
    loss, so loss and LoRA gradients equal cross-entropy of transformers' full (capped) logits."""
    setup = _setup(tiny_models["gemma3"], identity_subset, tmp_path / "run", f"kernels.fused_ce={str(fused).lower()}")
    assert setup.levers.fused_ce.on == fused
    assert loss_mod.logit_softcap(setup.model.get_base_model()) == 10.0
    batch = _packed(setup)
    got_loss, got = _loss_and_grads(setup, batch)
    setup.model.zero_grad(set_to_none=True)
    logits = setup.model(**batch.model_inputs()).logits[:, :-1].float()
    assert logits.abs().max() < 10.0  # capped by transformers' forward
    want_loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch.labels[:, 1:].reshape(-1),
                                ignore_index=IGNORE, reduction="sum")
    (want_loss * SCALE).backward()
    assert abs(got_loss - want_loss.item()) <= 1e-5 * abs(want_loss.item()), (got_loss, want_loss.item())
    for n, p in setup.model.named_parameters():
        if p.grad is not None:
            assert p.grad.abs().max() > 0, n
            torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-5 * p.grad.abs().max().item(),
                                       msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("fused", [True, False])
def test_training_steps_follow_the_lever(fused, tiny_models, identity_subset, tmp_path, monkeypatch):
    """The training loop's loss (through the strategy's LossModule) takes the fused lm_head + loss exactly when
    Levers says kernels.fused_ce is on: the switch reaches the step, not only loss_sum's callers in tests."""
    from qflash.train.loop import run_training

    setup = _setup(tiny_models["llama"], identity_subset, tmp_path / "run", f"kernels.fused_ce={str(fused).lower()}",
                   "train.max_steps=2", "train.eval_every=0")
    assert setup.levers.fused_ce.on == fused
    counter = _Counters(monkeypatch)
    run_training(setup, quiet=True)
    assert (counter.fused > 0) == fused and (counter.plain > 0) == (not fused), (counter.fused, counter.plain)
