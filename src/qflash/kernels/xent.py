"""Cross-entropy and its gradient w.r.t. the logits for one chunk of rows, in one Triton kernel (CUDA).

kernels.fused_ce computes, per chunk of labelled rows, logits = h W^T (16-bit GEMM), then in fp32 the
summed loss (logsumexp - picked logit) and dlogits = softmax - onehot, handed back in the logits'
dtype to the next GEMM. Eagerly that is ~7 passes over a (rows x vocab) chunk plus an fp32 copy of it
(233 MB for 384 rows of Qwen's 152k vocabulary). Here one program per row reads its logits twice
(running max and sum, then exp) and writes dlogits over them in place: no fp32 copy, three passes.
The math is the same fp32 logsumexp and exp; `xent_grad_inplace` (train/loss.py) is the PyTorch twin
the CPU runs, and tests/gpu compares the two. A soft-capping model (Gemma's final_logit_softcapping) has each
fp32 logit capped as it is read, c = cap * tanh(x / cap), and its gradient scaled by dc/dx = 1 - (c / cap)^2.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the PyTorch twin is used
    triton = None

BLOCK = 4096


def available(t: torch.Tensor) -> bool:
    return triton is not None and t.is_cuda


if triton is not None:

    @triton.jit
    def _capped(x, cap, CAPPED: tl.constexpr):
        """cap * tanh(x / cap) in fp32 (tanh(y) = 2 sigmoid(2y) - 1), or x when not CAPPED."""
        if CAPPED:
            x = cap * (2.0 * tl.sigmoid(2.0 * x / cap) - 1.0)
        return x

    @triton.jit
    def _xent_grad_rows(logits_ptr, stride, labels_ptr, loss_ptr, vocab, cap, BLOCK: tl.constexpr,
                        CAPPED: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * stride
        label = tl.load(labels_ptr + row)
        cols = tl.arange(0, BLOCK)
        # per-lane running max and sum of exp (lanes that saw no column keep -inf / 0)
        m = tl.full([BLOCK], float("-inf"), tl.float32)
        s = tl.zeros([BLOCK], tl.float32)
        for off in range(0, vocab, BLOCK):
            x = tl.load(base + off + cols, mask=off + cols < vocab, other=0.0).to(tl.float32)
            x = tl.where(off + cols < vocab, _capped(x, cap, CAPPED), float("-inf"))
            m_new = tl.maximum(m, x)
            seen = m_new > float("-inf")
            s = tl.where(seen, s * tl.exp(m - m_new) + tl.exp(x - m_new), 0.0)
            m = m_new
        mx = tl.max(m, 0)
        total = tl.sum(tl.where(m > float("-inf"), s * tl.exp(m - mx), 0.0), 0)
        lse = mx + tl.log(total)
        picked = _capped(tl.load(base + label).to(tl.float32), cap, CAPPED)
        tl.store(loss_ptr + row, lse - picked)
        for off in range(0, vocab, BLOCK):
            mask = off + cols < vocab
            x = _capped(tl.load(base + off + cols, mask=mask, other=0.0).to(tl.float32), cap, CAPPED)
            p = tl.exp(x - lse)
            p = tl.where(off + cols == label, p - 1.0, p)
            if CAPPED:
                p = p * (1.0 - (x / cap) * (x / cap))
            tl.store(base + off + cols, p.to(logits_ptr.dtype.element_ty), mask=mask)


def xent_grad_(logits: torch.Tensor, labels: torch.Tensor, cap: float | None = None) -> torch.Tensor:
    """Summed fp32 cross-entropy of `logits` (rows x vocab, CUDA, last dim contiguous), soft-capped by `cap`
    if given; the logits are overwritten with d(loss)/d(logits) (softmax - onehot, times the cap's slope), in
    their own dtype."""
    rows, vocab = logits.shape
    if logits.stride(1) != 1:
        raise ValueError("xent_grad_: the vocabulary dimension must be contiguous")
    losses = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows:
        _xent_grad_rows[(rows,)](logits, logits.stride(0), labels, losses, vocab, float(cap or 1.0), BLOCK=BLOCK,
                                 CAPPED=cap is not None, num_warps=8)
    return losses.sum()
