"""Numbers about tokenized data: packing estimate (best-fit decreasing) and a length histogram."""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Sequence

import numpy as np


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` packed into bins of `capacity` tokens, best-fit decreasing.

    Longest first, each into the bin it fills most tightly (least room left), else a new bin.
    Deterministic: ties go to the shorter index first and to the older bin.
    """
    if any(n > capacity for n in lengths):
        raise ValueError(f"a length is larger than the bin capacity {capacity}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[tuple[int, int]] = []  # sorted (free tokens, bin index)
    for i in order:
        n = lengths[i]
        at = bisect.bisect_left(room, (n, -1))
        if at < len(room):
            free, b = room.pop(at)
        else:
            free, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        if free - n > 0:
            bisect.insort(room, (free - n, b))
    return bins


def balanced_groups(sizes: Sequence[int], per_group: int) -> list[list[int]]:
    """Indices of `sizes` in ceil(len / per_group) groups of at most `per_group`, the sums as even as greedy gets.

    Largest first, each into the group with the smallest sum that has room (ties: the earlier group); groups
    come out largest sum first, indices ascending. Best-fit-decreasing leaves its emptiest bins last: grouped
    in order, a step's last micro-batch would get the leftovers (a 7B step of 17k tokens in micro-batches of
    8k: 8k, 8k and 1k tokens — the last too small to keep the GPU busy). Deterministic.
    """
    if per_group < 1:
        raise ValueError("per_group must be at least 1")
    n_groups = -(-len(sizes) // per_group)
    groups: list[list[int]] = [[] for _ in range(n_groups)]
    sums = [0] * n_groups
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        g = min((k for k in range(n_groups) if len(groups[k]) < per_group), key=lambda k: (sums[k], k))
        groups[g].append(i)
        sums[g] += sizes[i]
    order = sorted(range(n_groups), key=lambda k: (-sums[k], k))
    return [sorted(groups[k]) for k in order]


@dataclass
class PackingEstimate:
    bins: int
    capacity: int
    tokens: int

    @property
    def efficiency(self) -> float:
        """Share of the packed batches' token slots that hold real tokens."""
        return self.tokens / (self.bins * self.capacity) if self.bins else 0.0


def estimate_packing(lengths: Sequence[int], capacity: int) -> PackingEstimate:
    bins = best_fit_decreasing(lengths, capacity)
    return PackingEstimate(len(bins), capacity, int(sum(lengths)))


def length_histogram(lengths: np.ndarray, max_len: int, buckets: int = 8) -> list[tuple[int, int, int]]:
    """(low, high, count) for equal-width buckets over [1, max_len]."""
    edges = np.linspace(0, max_len, buckets + 1).round().astype(int)
    # bucket k holds the lengths in (edges[k], edges[k+1]]
    which = np.searchsorted(edges[1:], np.clip(np.asarray(lengths), 1, max_len), side="left")
    counts = np.bincount(which, minlength=buckets)
    return [(int(edges[k]) + 1, int(edges[k + 1]), int(counts[k])) for k in range(buckets)]
