"""Packed batches on the CPU (SDPA with a block-diagonal causal mask) equal the documents run one by one."""

import pytest
import torch

from conftest import make_tiny_model, tiny_config
from qflash.data.batching import pack_rows, packed_micro_batches, pad_batch, trained_tokens
from qflash.data.template import IGNORE
from qflash.model import attention
from qflash.model.attention import PackingError
from qflash.train.loop import build_setup
from qflash.train.loss import loss_sum


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# Mistral's packed rows: test_sliding_window_applies_per_document_in_a_packed_row (with its window, the stronger case)
@pytest.mark.parametrize("arch", ["qwen2", "llama", "qwen3", "gemma3"])
def test_packed_loss_and_grads_equal_one_by_one(arch, tiny_models, identity_subset, tmp_path):
    cfg = tiny_config(tiny_models[arch], identity_subset, tmp_path, "data.max_len=200", "lora.dropout=0.0")
    setup = build_setup(cfg)
    model, ex, pad = setup.model, setup.examples, setup.tokenizer.pad_token_id
    # LoRA B starts at zero; give it values so the A gradients are non-trivial too.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(1))
    ids = list(range(10))
    packed = packed_micro_batches(ex, ids, 2, 200, pad, varlen=False)
    rows = [row for b in packed for row in b.position_ids]
    assert any((row[1:] < row[:-1]).any() for row in rows), "several documents share a row"
    n_tokens = sum(trained_tokens(b) for b in packed)
    assert n_tokens == sum(sum(1 for l in ex[i].labels[1:] if l != IGNORE) for i in ids)

    model.zero_grad()
    packed_loss = 0.0
    for b in packed:
        loss = loss_sum(model, b) / n_tokens
        loss.backward()
        packed_loss += loss.item()
    g_packed = _grads(model)

    model.zero_grad()
    single_loss = 0.0
    for i in ids:
        loss = loss_sum(model, pad_batch([ex[i]], [i], pad)) / n_tokens
        loss.backward()
        single_loss += loss.item()
    g_single = _grads(model)

    assert packed_loss == pytest.approx(single_loss, abs=1e-5)
    for n in g_packed:
        torch.testing.assert_close(g_packed[n], g_single[n], atol=1e-5, rtol=1e-4)


def test_documents_in_a_row_do_not_see_each_other(tiny_models, identity_subset, tmp_path):
    setup = build_setup(tiny_config(tiny_models["llama"], identity_subset, tmp_path, "data.max_len=400"))
    model, ex = setup.model.eval(), setup.examples
    row = pack_rows(ex, [0, 1], varlen=False)
    changed = pack_rows(ex, [0, 1], varlen=False)
    n0 = len(ex[0].input_ids)
    changed.input_ids[0, : n0 - 1] = (changed.input_ids[0, : n0 - 1] + 7) % 1000  # rewrite document 0
    with torch.no_grad():
        a = model(**row.model_inputs()).logits[0, n0:]
        b = model(**changed.model_inputs()).logits[0, n0:]
        alone = model(input_ids=torch.as_tensor(ex[1].input_ids)[None], use_cache=False).logits[0]
    assert torch.equal(a, b), "document 1's logits do not depend on document 0"
    torch.testing.assert_close(a, alone, atol=1e-5, rtol=1e-5)


def test_packed_batch_with_kv_cache_is_refused(tiny_models, identity_subset, tmp_path):
    """Stock transformers skips the block-diagonal mask when a cache is passed; qflash refuses instead."""
    setup = build_setup(tiny_config(tiny_models["qwen2"], identity_subset, tmp_path))
    row = pack_rows(setup.examples, [0, 1], varlen=False)
    with torch.no_grad(), pytest.raises(PackingError, match="use_cache=False"):
        setup.model(input_ids=row.input_ids, position_ids=row.position_ids, use_cache=True)
    varlen_row = pack_rows(setup.examples, [0, 1], varlen=True)
    kwargs = {**varlen_row.model_inputs(), "use_cache": True}
    with torch.no_grad(), pytest.raises(PackingError, match="use_cache=False"):
        setup.model(**kwargs)


def test_stock_sdpa_with_cache_leaks_across_documents(tiny_models, identity_subset, tmp_path):
    """Why the guard exists: the same packed row through plain transformers SDPA with use_cache=True."""
    from transformers import AutoModelForCausalLM

    setup = build_setup(tiny_config(tiny_models["qwen2"], identity_subset, tmp_path))
    row = pack_rows(setup.examples, [0, 1], varlen=False)
    n0 = len(setup.examples[0].input_ids)
    stock = AutoModelForCausalLM.from_pretrained(str(tiny_models["qwen2"]), attn_implementation="sdpa").eval()
    with torch.no_grad():
        leaky = stock(input_ids=row.input_ids, position_ids=row.position_ids, use_cache=True).logits[0, n0:]
        right = stock(input_ids=row.input_ids, position_ids=row.position_ids, use_cache=False).logits[0, n0:]
    assert (leaky - right).abs().max() > 1e-3


