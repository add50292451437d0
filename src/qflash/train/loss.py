"""Next-token loss without materializing the full-vocabulary logits.

The decoder runs once; only the positions that carry a label go through lm_head, in chunks, each
chunk under activation checkpointing, so at most one chunk of logits (chunk x vocab) exists at a
time in forward and in backward. For Qwen's 152k vocabulary and 8k tokens that is the difference
between 5 GB of fp32 logits and ~0.6 GB. The math is the same cross-entropy, summed in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from qflash.data.batching import Batch
from qflash.data.template import IGNORE

CHUNK_TOKENS = 1024


def _causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers *ForCausalLM inside DDP / PEFT wrappers (LoRA layers live inside it)."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _plain_head(lm: torch.nn.Module) -> bool:
    """True when logits = lm_head(final hidden) exactly (no softcapping or logit scaling)."""
    cfg = lm.config
    return not any(getattr(cfg, a, None) for a in ("final_logit_softcapping", "logit_scale", "logits_scaling"))


def _ce_chunk(head: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()  # (chunk, vocab)
    return F.cross_entropy(logits, labels, reduction="sum")


def loss_sum(model: torch.nn.Module, batch: Batch, chunk_tokens: int = CHUNK_TOKENS) -> torch.Tensor:
    """Sum over the batch's trained tokens of the next-token cross-entropy (fp32 scalar)."""
    lm = _causal_lm(model)
    labels = batch.labels[:, 1:].reshape(-1)  # position t predicts token t+1
    if not _plain_head(lm):
        logits = model(**batch.model_inputs()).logits[:, :-1].float()
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels, ignore_index=IGNORE, reduction="sum")
    hidden = lm.get_decoder()(**batch.model_inputs()).last_hidden_state  # (rows, seq, hidden)
    hidden = hidden[:, :-1].reshape(-1, hidden.size(-1))
    keep = (labels != IGNORE).nonzero().squeeze(1)  # only labelled positions need logits
    hidden, labels = hidden.index_select(0, keep), labels.index_select(0, keep)
    head = lm.get_output_embeddings()
    total = hidden.new_zeros((), dtype=torch.float32)
    for s in range(0, hidden.size(0), chunk_tokens):
        h, y = hidden[s : s + chunk_tokens], labels[s : s + chunk_tokens]
        if torch.is_grad_enabled():
            total = total + checkpoint(_ce_chunk, head, h, y, use_reentrant=False)
        else:
            total = total + _ce_chunk(head, h, y)
    return total
