"""Next-token loss without materializing the full-vocabulary logits.

The decoder runs once; only the positions that carry a label go through lm_head, in chunks.

With a frozen plain lm_head and `kernels.fused_ce` (marked on the model at setup), `LinearCrossEntropy`
computes each chunk's logits once, its loss, and right away the loss's gradient w.r.t. the hidden
states (softmax - onehot, then @ W); it keeps only that (rows x hidden) gradient for backward. Two
lm_head-sized GEMMs per chunk instead of three (forward, checkpoint recompute, backward), no recomputed
softmax, and one chunk's logits exist at a time (H100, Qwen2.5-7B shapes, 8192 tokens: 69 -> 51 ms,
peak +1.85 -> +0.54 GiB). Otherwise each chunk runs under activation checkpointing, so at most one
chunk of logits (chunk x vocab) exists at a time in forward and in backward. For Qwen's 152k
vocabulary and 8k tokens that is the difference between 5 GB of fp32 logits and ~0.6 GB. Either way
the math is the same cross-entropy, summed in fp32.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from qflash.data.batching import Batch, labelled_positions
from qflash.data.template import IGNORE
from qflash.kernels import xent
from qflash.model.host_embedding import HostEmbedding
from qflash.once import log_once

log = logging.getLogger(__name__)

CHUNK_TOKENS = 1024
# LinearCrossEntropy: vocab x rows of one chunk; its fp32 logits take 4 bytes each (256 MB). Measured on an
# H100 at vocab 152k: 2**25 is 28% slower (small GEMMs), 2**28 5% faster for 4x the memory.
FUSED_CE_ELEMENTS = 2**26
def _warn_once(message: str) -> None:
    log_once(log, message)


def _causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers *ForCausalLM inside DDP / PEFT wrappers (LoRA layers live inside it)."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _plain_head(lm: torch.nn.Module) -> bool:
    """True when logits = lm_head(final hidden), soft-capped or not (the loss applies `logit_softcap` itself);
    False for a model that scales its logits (the loss then takes the model's full logits)."""
    cfg = lm.config
    return not any(getattr(cfg, a, None) for a in ("logit_scale", "logits_scaling"))


def logit_softcap(lm: torch.nn.Module) -> float | None:
    """final_logit_softcapping (Gemma 2, optional in Gemma 3): the model's logits are cap * tanh(raw / cap)."""
    cap = getattr(lm.config, "final_logit_softcapping", None)
    return float(cap) if cap else None


def softcapped(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap * tanh(logits / cap), as the model's forward caps its logits (None: the logits as they are)."""
    return logits if cap is None else torch.tanh(logits / cap) * cap


def _ce_chunk(head: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor, cap: float | None = None,
              reduction: str = "sum") -> torch.Tensor:
    """Cross-entropy of lm_head over a chunk of hidden states, summed (or per token: `reduction="none"`, the
    preference objectives' scores)."""
    logits = softcapped(head(hidden).float(), cap)  # (chunk, vocab), capped in fp32
    return F.cross_entropy(logits, labels, reduction=reduction)


# ---------------------------------------------------------------------------------------------
# Fused lm_head + cross-entropy (kernels.fused_ce)


def fused_ce_rows(vocab: int) -> int:
    """Rows per LinearCrossEntropy chunk: FUSED_CE_ELEMENTS logits, a multiple of 64 rows when that many fit."""
    rows = max(1, FUSED_CE_ELEMENTS // vocab)
    return rows - rows % 64 if rows >= 64 else rows


def xent_grad_inplace(logits: torch.Tensor, y: torch.Tensor, cap: float | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of fp32(logits) and its gradient w.r.t. the logits (softmax - onehot) in the
    logits' dtype, computed in place in the fp32 buffer (eager: the CPU path and its reference). `cap`: the loss
    of the soft-capped logits c = cap * tanh(logits / cap), its gradient through the cap: (softmax(c) - onehot)
    * (1 - (c / cap)^2)."""
    lf = logits.float()  # (rows, vocab): upcast (in place of it if already fp32)
    slope = None
    if cap is not None:
        t = torch.tanh(lf / cap)  # (rows, vocab)
        lf = t * cap
        slope = t.square_().neg_().add_(1.0)  # d c / d logits
    lse = torch.logsumexp(lf, dim=1)  # (rows,)
    loss = (lse - lf.gather(1, y.unsqueeze(1)).squeeze(1)).sum()
    dlogits = lf.sub_(lse.unsqueeze(1)).exp_()
    dlogits.scatter_add_(1, y.unsqueeze(1), dlogits.new_full((y.numel(), 1), -1.0))
    if slope is not None:
        dlogits.mul_(slope)
    return loss, dlogits.to(logits.dtype)


def _ce_chunk_with_grad(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, grad_h: torch.Tensor,
                        cap: float | None = None) -> torch.Tensor:
    """Summed cross-entropy of logits = h W^T, soft-capped by `cap` if given (fp32 scalar); d(loss)/dh written
    into `grad_h`.

    h: (rows, hidden) and w: (vocab, hidden) in the compute dtype; y: (rows,) labels; grad_h: (rows, hidden).
    """
    logits = F.linear(h, w)  # (rows, vocab), the compute-dtype GEMM
    if xent.available(logits):
        loss = xent.xent_grad_(logits, y, cap)  # one Triton kernel; dlogits written over the logits
        dlogits = logits
    else:
        loss, dlogits = xent_grad_inplace(logits, y, cap)
        del logits
    # The GEMM of linear's backward, in the compute dtype as under autocast.
    torch.mm(dlogits, w, out=grad_h)
    return loss


class LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i W^T, labels_i) in fp32, W frozen; the gradient w.r.t. hidden is computed in forward.

    Chunks of `chunk_rows` rows: per chunk the logits in `compute_dtype`, upcast to fp32 (and soft-capped there
    when `cap` is given), loss and dlogits in fp32, grad_hidden = dlogits (cast to compute_dtype) @ W. No
    gradient for W. Every label must be a class index (the caller drops IGNORE rows).
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, compute_dtype, chunk_rows, cap=None):
        rows = hidden.size(0)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):  # the casts are explicit
            h = hidden.detach().to(compute_dtype)  # (rows, hidden)
            w = weight.detach().to(compute_dtype)  # (vocab, hidden); cast once, not per chunk
            grad_hidden = torch.empty_like(h)
            for s in range(0, rows, chunk_rows):
                e = min(s + chunk_rows, rows)
                total += _ce_chunk_with_grad(h[s:e], w, labels[s:e], grad_hidden[s:e], cap)
        ctx.save_for_backward(grad_hidden)
        ctx.hidden_dtype = hidden.dtype
        return total

    @staticmethod
    def backward(ctx, grad_output):
        (grad_hidden,) = ctx.saved_tensors
        grad = grad_hidden.float().mul_(grad_output.float()).to(ctx.hidden_dtype)
        return grad, None, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         chunk_rows: int | None = None, cap: float | None = None) -> torch.Tensor:
    """LinearCrossEntropy with the compute dtype autocast would give F.linear (else the hidden's dtype)."""
    dev = hidden.device.type
    compute_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else hidden.dtype
    rows = chunk_rows or fused_ce_rows(weight.size(0))
    return LinearCrossEntropy.apply(hidden, weight, labels, compute_dtype, rows, cap)


def _fused_ce_blocker(lm: torch.nn.Module) -> str | None:
    """Why LinearCrossEntropy would not give exactly lm_head's loss and gradients (None: it would)."""
    if not _plain_head(lm):
        return "the model scales its logits"
    head = lm.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or type(head).forward is not torch.nn.Linear.forward:
        return f"lm_head is a {type(head).__name__}, not a plain torch.nn.Linear"
    if head.bias is not None:
        return "lm_head has a bias"
    if head.weight.requires_grad:
        return "lm_head's weight is trained"
    if head._forward_pre_hooks or head._forward_hooks or "forward" in vars(head):
        return "lm_head has forward hooks (sharding or offloading), which the fused loss would skip"
    if not head.weight.is_floating_point() or tuple(head.weight.shape) != (head.out_features, head.in_features):
        return f"lm_head's weight is stored as {head.weight.dtype} {tuple(head.weight.shape)}"
    return None


def _fused_ce_refused(lm: torch.nn.Module) -> bool:
    """True (said once, with the reason) when LinearCrossEntropy would not be exact for lm's head."""
    reason = _fused_ce_blocker(lm)
    if reason is not None:
        _warn_once(f"kernels.fused_ce: not used, {reason}; the loss runs lm_head in checkpointed chunks")
    return reason is not None


def fused_ce_blocker(model: torch.nn.Module) -> str | None:
    """Why kernels.fused_ce cannot apply to `model`'s lm_head (None: it can)."""
    lm = _causal_lm(model)
    if lm.get_output_embeddings() is None:
        return "the model has no output embedding"
    return _fused_ce_blocker(lm)


def _fused_ce_head(lm: torch.nn.Module) -> torch.nn.Linear | None:
    """lm_head when LinearCrossEntropy is exact for it now (else None, said once)."""
    return None if _fused_ce_refused(lm) else lm.get_output_embeddings()


def device_inputs(model: torch.nn.Module, batch: Batch) -> dict:
    """The decoder's keyword arguments for `batch`, everything on the device: the host embedding's rows
    already looked up (its table and the batch's ids are on the CPU)."""
    lm = _causal_lm(model)
    inputs = batch.model_inputs()
    embedding = lm.get_input_embeddings()
    if batch.host_input_ids is not None and isinstance(embedding, HostEmbedding):
        # The table is on the CPU and so are these ids: no wait for the device to hand them back.
        inputs["inputs_embeds"] = embedding(batch.host_input_ids)
        del inputs["input_ids"]
    return inputs


def loss_sum(model: torch.nn.Module, batch: Batch, chunk_tokens: int = CHUNK_TOKENS, *,
             fused_ce: bool = False) -> torch.Tensor:
    """Sum over the batch's trained tokens of the next-token cross-entropy (fp32 scalar). `fused_ce`
    (kernels.fused_ce, as Levers resolved it): with gradients, lm_head and the loss as LinearCrossEntropy."""
    lm = _causal_lm(model)
    labels = batch.labels[:, 1:].reshape(-1)  # position t predicts token t+1
    if not _plain_head(lm):
        logits = model(**batch.model_inputs()).logits[:, :-1].float()
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels, ignore_index=IGNORE, reduction="sum")
    # only labelled positions need logits (found on the CPU when the batch came from there: no sync)
    keep = batch.label_index if batch.label_index is not None else labelled_positions(batch.labels)
    return decoder_loss_sum(model, device_inputs(model, batch), labels, keep, chunk_tokens, fused_ce=fused_ce)


def decoder_loss_sum(model: torch.nn.Module, inputs: dict, labels: torch.Tensor, keep: torch.Tensor,
                     chunk_tokens: int = CHUNK_TOKENS, *, fused_ce: bool = False) -> torch.Tensor:
    """loss_sum's device work: the decoder on `inputs` (device_inputs), then the loss at the positions `keep`
    of the shifted, flattened `labels` (a plain lm_head). No host work, no synchronization: what
    train.cuda_graphs captures."""
    lm = _causal_lm(model)
    hidden = lm.get_decoder()(**inputs).last_hidden_state  # (rows, seq, hidden)
    hidden = hidden[:, :-1].reshape(-1, hidden.size(-1))
    hidden, labels = hidden.index_select(0, keep), labels.index_select(0, keep)
    cap = logit_softcap(lm)
    if fused_ce and torch.is_grad_enabled() and hidden.requires_grad and hidden.size(0) > 0:
        fused = _fused_ce_head(lm)
        if fused is not None:
            return linear_cross_entropy(hidden, fused.weight, labels, cap=cap)
    head = lm.get_output_embeddings()
    total = hidden.new_zeros((), dtype=torch.float32)
    for s in range(0, hidden.size(0), chunk_tokens):
        h, y = hidden[s : s + chunk_tokens], labels[s : s + chunk_tokens]
        if torch.is_grad_enabled():
            total = total + checkpoint(_ce_chunk, head, h, y, cap, use_reentrant=False)
        else:
            total = total + _ce_chunk(head, h, y, cap)
    return total
