"""The sample stream and padded micro-batches.

The stream is the concatenation of one seeded permutation of the examples per epoch. Optimizer
step k consumes stream positions [k*B, (k+1)*B) with B = micro_batch_size * grad_accum, so the data
position of a run is a single integer, and which samples a step sees never depends on how the run
was interrupted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qflash.data.template import IGNORE, Example


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


class SampleStream:
    """Which example indices each optimizer step consumes (per-epoch permutation cached)."""

    def __init__(self, n: int, seed: int, samples_per_step: int):
        self.n, self.seed, self.per_step = n, seed, samples_per_step
        self._epoch, self._order = -1, []

    def ids(self, step: int) -> list[int]:
        out = []
        for pos in range(step * self.per_step, (step + 1) * self.per_step):
            epoch, offset = divmod(pos, self.n)
            if epoch != self._epoch:
                self._epoch, self._order = epoch, epoch_order(self.n, self.seed, epoch)
            out.append(self._order[offset])
        return out

    def epoch_of(self, step: int) -> float:
        return step * self.per_step / self.n


@dataclass
class Batch:
    input_ids: torch.Tensor  # (batch, seq)
    labels: torch.Tensor  # (batch, seq), IGNORE where no loss
    attention_mask: torch.Tensor  # (batch, seq), 1 = real token
    sample_ids: list[int]

    @property
    def real_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def to(self, device: torch.device) -> "Batch":
        return Batch(
            self.input_ids.to(device), self.labels.to(device), self.attention_mask.to(device), self.sample_ids
        )


def pad_batch(examples: list[Example], sample_ids: list[int], pad_id: int) -> Batch:
    """Right-padded batch; padding carries no loss and is masked out of attention."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return Batch(ids, labels, mask, sample_ids)


def step_micro_batches(
    examples: list[Example], sample_ids: list[int], micro_batch_size: int, pad_id: int
) -> list[Batch]:
    """Split one step's samples into micro-batches, grouped by length so little is padded.

    The grouping cannot change the step's loss or gradient: the loss is normalized by the
    step's total number of trained tokens, whatever the split.
    """
    order = sorted(sample_ids, key=lambda i: (len(examples[i].input_ids), i))
    return [
        pad_batch([examples[i] for i in chunk], chunk, pad_id)
        for chunk in (order[k : k + micro_batch_size] for k in range(0, len(order), micro_batch_size))
    ]


def trained_tokens(batch: Batch) -> int:
    """Tokens that carry loss: labels shifted by one (the first position predicts nothing)."""
    return int((batch.labels[:, 1:] != IGNORE).sum())