WINDOW = 16


WINDOWED = ("mistral", "gemma3")


@pytest.fixture(scope="module")
def windowed(tmp_path_factory, smol_tokenizer):
    """The tiny Mistral and Gemma 3 with a 16-token sliding window (the identity documents are longer; Gemma 3's
    first layer slides, its second is global). Their weights are tiny_models' (same seed): only the window differs."""
    root = tmp_path_factory.mktemp("windowed")
    return {arch: make_tiny_model(root / arch, arch, smol_tokenizer, sliding_window=WINDOW) for arch in WINDOWED}


def _varlen_on_the_cpu(model, monkeypatch) -> None:
    """attention.backend=torch_varlen with its kernel the CPU twin of qflash::flash_varlen (which takes the window)."""
    attention.use(model, attention.Choice("torch_varlen"))
    monkeypatch.setitem(attention._KERNELS, "torch_varlen",
                        lambda q, k, v, cu_q, cu_k, mq, mk, scaling, dropout=0.0, window=None:
                        attention.flash_varlen(q, k, v, cu_q, cu_k, mq, mk, scaling, attention._window_left(window))[0])


def _alone(model, example) -> torch.Tensor:
    return model(input_ids=torch.as_tensor(example.input_ids)[None], use_cache=False).logits[0]


@pytest.mark.parametrize("arch", WINDOWED)
@pytest.mark.parametrize("backend", ["sdpa", "eager", "torch_varlen"])
def test_sliding_window_applies_per_document_in_a_packed_row(arch, backend, windowed, tiny_models, identity_subset,
                                                             tmp_path, monkeypatch):
    """The window within each document of a packed row: on the CPU's paths (block-diagonal mask) and through the
    varlen kernel (its CPU twin, handed the window by the layer), the row equals each document run alone, where
    the window restarts with the document; and the window does limit attention (without it: other logits)."""
    varlen = backend == "torch_varlen"
    setup = build_setup(tiny_config(windowed[arch], identity_subset, tmp_path / "w", "data.max_len=400",
                                    f"attention.backend={'sdpa' if varlen else backend}"))
    model, ex = setup.model.eval(), setup.examples
    lengths = [len(ex[i].input_ids) for i in (0, 1)]
    assert min(lengths) > 2 * WINDOW, lengths
    if varlen:
        _varlen_on_the_cpu(model, monkeypatch)
    row = pack_rows(ex, [0, 1], varlen=varlen)
    with torch.no_grad():
        packed = model(**row.model_inputs()).logits[0]
        attention.use(model, attention.Choice(backend if not varlen else "sdpa"))
        windowed_alone = [_alone(model, ex[0]), _alone(model, ex[1])]
    unwindowed = build_setup(tiny_config(tiny_models[arch], identity_subset, tmp_path / "u", "data.max_len=400"))
    with torch.no_grad():
        full_alone = [_alone(unwindowed.model.eval(), ex[0]), _alone(unwindowed.model, ex[1])]
    documents = zip((packed[: lengths[0]], packed[lengths[0]:]), windowed_alone, full_alone)
    for got, want, full in documents:
        if varlen:  # the kernel takes q/k/v in bf16 (as FlashAttention does): 3e-3 apart here; no window: 0.5
            assert _rel(got, want) < 1e-2 and _rel(got[WINDOW:], full[WINDOW:]) > 0.1, (
                _rel(got, want), _rel(got[WINDOW:], full[WINDOW:]))
        else:
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(full[:WINDOW], want[:WINDOW], atol=1e-5, rtol=1e-5)  # inside the window
        assert (full[WINDOW:] - want[WINDOW:]).abs().amax(-1).min() > 1e-4, "every token past the window differs"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("arch", WINDOWED)
def test_an_unpacked_sequence_keeps_the_window_under_a_varlen_backend(arch, windowed, identity_subset, tmp_path):
    """A model loaded for a varlen kernel runs unpacked sequences (eval, generation) through SDPA: one longer than
    the window gets the window's mask there too, not plain causal attention."""
    setup = build_setup(tiny_config(windowed[arch], identity_subset, tmp_path, "data.max_len=400"))
    model, example = setup.model.eval(), setup.examples[1]
    with torch.no_grad():
        want = _alone(model, example)
        attention.use(model, attention.Choice("torch_varlen"))
        got = _alone(model, example)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
