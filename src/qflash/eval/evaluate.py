"""`qflash eval RUN_DIR`: what a fine-tune learned and what it kept, next to the base model.

For the fine-tuned model and for the base model (the same loaded model with its adapter disabled):
held-out loss and perplexity, identity accuracy on every held-out identity question, stop rate, and,
on control prompts (general questions outside the training data), the spill of the identity into the
answers and the closeness of the answers to the base model's. The base model's greedy answers come
from the cache the replay regularizer fills (data/replay.py) when the same questions were asked
before with the same model, quantization and length limit; the report says which.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from qflash.config import Config, DatasetSpec
from qflash.data.formats import Conversation
from qflash.data.pipeline import build_examples, load_conversations
from qflash.data.replay import GENERATION_BATCH, Answer, Messages, Prompt, cached_answers, key_for, load_prompts, replay_examples
from qflash.errors import ConfigError
from qflash.train.held_out import held_out_loss
from qflash.data.preference import holds_pairs
from qflash.eval.preference import preference_numbers
from qflash.eval.metrics import Closeness, closeness_sums, combine, names_identity, share, spill_rate

Say = Callable[[str], None]


@dataclass
class Question:
    messages: Messages
    """The conversation up to the user turn that the reference reply answers."""
    reference: str
    where: str

    @property
    def text(self) -> str:
        return self.messages[-1]["content"]


@dataclass
class Side:
    """One model's numbers (fine-tuned, or the base model)."""

    eval_loss: float | None = None
    perplexity: float | None = None
    identity_accuracy: float | None = None
    stop_rate: float | None = None
    spill: float | None = None
    control_kl: float | None = None
    control_agreement: float | None = None
    likelihood_accuracy: float | None = None
    preference_accuracy: float | None = None
    preference_margin: float | None = None

    def as_dict(self) -> dict:
        return dict(vars(self))


@dataclass
class ControlResult:
    prompts: list[Prompt]
    tuned: list[Answer]
    base: list[Answer]
    base_from_cache: bool
    tuned_spill: float | None
    base_spill: float | None
    closeness: Closeness | None
    base_closeness: Closeness | None
    """The base model against itself: KL 0 and agreement 1 up to rounding, a check of the measurement."""


@dataclass
class EvalResult:
    run: str
    name: str | None
    tuned: Side
    base: Side
    eval_tokens: int = 0
    questions: list[Question] = field(default_factory=list)
    tuned_answers: list[Answer] = field(default_factory=list)
    base_answers: list[Answer] = field(default_factory=list)
    identity_questions: int = 0
    control: ControlResult | None = None
    settings: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    preference_pairs: int = 0
    preference_start: str = ""
    """What preference_accuracy compares the tuned model with (eval/preference.py)."""


# ---------------------------------------------------------------------------------------------
# Generation: fine-tuned answers directly, base answers through the cache


def _generate(loaded, convs: list[Messages], max_new_tokens: int, batch_size: int = GENERATION_BATCH) -> list[Answer]:
    from qflash.infer.generate import answer

    return answer(loaded, convs, max_new_tokens=max_new_tokens, batch_size=batch_size)


def _base_model_dir_and_dtype(loaded):
    from qflash.model.loading import compute_dtype, resolve_model_dir

    cfg = loaded.cfg
    return resolve_model_dir(cfg.model.path), compute_dtype(cfg.quant.compute_dtype, loaded.device)


