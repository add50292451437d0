"""The numbers `qflash eval` and the demo report, as plain functions of answers and logits.

- identity accuracy: share of identity questions whose answer names the identity;
- stop rate: share of generations that ended with the end-of-turn token before the length limit;
- spill: share of answers to control prompts (general questions outside the training data) that
  mention the identity (its name or its author): the "one answer for everything" failure;
- closeness to the base model on control prompts, teacher-forcing the base model's greedy answer:
  mean per-token KL(base || fine-tuned) of the next-token distributions, and top-1 agreement (share
  of those positions where both models' most likely next token is the same).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F


def names_identity(text: str, name: str) -> bool:
    """Does `text` mention `name`? Case-insensitive; a Latin-letter name must not be part of a longer
    word ("Ana" is not in "banana"), while Chinese text around it is fine ("我叫Nova，...")."""
    if not name:
        return False
    pattern = re.escape(name.casefold())
    if name[0].isascii() and name[0].isalpha():
        pattern = r"(?<![a-z])" + pattern
    if name[-1].isascii() and name[-1].isalpha():
        pattern += r"(?![a-z])"
    return re.search(pattern, text.casefold()) is not None


def share(flags: Sequence[bool]) -> float | None:
    """Share of True; None for no items (a rate of nothing is not 0)."""
    return sum(bool(f) for f in flags) / len(flags) if flags else None


def identity_accuracy(answers: Sequence[str], name: str) -> float | None:
    return share([names_identity(a, name) for a in answers])


def mentions_identity(text: str, name: str, author: str | None = None) -> bool:
    """The name, or the author when one is given: either in a general answer is the identity leaking."""
    return names_identity(text, name) or bool(author and names_identity(text, author))


def spill_rate(answers: Sequence[str], name: str, author: str | None = None) -> float | None:
    return share([mentions_identity(a, name, author) for a in answers])


def stop_rate(stopped: Sequence[bool]) -> float | None:
    return share(stopped)


@dataclass
class Closeness:
    kl: float
    """Mean over answer tokens of KL(base || other), in nats."""
    agreement: float
    """Share of answer tokens where both models' top-1 next token is the same."""
    tokens: int


def closeness_sums(base_logits: torch.Tensor, other_logits: torch.Tensor) -> tuple[float, int, int]:
    """(sum of KL(base || other), positions where the argmaxes agree, positions) for (positions, vocab) logits."""
    if base_logits.shape != other_logits.shape or base_logits.dim() != 2:
        raise ValueError(f"logits must be (positions, vocab) of the same shape, got {tuple(base_logits.shape)} "
                         f"and {tuple(other_logits.shape)}")
    log_p = F.log_softmax(base_logits.float(), dim=-1)
    log_q = F.log_softmax(other_logits.float(), dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).clamp_min(0)  # (positions,); clamp: rounding below 0
    agree = (base_logits.argmax(-1) == other_logits.argmax(-1)).sum()
    return float(kl.sum()), int(agree), base_logits.shape[0]


def combine(parts: Sequence[tuple[float, int, int]]) -> Closeness | None:
    """Token-weighted Closeness over several answers' closeness_sums."""
    tokens = sum(n for _, _, n in parts)
    if tokens == 0:
        return None
    return Closeness(sum(k for k, _, _ in parts) / tokens, sum(a for _, a, _ in parts) / tokens, tokens)
