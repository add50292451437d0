"""Packed varlen batches skip transformers' mask building (and the GPU sync of its packed-sequence detection):
checked on the CPU with a per-document SDPA twin standing in for the varlen kernel. The documents still never
see each other: the loss equals the sdpa backend's on block-diagonal masks."""

import pytest
import torch
import torch.nn.functional as F

from qflash.data.batching import packed_micro_batches
from qflash.model import attention
from qflash.train.loss import loss_sum
from test_memory_levers import _setup


def _window_mask(n: int, window: int | None) -> torch.Tensor:
    """(n, n) True where query i may see key j: causal, and i - j < window (transformers' sliding_window)."""
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    return (j <= i) & ((i - j < window) if window else True)


def _varlen_twin(q, k, v, cu_q, cu_k, max_q, max_k, scaling, dropout=0.0, window=None):
    """q (tokens, heads, dim), k/v (tokens, kv_heads, dim): causal attention within each document (within its
    sliding window, if given)."""
    out = torch.empty_like(q)
    rep = q.shape[1] // k.shape[1]
    bounds = cu_q.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        qq = q[s:e].transpose(0, 1).float()
        kk = k[s:e].repeat_interleave(rep, dim=1).transpose(0, 1).float()
        vv = v[s:e].repeat_interleave(rep, dim=1).transpose(0, 1).float()
        mask = _window_mask(e - s, window)
        out[s:e] = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, scale=scaling).transpose(0, 1).to(q.dtype)
    return out


@pytest.mark.parametrize("arch", ["qwen2", "llama", "gemma3"])  # Gemma 3: its causal and sliding masks both
def test_varlen_batches_build_no_mask_and_keep_documents_apart(arch, tiny_models, identity_subset, tmp_path, monkeypatch):
    setup = _setup(tiny_models[arch], identity_subset, tmp_path, "lora.dropout=0", "train.gradient_checkpointing=false")
    ids = list(range(12))
    pad = setup.tokenizer.pad_token_id
    with torch.no_grad():
        want = sum(loss_sum(setup.model, b, fused_ce=setup.levers.fused_ce.on).item() for b in
                   packed_micro_batches(setup.examples, ids, 4, setup.cfg.data.max_len, pad, varlen=False))

    import transformers.masking_utils as mu

    def no_detection(*a, **k):
        raise AssertionError("transformers built a mask for a varlen batch")

    monkeypatch.setattr(mu, "find_packed_sequence_indices", no_detection)
    attention.use(setup.model, attention.Choice("torch_varlen"))
    monkeypatch.setitem(attention._KERNELS, "torch_varlen", _varlen_twin)
    batches = packed_micro_batches(setup.examples, ids, 4, setup.cfg.data.max_len, pad, varlen=True)
    assert all(b.cu_seqlens is not None and b.model_inputs()["attention_mask"] is attention.NO_MASK for b in batches)
    assert max(len(b.cu_seqlens) for b in batches) > 2  # several documents share a row
    with torch.no_grad():
        got = sum(loss_sum(setup.model, b, fused_ce=setup.levers.fused_ce.on).item() for b in batches)
    # The kernel path casts q/k/v to bf16 (as FlashAttention takes them): 1.3e-4 and 6e-5 apart here. The same
    # twin attending across the whole row (documents seeing each other) is 2.3e-3 and 1.0e-3 apart.
    assert got == pytest.approx(want, rel=4e-4)


def test_the_placeholder_is_refused_where_no_varlen_kernel_reads_it(tiny_models, identity_subset, tmp_path):
    """A batch packed for a varlen kernel (cu_seqlens, no mask) reaching a model whose attention cannot read
    cu_seqlens is refused, not run with documents seeing each other; packed for that model it runs."""
    setup = _setup(tiny_models["qwen2"], identity_subset, tmp_path, "lora.dropout=0")
    assert attention.choice_of(setup.model) == attention.Choice("sdpa")  # the CPU's
    args = (setup.examples, list(range(4)), 4, setup.cfg.data.max_len, setup.tokenizer.pad_token_id)
    for_sdpa = packed_micro_batches(*args, varlen=False)[0]
    assert "attention_mask" not in for_sdpa.model_inputs()  # transformers builds the block-diagonal mask
    with torch.no_grad():
        assert loss_sum(setup.model, for_sdpa, fused_ce=setup.levers.fused_ce.on).item() > 0
    for_varlen = packed_micro_batches(*args, varlen=True)[0]
    inputs = for_varlen.model_inputs()
    assert inputs["attention_mask"] is attention.NO_MASK
    with pytest.raises(attention.PackingError, match="cannot read"), torch.no_grad():
        setup.model(**inputs)


