"""Sampling options and request messages: what chat, generate and serve accept, checked.

Torch-free, so building the command line (whose --help comes from these docstrings) stays fast.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from dataclasses import dataclass
from typing import Any, Callable

from qflash.errors import ConfigError, QflashError

ROLES = ("system", "user", "assistant")


@dataclass
class SamplingOptions:
    temperature: float = 0.0
    """0 = greedy (deterministic); above 0 samples from the softmax at that temperature."""
    top_p: float = 1.0
    """Nucleus sampling: sample among the most likely tokens that together hold this probability (sampling only)."""
    max_new_tokens: int = 256
    """Longest reply, in tokens (clamped to what the context window leaves)."""
    repetition_penalty: float = 1.0
    """>1 makes tokens already in the prompt or the reply less likely (1 = off)."""
    seed: int | None = None
    """Seed of the sampler, for reproducible sampled replies."""

    def problems(self) -> list[tuple[str, str]]:
        """(field, reason) for every value out of range; empty when all are usable."""
        out = []
        if not 0.0 <= self.temperature <= 100.0:
            out.append(("temperature", "must be between 0 (greedy) and 100"))
        if not 0.0 < self.top_p <= 1.0:
            out.append(("top_p", "must be in (0, 1]"))
        if self.max_new_tokens < 1:
            out.append(("max_new_tokens", "must be >= 1"))
        if not self.repetition_penalty > 0.0:
            out.append(("repetition_penalty", "must be > 0 (1 = off)"))
        return out

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def checked(self, name: Callable[[str], str] = lambda f: f) -> "SamplingOptions":
        """self, or a ConfigError naming every bad value (`name` spells a field as the user wrote it)."""
        bad = self.problems()
        if bad:
            raise ConfigError("; ".join(f"{name(f)}: {reason}" for f, reason in bad))
        return self


def option_help(cls: type = SamplingOptions) -> dict[str, str]:
    """The docstring under each field of a dataclass, for --help."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for stmt, nxt in zip(body, body[1:]):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


class MessageError(QflashError):
    """A malformed messages list; `field` is the dotted path of the bad part (messages.2.content)."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field, self.reason = field, reason


def check_messages(value: Any, field: str = "messages") -> list[dict[str, str]]:
    """A conversation in OpenAI's shape, checked and normalized to [{role, content: str}].

    content may be a string or a list of text parts ([{"type": "text", "text": ...}]), which are joined.
    The last message must be the user's: that is the turn the model answers.
    """
    if not isinstance(value, list) or not value:
        raise MessageError(field, 'expected a non-empty list of {"role": ..., "content": ...} objects')
    out = []
    for i, m in enumerate(value):
        where = f"{field}.{i}"
        if not isinstance(m, dict):
            raise MessageError(where, 'expected an object {"role": ..., "content": ...}')
        role = m.get("role")
        if role not in ROLES:
            raise MessageError(f"{where}.role", f"expected one of {', '.join(ROLES)}, got {role!r}")
        out.append({"role": role, "content": _content_text(m.get("content"), f"{where}.content")})
    if out[-1]["role"] != "user":
        raise MessageError(f"{field}.{len(out) - 1}.role", "the last message must be the user's (the turn to answer)")
    return out


def _content_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise MessageError(f"{where}.{j}", 'only text parts {"type": "text", "text": ...} are supported')
            texts.append(part["text"])
        return "".join(texts)
    raise MessageError(where, "expected a string (or a list of text parts)")
