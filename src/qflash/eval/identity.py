"""Does the fine-tuned model name its configured identity? Base vs adapter on held-out questions."""

from __future__ import annotations

from dataclasses import dataclass

from qflash.errors import ConfigError
from qflash.eval.metrics import names_identity
from qflash.infer.generate import LoadedModel


@dataclass
class IdentityRow:
    question: str
    base: str
    tuned: str
    base_named: bool
    tuned_named: bool


def compare_identity(loaded: LoadedModel, n: int, max_new_tokens: int) -> list[IdentityRow]:
    """Ask the first n held-out questions to the base model (adapter disabled) and to the fine-tuned one."""
    from qflash.eval.evaluate import ask_both, held_out_questions
    from qflash.ui import console

    cfg = loaded.cfg
    if not loaded.has_adapter:
        raise ConfigError("compare needs a run with an adapter")
    name = cfg.data.vars.get("name")
    if not name:
        raise ConfigError("data.vars.name: the run has no identity name to look for")
    if not cfg.data.eval_datasets:
        raise ConfigError("data.eval_datasets: the run has no held-out identity questions to ask")
    questions = held_out_questions(cfg, cfg.data.eval_datasets)[:n]
    # The base model's answers come from the cache after the first time (they depend on no adapter).
    tuned, base, _ = ask_both(loaded, [q.messages for q in questions], max_new_tokens, "identity questions",
                              console.print)
    return [
        IdentityRow(q.text, b, t, names_identity(b, name), names_identity(t, name))
        for q, (b, _), (t, _) in zip(questions, base, tuned)
    ]