@pytest.mark.parametrize("dense", [False, True], ids=["varlen", "cudnn-auto"])
def test_a_sliding_window_reaches_the_varlen_kernel(dense, monkeypatch):
    """A window some document is longer than goes to the varlen kernel, which applies it per document (never the
    dense path, whose attention is plain causal); one no document reaches changes nothing and is not passed."""
    windows = []

    def recording_twin(*a, window=None, **k):
        windows.append(window)
        return _varlen_twin(*a, window=window, **k)

    monkeypatch.setitem(attention._KERNELS, "torch_varlen", recording_twin)
    tv = attention.Choice("torch_varlen", attention.CUDNN_AUTO_MAX_LENGTH if dense else 0)
    torch.manual_seed(0)
    q, kv = torch.randn(1, 4, 12, 8), torch.randn(1, 2, 12, 8)
    cu = torch.tensor([0, 6, 12], dtype=torch.int32)  # two documents of 6: the dense path's shape
    kw = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=6, max_length_k=6)

    def run(window):
        return attention.qflash_attention(torch.nn.Module(), q, kv, kv, attention.NO_MASK, scaling=0.35,
                                          sliding_window=window, choice=tv, **kw)[0]

    full = run(6)
    assert windows == ([] if dense else [None])
    windowed = run(3)
    assert windows[-1] == 3
    want = _varlen_twin(q[0].transpose(0, 1), kv[0].transpose(0, 1), kv[0].transpose(0, 1), cu, cu, 6, 6, 0.35,
                        window=3).to(torch.bfloat16).float()  # the kernel path takes q/k/v in bf16
    torch.testing.assert_close(windowed[0].float(), want, rtol=2e-2, atol=2e-2)
    rows = [0, 1, 2, 6, 7, 8]  # each document's first 3 tokens: the window reaches back to its start
    torch.testing.assert_close(windowed[0, rows], full[0, rows], rtol=2e-2, atol=2e-2)  # dense: SDPA in bf16
    assert (windowed[0, [3, 4, 5, 9, 10, 11]] - full[0, [3, 4, 5, 9, 10, 11]]).abs().amax(-1).amin() > 5e-2


def test_equal_documents_reads_shapes_and_ints_only():
    cu = torch.tensor([0, 4, 8, 12], dtype=torch.int32)
    assert attention.equal_documents(12, 12, cu, cu, 4, 4) == 3
    assert attention.equal_documents(12, 12, cu, cu, 5, 5) is None  # 3 documents, the longest 5: not all 4
    assert attention.equal_documents(12, 12, cu, cu[:3], 4, 4) is None
    assert attention.equal_documents(12, 12, cu, cu, torch.tensor(4), 4) is None  # a tensor would need a sync
    one = torch.tensor([0, 9], dtype=torch.int32)
    assert attention.equal_documents(9, 9, one, one, 9, 9) == 1  # a single long sequence


def test_documents_of_one_length_take_the_dense_path_with_the_same_result(monkeypatch):
    """attention.cudnn's routing and reshaping on the CPU (SDPA's default kernel stands in for cuDNN's): the same
    output and gradients as the per-document varlen twin, GQA included; mixed lengths keep the varlen kernel."""
    torch.manual_seed(0)
    calls = []

    def counting_twin(*a, **k):
        calls.append(1)
        return _varlen_twin(*a, **k)

    monkeypatch.setitem(attention._KERNELS, "torch_varlen", counting_twin)

    def run(dense: bool, lengths: list[int]):
        choice = attention.Choice("torch_varlen", attention.CUDNN_AUTO_MAX_LENGTH if dense else 0)
        torch.manual_seed(1)
        tokens = sum(lengths)
        q = torch.randn(1, 6, tokens, 8, requires_grad=True)
        k = torch.randn(1, 2, tokens, 8, requires_grad=True)
        v = torch.randn(1, 2, tokens, 8, requires_grad=True)
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
        out, _ = attention.qflash_attention(torch.nn.Module(), q, k, v, attention.NO_MASK, scaling=0.3,
                                            cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(lengths),
                                            max_length_k=max(lengths), choice=choice)
        out.float().pow(2).sum().backward()
        return out.detach(), q.grad, k.grad, v.grad

    want = run(False, [5, 5, 5])
    assert len(calls) == 1
    got = run(True, [5, 5, 5])
    assert len(calls) == 1  # the dense path: the varlen kernel was not called
    assert got[0].shape == (1, 15, 6, 8)
    leaky = run(True, [15])  # one 15-token document: what attending across the three would give
    for g, w, wrong in zip(got, want, leaky):
        # q/k/v go to the kernel in bf16; the twin then attends in fp32, CPU SDPA in bf16
        assert (g - w).norm() / w.norm() < 1e-2 < (wrong - w).norm() / w.norm()
    run(True, [6, 5, 4])
    assert len(calls) == 2  # mixed lengths: the varlen kernel
    monkeypatch.setattr(attention, "CUDNN_AUTO_MAX_LENGTH", 4)
    run(True, [5, 5, 5])
    assert len(calls) == 3  # longer documents than auto's measured range: the varlen kernel


def test_attention_cudnn_true_without_cudnn_is_a_config_error():
    from qflash.errors import ConfigError

    with pytest.raises(ConfigError, match="attention.cudnn=true needs"):
        attention.choose("sdpa", cudnn=True)
    assert attention.choose("sdpa", cudnn="auto") == attention.Choice("sdpa", 0)
    assert attention.cudnn_missing(False, "torch_varlen") == "off"


