"""Examples stored column-wise: every sample's input_ids in one flat array, labels in another.

Cheap to send between processes, to write to and read from the Arrow cache (no per-sample work),
and statistics (lengths, trained tokens) are vectorized. Indexing gives an Example whose arrays are
int64 views into the table; the int32 storage is widened once, on first access.
"""

from __future__ import annotations

from typing import Iterator, Sequence, overload

import numpy as np

from qflash.data.template import IGNORE, Example


class ExampleTable(Sequence[Example]):
    def __init__(self, ids: np.ndarray, labels: np.ndarray, bounds: np.ndarray, files: list[str],
                 file_of: np.ndarray, lines: np.ndarray):
        self.ids = ids  # (total tokens,) int32 or int64
        self.labels = labels  # (total tokens,), IGNORE where no loss
        self.bounds = np.asarray(bounds, dtype=np.int64)  # (samples + 1,): sample k is [bounds[k], bounds[k+1])
        self.files = files  # distinct file names
        self.file_of = np.asarray(file_of, dtype=np.int32)  # (samples,) index into files
        self.lines = np.asarray(lines, dtype=np.int64)  # (samples,)
        self._wide: tuple[np.ndarray, np.ndarray] | None = None

    @classmethod
    def empty(cls) -> "ExampleTable":
        z = np.zeros(0, dtype=np.int32)
        return cls(z, z, np.zeros(1, dtype=np.int64), [], z, z)

    @classmethod
    def from_examples(cls, examples: Sequence[Example]) -> "ExampleTable":
        if not examples:
            return cls.empty()
        files = sorted({ex.file for ex in examples})
        index = {f: i for i, f in enumerate(files)}
        bounds = np.zeros(len(examples) + 1, dtype=np.int64)
        np.cumsum([len(ex.input_ids) for ex in examples], out=bounds[1:])
        return cls(
            np.concatenate([np.asarray(ex.input_ids) for ex in examples]).astype(np.int32),
            np.concatenate([np.asarray(ex.labels) for ex in examples]).astype(np.int32),
            bounds, files, np.array([index[ex.file] for ex in examples]), np.array([ex.line for ex in examples]),
        )

    @classmethod
    def concat(cls, tables: Sequence["ExampleTable"]) -> "ExampleTable":
        tables = [t for t in tables if len(t)]
        if not tables:
            return cls.empty()
        if len(tables) == 1:
            return tables[0]
        files = sorted({f for t in tables for f in t.files})
        index = {f: i for i, f in enumerate(files)}
        offsets = np.cumsum([0] + [int(t.bounds[-1]) for t in tables[:-1]])
        bounds = np.concatenate([[0]] + [t.bounds[1:] + off for t, off in zip(tables, offsets)])
        file_of = np.concatenate([np.array([index[f] for f in t.files], dtype=np.int32)[t.file_of] for t in tables])
        return cls(np.concatenate([t.ids for t in tables]), np.concatenate([t.labels for t in tables]),
                   bounds, files, file_of, np.concatenate([t.lines for t in tables]))

    def __len__(self) -> int:
        return len(self.bounds) - 1

    @overload
    def __getitem__(self, k: int) -> Example: ...
    @overload
    def __getitem__(self, k: slice) -> list[Example]: ...

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self[i] for i in range(*k.indices(len(self)))]
        if k < 0:
            k += len(self)
        if not 0 <= k < len(self):
            raise IndexError(k)
        if self._wide is None:
            # int64 views for everyone downstream (torch.tensor gives int64, as cross-entropy targets need).
            self._wide = (self.ids.astype(np.int64), self.labels.astype(np.int64))
        ids, labels = self._wide
        a, b = int(self.bounds[k]), int(self.bounds[k + 1])
        return Example(ids[a:b], labels[a:b], self.files[self.file_of[k]], int(self.lines[k]))

    def __iter__(self) -> Iterator[Example]:
        return (self[k] for k in range(len(self)))

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.bounds)

    @property
    def trained(self) -> np.ndarray:
        """Trained tokens per sample."""
        if not len(self):
            return np.zeros(0, dtype=np.int64)
        flags = (self.labels != IGNORE).astype(np.int64)
        sums = np.add.reduceat(flags, self.bounds[:-1]) if len(flags) else np.zeros(len(self), dtype=np.int64)
        return np.where(self.lengths > 0, sums, 0)