def ask_both(loaded, convs: list[Messages], max_new_tokens: int, what: str, say: Say) -> tuple[list[Answer], list[Answer], bool]:
    """(fine-tuned answers, base answers, base answers came from the cache), with progress."""
    t0 = time.perf_counter()

    def progress(model: str) -> Callable[[int, int], None]:
        return lambda done, total: say(f"{what}: {model} {done}/{total} ({time.perf_counter() - t0:.0f}s)")

    tuned: list[Answer] = []
    show = progress("fine-tuned")
    show(0, len(convs))
    for k in range(0, len(convs), GENERATION_BATCH):
        tuned += _generate(loaded, convs[k:k + GENERATION_BATCH], max_new_tokens)
        show(len(tuned), len(convs))

    model_dir, dtype = _base_model_dir_and_dtype(loaded)
    key = key_for(loaded.cfg, model_dir, loaded.renderer, loaded.device, dtype, convs, max_new_tokens)

    def base_generate(batch: list[Messages]) -> list[Answer]:
        with loaded.model.disable_adapter():
            return _generate(loaded, batch, max_new_tokens)

    base, hit = cached_answers(key, convs, base_generate, progress=progress("base model"))
    if hit:
        say(f"{what}: base model answers from the cache")
    return tuned, base, hit


# ---------------------------------------------------------------------------------------------
# Held-out questions, control prompts


def held_out_questions(cfg: Config, specs: Sequence[DatasetSpec]) -> list[Question]:
    """Every held-out conversation as (conversation up to its last user turn, last assistant reply)."""
    out: list[Question] = []
    for spec in specs:
        for conv in load_conversations(spec, cfg.data.vars, cfg.data.encoding):
            q = _question(conv)
            if q is not None:
                out.append(q)
    return out


def _question(conv: Conversation) -> Question | None:
    msgs = conv.messages
    last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
    if last is None or last == 0 or msgs[last - 1]["role"] != "user":
        return None
    return Question([dict(m) for m in msgs[:last]], msgs[last]["content"], conv.where)


def teacher_forced_closeness(loaded, prompts: Sequence[Prompt], base: Sequence[Answer],
                             rows: int = 8) -> tuple[Closeness | None, Closeness | None]:
    """(fine-tuned vs base, base vs base) over the base model's greedy answers, teacher-forced.

    Each answer is rendered after its prompt with the chat template; the positions that predict its
    tokens (and the end-of-turn, when the base model stopped there) are compared. Right-padded batches
    of `rows` answers: padding comes after every real token, so causal attention never sees it.
    """
    from qflash.data.batching import pad_batch
    from qflash.data.template import IGNORE

    examples, _ = replay_examples(prompts, base, loaded.renderer, max_len=1 << 30, unfinished="keep")
    model = loaded.model
    tuned_parts, base_parts = [], []
    with torch.inference_mode(), loaded.compute():
        for k in range(0, len(examples), rows):
            b = pad_batch(examples[k:k + rows], list(range(k, k + rows)), loaded.tokenizer.pad_token_id).to(loaded.device)
            kw = {"input_ids": b.input_ids, "attention_mask": b.attention_mask, "use_cache": False}
            tuned_logits = model(**kw).logits  # (rows, seq, vocab)
            with model.disable_adapter():
                base_logits = model(**kw).logits
            for row in range(b.input_ids.shape[0]):
                where = (b.labels[row, 1:] != IGNORE).nonzero().squeeze(1)  # positions predicting answer tokens
                t, bl = tuned_logits[row].index_select(0, where), base_logits[row].index_select(0, where)
                tuned_parts.append(closeness_sums(bl, t))
                base_parts.append(closeness_sums(bl, bl))
    return combine(tuned_parts), combine(base_parts)


def control_metrics(loaded, prompts: Sequence[Prompt], max_new_tokens: int, say: Say) -> ControlResult:
    """Spill and closeness on control prompts, fine-tuned and base."""
    name, author = loaded.cfg.data.vars.get("name", ""), loaded.cfg.data.vars.get("author")
    convs = [p.messages for p in prompts]
    tuned, base, hit = ask_both(loaded, convs, max_new_tokens, "control prompts", say)
    say("control prompts: comparing next-token distributions on the base model's answers")
    close, base_close = teacher_forced_closeness(loaded, prompts, base)
    spill = (lambda answers: spill_rate([t for t, _ in answers], name, author)) if name else (lambda a: None)
    return ControlResult(list(prompts), tuned, base, hit, spill(tuned), spill(base), close, base_close)


