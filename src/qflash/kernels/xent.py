"""Cross-entropy and its gradient w.r.t. the logits for one chunk of rows, in one Triton kernel (CUDA).

kernels.fused_ce computes, per chunk of labelled rows, logits = h W^T (16-bit GEMM), then in fp32 the
summed loss (logsumexp - picked logit) and dlogits = softmax - onehot, handed back in the logits'
dtype to the next GEMM. Eagerly that is ~7 passes over a (rows x vocab) chunk plus an fp32 copy of it
(233 MB for 384 rows of Qwen's 152k vocabulary). Here one program per row reads its logits twice
(running max and sum, then exp) and writes dlogits over them in place: no fp32 copy, three passes.
The math is the same fp32 logsumexp and exp; `xent_grad_inplace` (train/loss.py) is the PyTorch twin
the CPU runs, and tests/gpu compares the two.
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
    def _xent_grad_rows(logits_ptr, stride, labels_ptr, loss_ptr, vocab, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * stride
        label = tl.load(labels_ptr + row)
        cols = tl.arange(0, BLOCK)
        # per-lane running max and sum of exp (lanes that saw no column keep -inf / 0)
        m = tl.full([BLOCK], float("-inf"), tl.float32)
        s = tl.zeros([BLOCK], tl.float32)
        for off in range(0, vocab, BLOCK):
            x = tl.load(base + off + cols, mask=off + cols < vocab, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, x)
            seen = m_new > float("-inf")
            s = tl.where(seen, s * tl.exp(m - m_new) + tl.exp(x - m_new), 0.0)
            m = m_new
        mx = tl.max(m, 0)
        total = tl.sum(tl.where(m > float("-inf"), s * tl.exp(m - mx), 0.0), 0)
        lse = mx + tl.log(total)
        picked = tl.load(base + label).to(tl.float32)
        tl.store(loss_ptr + row, lse - picked)
        for off in range(0, vocab, BLOCK):
            mask = off + cols < vocab
            x = tl.load(base + off + cols, mask=mask, other=0.0).to(tl.float32)
            p = tl.exp(x - lse)
            p = tl.where(off + cols == label, p - 1.0, p)
            tl.store(base + off + cols, p.to(logits_ptr.dtype.element_ty), mask=mask)


def xent_grad_(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed fp32 cross-entropy of `logits` (rows x vocab, CUDA, last dim contiguous); the logits are
    overwritten with d(loss)/d(logits) = softmax - onehot, in their own dtype."""
    rows, vocab = logits.shape
    if logits.stride(1) != 1:
        raise ValueError("xent_grad_: the vocabulary dimension must be contiguous")
    losses = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows:
        _xent_grad_rows[(rows,)](logits, logits.stride(0), labels, losses, vocab, BLOCK=BLOCK, num_warps=8)
    return losses.sum()
