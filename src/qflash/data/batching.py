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
        if n < 1:  # build_examples refuses an empty training set with the reason; this is the last guard
            raise ValueError("SampleStream: no samples to draw from")
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
    """One micro-batch. Padded: rows with an attention mask. Packed: documents back to back, with
    position_ids restarting at 0 per document and, for varlen kernels, cu_seqlens."""

    input_ids: torch.Tensor  # (rows, seq)
    labels: torch.Tensor  # (rows, seq), IGNORE where no loss
    sample_ids: list[int]
    attention_mask: torch.Tensor | None = None  # (rows, seq), 1 = real token; padded batches only
    position_ids: torch.Tensor | None = None  # (rows, seq); packed batches only
    cu_seqlens: torch.Tensor | None = None  # (documents + 1,) int32; varlen packed batches only
    max_seqlen: int = 0
    real_tokens: int = 0
    # Set by to() when moving from the CPU, so the step needs no device-to-host sync for them:
    label_index: torch.Tensor | None = None  # positions of labels[:, 1:].reshape(-1) that carry a label
    host_input_ids: torch.Tensor | None = None  # input_ids, still on the CPU (train.embedding_on_cpu)

    def to(self, device: torch.device) -> "Batch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        label_index, host_ids = self.label_index, self.host_input_ids
        if self.labels.device.type == "cpu":
            label_index = labelled_positions(self.labels)
            host_ids = self.input_ids
        return Batch(
            move(self.input_ids), move(self.labels), self.sample_ids, move(self.attention_mask),
            move(self.position_ids), move(self.cu_seqlens), self.max_seqlen, self.real_tokens,
            move(label_index), host_ids,
        )

    def model_inputs(self) -> dict:
        """Keyword arguments for the model's forward: computed once per batch, shared by every layer."""
        kw: dict = {"input_ids": self.input_ids, "use_cache": False}
        if self.attention_mask is not None:
            kw["attention_mask"] = self.attention_mask
        if self.position_ids is not None:
            kw["position_ids"] = self.position_ids
        if self.cu_seqlens is not None:
            kw.update(cu_seq_lens_q=self.cu_seqlens, cu_seq_lens_k=self.cu_seqlens,
                      max_length_q=self.max_seqlen, max_length_k=self.max_seqlen)
            from qflash.model.attention import NO_MASK

            if self.attention_mask is None:
                kw["attention_mask"] = NO_MASK  # no mask to build: the varlen kernels read cu_seqlens
        # (packed for sdpa/eager: no cu_seqlens, and transformers builds the block-diagonal mask from position_ids)
        return kw


def labelled_positions(labels: torch.Tensor) -> torch.Tensor:
    """Where next-token targets exist: positions of labels[:, 1:].reshape(-1) other than IGNORE."""
    return (labels[:, 1:].reshape(-1) != IGNORE).nonzero().squeeze(1)


def pad_batch(examples: list[Example], sample_ids: list[int], pad_id: int) -> Batch:
    """Right-padded batch; padding carries no loss and is masked out of attention."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.as_tensor(e.input_ids)
        labels[row, :n] = torch.as_tensor(e.labels)
        mask[row, :n] = 1
    return Batch(ids, labels, sample_ids, attention_mask=mask, real_tokens=int(mask.sum()))


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


def pack_rows(examples: list[Example], sample_ids: list[int], *, varlen: bool) -> Batch:
    """Documents back to back in one row, position_ids restarting at 0 for each.

    varlen: the row holds real tokens only and carries cu_seqlens for the varlen kernels.
    The first token of every document gets no label: nothing before it in the row may predict it.
    """
    docs = [examples[i] for i in sample_ids]
    ids = torch.cat([torch.as_tensor(d.input_ids, dtype=torch.long) for d in docs])
    labels = torch.cat([torch.as_tensor(d.labels, dtype=torch.long) for d in docs]).clone()
    lengths = torch.tensor([len(d.input_ids) for d in docs])
    starts = torch.cumsum(lengths, 0) - lengths
    labels[starts] = IGNORE
    positions = torch.cat([torch.arange(n) for n in lengths.tolist()])
    cu = torch.zeros(len(docs) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lengths, 0)
    return Batch(
        ids[None], labels[None], sample_ids, position_ids=positions[None],
        cu_seqlens=cu if varlen else None, max_seqlen=int(lengths.max()), real_tokens=int(lengths.sum()),
    )


def stack_rows(rows: list[Batch], pad_id: int) -> Batch:
    """Packed rows (each one bin) padded to one (rows, width) tensor for SDPA/eager."""
    width = max(r.input_ids.shape[1] for r in rows)
    n = len(rows)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE, dtype=torch.long)
    # Padding continues the last document's positions: it sits after every real token of the row,
    # so causal attention never lets a real token see it.
    positions = torch.arange(width).repeat(n, 1)
    for k, r in enumerate(rows):
        w = r.input_ids.shape[1]
        ids[k, :w], labels[k, :w], positions[k, :w] = r.input_ids[0], r.labels[0], r.position_ids[0]
        positions[k, w:] = r.position_ids[0, -1] + 1 + torch.arange(width - w)
    return Batch(ids, labels, [i for r in rows for i in r.sample_ids], position_ids=positions,
                 max_seqlen=max(r.max_seqlen for r in rows), real_tokens=sum(r.real_tokens for r in rows))


def packed_micro_batches(
    examples: list[Example], sample_ids: list[int], micro_batch_size: int, capacity: int, pad_id: int, *, varlen: bool
) -> list[Batch]:
    """One step's samples, best-fit-decreasing into bins of `capacity` tokens, at most `micro_batch_size` bins per
    micro-batch, as few micro-batches as that allows, with the tokens spread evenly over them (balanced_groups)."""
    from qflash.data.stats import balanced_groups, best_fit_decreasing

    lengths = [len(examples[i].input_ids) for i in sample_ids]
    bins = best_fit_decreasing(lengths, capacity)
    sizes = [sum(lengths[j] for j in b) for b in bins]
    bins = [[sample_ids[j] for j in sorted(b)] for b in bins]
    out = []
    for members in balanced_groups(sizes, micro_batch_size):
        group = [bins[k] for k in members]
        if varlen:
            out.append(pack_rows(examples, [i for b in group for i in b], varlen=True))
        else:
            out.append(stack_rows([pack_rows(examples, b, varlen=False) for b in group], pad_id))
    return out


def trained_tokens(batch: Batch) -> int:
    """Tokens that carry loss: labels shifted by one (the first position predicts nothing)."""
    return int((batch.labels[:, 1:] != IGNORE).sum())
