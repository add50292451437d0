"""Held-out loss: the token-weighted next-token cross-entropy over every labelled token of a split.

Used by the training loop (train.eval_every) and by `qflash eval`. It runs the model in eval mode
(no dropout) without gradients and puts back the torch RNG state it found, so evaluating in the
middle of a run changes nothing that training computes afterwards.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Sequence

import torch

from qflash.data.batching import packed_micro_batches, step_micro_batches, trained_tokens
from qflash.data.template import Example
from qflash.train.loss import loss_sum


@dataclass
class HeldOutLoss:
    loss: float
    """Mean cross-entropy per labelled token (nats)."""
    tokens: int
    """Labelled tokens it averages over."""

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if self.loss < 700 else float("inf")


@contextlib.contextmanager
def rng_untouched():
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def held_out_loss(
    model: torch.nn.Module,
    examples: Sequence[Example],
    *,
    pad_id: int,
    device: torch.device,
    max_len: int,
    rows: int = 4,
    packing: bool = True,
    varlen: bool = False,
    autocast: contextlib.AbstractContextManager | None = None,
    loss_fn=None,
) -> HeldOutLoss:
    """Token-weighted loss of `model` on `examples`: sum of token losses / labelled tokens.

    Batches are built as in training (packed into bins of max_len, `rows` bins per forward, or padded
    rows); the result does not depend on how they are split. The model's train/eval mode is restored.
    `loss_fn(batch)`: the summed token loss; default loss_sum(model, batch). Training passes its
    strategy's wrapped module (an FSDP2-sharded model must be called through its root).
    """
    if not examples:
        raise ValueError("held_out_loss needs at least one example")
    ids = list(range(len(examples)))
    if packing:
        batches = packed_micro_batches(list(examples), ids, rows, max_len, pad_id, varlen=varlen)
    else:
        batches = step_micro_batches(list(examples), ids, rows, pad_id)
    was_training = model.training
    total, tokens = 0.0, 0
    model.eval()
    try:
        with rng_untouched(), torch.no_grad(), (autocast or contextlib.nullcontext()):
            for b in batches:
                n = trained_tokens(b)
                if n == 0:
                    continue
                b = b.to(device)
                total += float(loss_fn(b) if loss_fn is not None else loss_sum(model, b))
                tokens += n
    finally:
        model.train(was_training)
    if tokens == 0:
        raise ValueError("the held-out examples have no labelled tokens")
    return HeldOutLoss(total / tokens, tokens)