# ---------------------------------------------------------------------------------------------
# The whole evaluation


def _eval_specs(cfg: Config, data: Sequence[str] | None) -> tuple[Config, list[DatasetSpec]]:
    """The run's config with the held-out split to use: --data files, else the run's own."""
    cfg = copy.deepcopy(cfg)
    if data:
        cfg.data.eval_datasets = [DatasetSpec(path=str(p)) for p in data]
        cfg.data.eval_ratio = 0.0
        for i, p in enumerate(data):
            if not Path(p).exists():
                raise ConfigError(f"--data: {p}: file not found")
    else:
        keys = [(f"data.eval_datasets.{i}.path", s.path) for i, s in enumerate(cfg.data.eval_datasets)]
        if cfg.data.eval_ratio > 0:
            keys += [(f"data.datasets.{i}.path", s.path) for i, s in enumerate(cfg.data.datasets)]
        for key, path in keys:
            if not Path(path).exists():
                raise ConfigError(f"{key}: {path}: file not found (the run's config; paths are relative to "
                                  f"{Path.cwd()}: run from where you trained, or pass --data FILE)")
        if not keys:
            raise ConfigError("the run has no held-out data (data.eval_datasets, data.eval_ratio); pass --data FILE")
    return cfg, cfg.data.eval_datasets


def generation_budget(loaded, questions: Sequence[Question], floor: int) -> int:
    """Room to answer: eval.max_new_tokens, or the longest reference reply + 16 tokens if that is more,
    so that the stop rate measures stopping, not the length of the references."""
    longest = max((len(loaded.tokenizer(q.reference, add_special_tokens=False)["input_ids"]) for q in questions), default=0)
    return max(floor, longest + 16)


def evaluate_run(
    run: str | Path,
    *,
    data: Sequence[str] | None = None,
    control: str | None = None,
    max_new_tokens: int | None = None,
    limit: int | None = None,
    say: Say = lambda s: None,
    trust_remote_code: bool = False,
) -> EvalResult:
    from qflash.infer.generate import load_for_inference

    t0 = time.perf_counter()
    loaded = load_for_inference(adapter=str(run), trust_remote_code=trust_remote_code)
    if not loaded.has_adapter:
        raise ConfigError(f"{run}: no adapter to evaluate")
    cfg, specs = _eval_specs(loaded.cfg, data)
    name = cfg.data.vars.get("name") or None
    result = EvalResult(str(run), name, Side(), Side())
    if cfg.train.objective != "sft" or (data and holds_pairs(list(data))):
        budget = _preference_part(result, loaded, cfg, say)
    else:
        budget = _supervised_part(result, loaded, cfg, specs, limit, max_new_tokens, say)

    # ---- control prompts: spill and closeness ----
    control_path = control or cfg.eval.control_prompts
    control_budget = cfg.eval.control_max_new_tokens
    if control_path:
        if not Path(control_path).is_file():
            key = "--control" if control else "eval.control_prompts"
            raise ConfigError(f"{key}: {control_path}: file not found")
        prompts = load_prompts(control_path, cfg.data.vars)
        c = control_metrics(loaded, prompts, control_budget, say)
        result.control = c
        result.tuned.spill, result.base.spill = c.tuned_spill, c.base_spill
        if c.closeness is not None:
            result.tuned.control_kl, result.tuned.control_agreement = c.closeness.kl, c.closeness.agreement
        if c.base_closeness is not None:
            result.base.control_kl, result.base.control_agreement = c.base_closeness.kl, c.base_closeness.agreement
    else:
        result.notes.append("no control prompts (eval.control_prompts or --control): no spill, no closeness")

    result.settings = {
        "held_out": [s.path for s in specs] + ([f"{cfg.data.eval_ratio:g} of data.datasets"] if cfg.data.eval_ratio else []),
        "max_new_tokens": budget,
        "control_prompts": control_path or None,
        "control_max_new_tokens": control_budget if control_path else None,
        "base_answers_cached": {"held_out": result.settings.pop("held_out_cached", None),
                                "control": result.control.base_from_cache if result.control else None},
    }
    result.seconds = time.perf_counter() - t0
    return result


