"""Samples longer than data.max_len: truncate, split, drop or fail (data.too_long).

Truncation keeps the last assistant reply whole, with its end-of-turn token, and gives up context
from the left: the system prompt and early turns go first. A reply cut at its beginning becomes
context (it is no longer trained: the model would learn to continue a reply it never saw start).
When the last reply alone is longer than max_len, no truncation can keep it whole: that sample is
a problem. Samples trained on every token (format text, train_on=all) keep their last max_len
tokens, so the end-of-sequence token stays.

Splitting (data.too_long=split) is for samples trained on every token (raw text, train_on=all): the
sample becomes consecutive pieces of at most max_len tokens, each starting with the last token of the one
before as context (its label IGNORE there), so every next-token target of the sample is trained exactly
once — only the context each one sees is limited to its piece. Other samples cannot be split without
training replies whose beginning was cut off: they are problems (truncate or drop them).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qflash.data.template import IGNORE, Example


@dataclass
class Fitted:
    """The outcome for one sample: the example to keep (None if not kept) and why not."""

    example: Example | None
    truncated: bool = False
    reason: str = ""
    pieces: list[Example] | None = None
    """data.too_long=split: the pieces the sample became (example is then None)."""

    @property
    def kept(self) -> list[Example]:
        return self.pieces if self.pieces is not None else [self.example] if self.example is not None else []


def split_pieces(ex: Example, max_len: int) -> list[Example] | None:
    """Pieces of at most max_len tokens overlapping by one token (see the module docstring); None when the
    sample is not trained on every token."""
    labels = np.asarray(ex.labels)
    ids = np.asarray(ex.input_ids)
    if max_len < 2 or not (labels != IGNORE).all():
        return None
    step = max_len - 1
    pieces = []
    for start in range(0, len(ids) - 1, step):
        piece_labels = labels[start:start + max_len].copy()
        if start > 0:
            piece_labels[0] = IGNORE  # the previous piece's last token, context here
        pieces.append(Example(ids[start:start + max_len], piece_labels, ex.file, ex.line))
    return pieces


def truncate_left(ex: Example, max_len: int) -> Example | None:
    """The sample cut to max_len tokens as described above, or None when the last reply does not fit."""
    labels = np.asarray(ex.labels)
    ids = np.asarray(ex.input_ids)
    trained = labels != IGNORE
    trained_at = np.flatnonzero(trained)
    if len(trained_at) == 0:
        return None
    end = int(trained_at[-1]) + 1  # nothing after the last end-of-turn token is worth keeping
    if trained.all():
        start = max(0, end - max_len)
    else:
        untrained_before = np.flatnonzero(~trained[:end])
        reply_start = int(untrained_before[-1]) + 1 if len(untrained_before) else 0
        if end - reply_start > max_len:
            return None
        start = max(0, end - max_len)
    kept_labels = labels[start:end].copy()
    if start > 0 and trained[start] and trained[start - 1] and not trained.all():
        first_context = np.flatnonzero(~trained[start:end])[0]
        kept_labels[:first_context] = IGNORE  # the cut reply is context now
    return Example(ids[start:end], kept_labels, ex.file, ex.line)


def fit_to_max_len(ex: Example, max_len: int, policy: str) -> Fitted:
    n = len(ex.input_ids)
    if n <= max_len:
        return Fitted(ex)
    if policy == "drop":
        return Fitted(None, reason=f"sample is {n} tokens, longer than data.max_len={max_len}; dropped (data.too_long=drop)")
    if policy == "fail":
        return Fitted(None, reason=(f"sample is {n} tokens, longer than data.max_len={max_len}; raise data.max_len, "
                                    "or set data.too_long=truncate or drop (split: raw text)"))
    if policy == "split":
        pieces = split_pieces(ex, max_len)
        if pieces is None:
            return Fitted(None, reason=(f"sample is {n} tokens, longer than data.max_len={max_len}, and not trained on "
                                        "every token, so it cannot be split (a piece would train a reply whose start "
                                        "it cannot see); raise data.max_len or set data.too_long=truncate or drop"))
        return Fitted(None, pieces=pieces)
    cut = truncate_left(ex, max_len)
    if cut is None:
        return Fitted(None, reason=(f"sample is {n} tokens and its last assistant reply alone is longer than "
                                    f"data.max_len={max_len}, so truncation cannot keep it; raise data.max_len "
                                    "or set data.too_long=drop"))
    return Fitted(cut, truncated=True)
