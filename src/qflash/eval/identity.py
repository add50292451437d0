"""Does the fine-tuned model name its configured identity? Base vs adapter on held-out questions."""

from __future__ import annotations

from dataclasses import dataclass

from qflash.data.pipeline import load_conversations
from qflash.errors import ConfigError
from qflash.eval.metrics import names_identity
from qflash.infer.generate import Loaded, answer


@dataclass
class IdentityRow:
    question: str
    base: str
    tuned: str
    base_named: bool
    tuned_named: bool


def held_out_questions(loaded: Loaded, n: int) -> list[str]:
    cfg = loaded.cfg
    if not cfg.data.eval_datasets:
        raise ConfigError("data.eval_datasets: the run has no held-out identity questions to ask")
    questions: list[str] = []
    for spec in cfg.data.eval_datasets:
        for conv in load_conversations(spec, cfg.data.vars):
            questions.append(next(m["content"] for m in conv.messages if m["role"] == "user"))
    return questions[:n]


def compare_identity(loaded: Loaded, n: int, max_new_tokens: int) -> list[IdentityRow]:
    """Ask the first n held-out questions to the base model (adapter disabled) and to the fine-tuned one."""
    if not loaded.has_adapter:
        raise ConfigError("compare needs a run with an adapter")
    name = loaded.cfg.data.vars.get("name")
    if not name:
        raise ConfigError("data.vars.name: the run has no identity name to look for")
    questions = held_out_questions(loaded, n)
    convs = [[{"role": "user", "content": q}] for q in questions]
    tuned = answer(loaded, convs, max_new_tokens=max_new_tokens)
    with loaded.model.disable_adapter():
        base = answer(loaded, convs, max_new_tokens=max_new_tokens)
    return [
        IdentityRow(q, b, t, names_identity(b, name), names_identity(t, name))
        for q, (b, _), (t, _) in zip(questions, base, tuned)
    ]
