"""GPU tier: the Triton cross-entropy-gradient kernel (kernels/xent.py) against its PyTorch twin."""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("cap", [None, 10.0], ids=["plain", "softcap10"])
@pytest.mark.parametrize("rows, vocab", [(1, 152064), (384, 152064), (7, 1000), (33, 4096), (5, 49152), (3, 17),
                                         (4, 262208)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_xent_grad_matches_the_twin(rows, vocab, dtype, cap):
    from qflash.kernels.xent import xent_grad_
    from qflash.train.loss import xent_grad_inplace

    gen = torch.Generator(device="cuda").manual_seed(rows * 7 + vocab)
    logits = (torch.randn(rows, vocab, device="cuda", generator=gen) * 6).to(dtype)
    labels = torch.randint(0, vocab, (rows,), device="cuda", generator=gen)
    want_loss, want_d = xent_grad_inplace(logits.clone(), labels, cap)
    got = logits.clone()
    loss = xent_grad_(got, labels, cap)
    torch.testing.assert_close(loss, want_loss, rtol=2e-6, atol=1e-4)
    # exp of the same fp32 values; only the logsumexp's summation order differs (then one rounding)
    tol = dict(rtol=1e-2, atol=1e-5) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got, want_d, **tol)
    assert torch.isfinite(got).all()