def _per_document_sdpa(q, k, v, cu, scale, window=None):
    rep = q.shape[1] // k.shape[1]
    outs = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        qq, kk, vv = (t[a:b].transpose(0, 1) for t in (q, k, v))
        kk, vv = kk.repeat_interleave(rep, 0), vv.repeat_interleave(rep, 0)
        outs.append(F.scaled_dot_product_attention(qq, kk, vv, attn_mask=_window_mask(b - a, window),
                                                   scale=scale).transpose(0, 1))
    return torch.cat(outs)


@pytest.mark.parametrize("window", [None, 3], ids=["causal", "window3"])
def test_flash_varlen_twin_matches_per_document_attention_and_its_gradients(window):
    """qflash::flash_varlen on the CPU (the twin of FlashAttention-2's varlen forward and backward, grouped k/v
    read as they are): output, lse and gradients against autograd through per-document SDPA, in float64; with a
    sliding window of 3 (FlashAttention's window_size (2, 0)) against SDPA with the window's mask."""
    torch.manual_seed(0)
    cu = torch.tensor([0, 5, 6, 14, 21], dtype=torch.int32)
    q = torch.randn(21, 6, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(21, 2, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(21, 2, 8, dtype=torch.float64, requires_grad=True)
    out, lse = attention.flash_varlen(q, k, v, cu, cu, 8, 8, 0.3, attention._window_left(window))
    ref = _per_document_sdpa(q, k, v, cu, 0.3, window)
    if window:
        assert (out - _per_document_sdpa(q, k, v, cu, 0.3)).abs().max() > 1e-2  # the window changes the output
    g = torch.randn_like(out)
    got, want = torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)
    assert out.shape == q.shape and lse.shape == (6, 21) and lse.dtype == torch.float32
    assert (out - ref).abs().max() < 1e-5  # the twin computes in fp32
    for a, b in zip(got, want):
        assert a.shape == b.shape and (a - b).abs().max() < 1e-5
    # lse is what FlashAttention keeps: log of each query's softmax denominator over its own document
    s = (q[5:6] * k[5:6].repeat_interleave(3, 1)).sum(-1) * 0.3  # a one-token document sees only itself
    assert torch.allclose(lse[:, 5].double(), s[0], atol=1e-5)


def test_a_window_an_older_varlen_attn_cannot_take_goes_through_flash_varlen(monkeypatch):
    """PyTorch's varlen_attn without window_size (an older release): a windowed call runs qflash::flash_varlen (the
    same FlashAttention-2 kernels on CUDA, told the window; its twin here), not plain causal attention."""
    monkeypatch.setattr(attention, "_varlen_kwargs", {"is_causal": True})
    torch.manual_seed(0)
    cu = torch.tensor([0, 7, 16], dtype=torch.int32)
    q, k, v = torch.randn(16, 4, 8), torch.randn(16, 2, 8), torch.randn(16, 2, 8)
    got = attention._torch_varlen(q, k, v, cu, cu, 9, 9, 0.3, window=3)
    torch.testing.assert_close(got, _per_document_sdpa(q, k, v, cu, 0.3, 3), rtol=1e-5, atol=1e-5)


def test_keeping_and_reusing_hand_the_forward_outputs_to_the_recompute():
    torch.manual_seed(0)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    q, k, v = torch.randn(9, 4, 8), torch.randn(9, 2, 8), torch.randn(9, 2, 8)
    kept: list = []
    with attention.keeping(kept):
        out, lse = attention.flash_varlen(q, k, v, cu, cu, 5, 5, 0.35)
        assert torch.equal(attention._torch_varlen(q, k, v, cu, cu, 5, 5, 0.35), out)  # the backend's route here
    assert len(kept) == 2
    del kept[1:]
    assert len(kept) == 1 and torch.equal(kept[0][0], out) and kept[0][0] is not out  # a copy
    assert torch.equal(kept[0][1], lse)
    marked = (kept[0][0] + 1, kept[0][1])
    with attention.reusing([marked]):
        again, _ = attention.flash_varlen(q, k, v, cu, cu, 5, 5, 0.35)
    assert again is marked[0]  # handed back, nothing computed
    with pytest.raises(RuntimeError, match="recompute ran 0 attention calls, the forward 1"):
        with attention.reusing([marked]):
            pass
    with pytest.raises(RuntimeError, match="more attention calls than the forward"):
        with attention.reusing([]):
            attention.flash_varlen(q, k, v, cu, cu, 5, 5, 0.35)
    with pytest.raises(RuntimeError, match=r"has q \(4, 4, 8\)"):
        with attention.reusing([marked]):
            attention.flash_varlen(q[:4], k[:4], v[:4], cu[:2], cu[:2], 4, 4, 0.35)
    out2, _ = attention.flash_varlen(q, k, v, cu, cu, 5, 5, 0.35)  # outside both: computes
    assert torch.equal(out2, out)