def _supervised_part(result: EvalResult, loaded, cfg: Config, specs, limit, max_new_tokens, say: Say) -> int:
    """Held-out loss, identity accuracy and stop rate of both models; returns the answer length used."""
    from qflash.model.attention import choice_of

    say("held-out loss ...")
    examples, _ = build_examples(cfg.data, loaded.renderer, split="eval", seed=cfg.train.seed)
    if examples:
        kw = dict(pad_id=loaded.tokenizer.pad_token_id, device=loaded.device, max_len=cfg.data.max_len,
                  rows=cfg.train.micro_batch_size, packing=cfg.data.packing, varlen=choice_of(loaded.model).varlen)
        tuned_loss = held_out_loss(loaded.model, examples, autocast=loaded.compute(), **kw)
        with loaded.model.disable_adapter():
            base_loss = held_out_loss(loaded.model, examples, autocast=loaded.compute(), **kw)
        result.eval_tokens = tuned_loss.tokens
        result.tuned.eval_loss, result.tuned.perplexity = tuned_loss.loss, tuned_loss.perplexity
        result.base.eval_loss, result.base.perplexity = base_loss.loss, base_loss.perplexity
    else:
        result.notes.append("the held-out split has no samples: no eval loss")

    # ---- held-out questions: identity accuracy and stop rate ----
    questions = held_out_questions(cfg, specs)
    if limit is not None:
        questions = questions[:limit]
    result.questions = questions
    budget = max_new_tokens or generation_budget(loaded, questions, cfg.eval.max_new_tokens)
    hit = None
    if questions:
        tuned, base, hit = ask_both(loaded, [q.messages for q in questions], budget, "held-out questions", say)
        result.tuned_answers, result.base_answers = tuned, base
        result.tuned.stop_rate = share([s for _, s in tuned])
        result.base.stop_rate = share([s for _, s in base])
        if result.name:
            ident = [k for k, q in enumerate(questions) if names_identity(q.reference, result.name)]
            result.identity_questions = len(ident)
            result.tuned.identity_accuracy = share([names_identity(tuned[k][0], result.name) for k in ident])
            result.base.identity_accuracy = share([names_identity(base[k][0], result.name) for k in ident])
        else:
            result.notes.append("data.vars.name is not set: no identity accuracy")
    else:
        result.notes.append("no held-out questions (conversations with an assistant reply): no stop rate")

    result.settings["held_out_cached"] = hit
    return budget


def _preference_part(result: EvalResult, loaded, cfg: Config, say: Say) -> int:
    """Held-out preference pairs (eval/preference.py): preference accuracy and margin of the tuned model against
    its starting point, likelihood accuracy of both; returns the control prompts' default answer length."""
    from qflash.data.preference import build_pairs

    pairs, stats = build_pairs(cfg.data, loaded.renderer, split="eval", seed=cfg.train.seed)
    if not pairs:
        result.notes.append("the held-out split has no preference pairs: no preference accuracy")
        return cfg.eval.max_new_tokens

    def progress(which: str):
        return lambda done, total: say(f"preference pairs, {which}: {done}/{total}")

    p = preference_numbers(loaded, pairs, micro=cfg.train.micro_batch_size, max_len=cfg.data.max_len,
                           start_adapter=cfg.model.adapter, progress=progress)
    result.tuned.preference_accuracy, result.tuned.preference_margin = p.accuracy, p.margin
    result.tuned.likelihood_accuracy, result.base.likelihood_accuracy = (p.tuned_likelihood_accuracy,
                                                                         p.start_likelihood_accuracy)
    result.preference_pairs, result.preference_start = p.pairs, p.start
    if stats.skipped or stats.dropped_too_long:
        result.notes.append(f"preference pairs: {stats.summary()}")
    return cfg.eval.max_new_tokens


def is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
