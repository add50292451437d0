"""Preference pairs (the data of DPO, ORPO, SimPO): a prompt with a chosen and a rejected answer.

Formats (detected per record from its keys by detect_pair_format; a dataset's format may force sharegpt or
alpaca):
  prompt    TRL: {"prompt", "chosen", "rejected", "system"?}, each a string or a list of messages
            ([{"role", "content"}]). A string prompt is one user turn and a string answer one assistant turn;
            a message-list prompt may hold several turns and ends with a user turn; an answer list holds the
            assistant turn(s) that follow it (only the last one is scored; any before it must be the same in
            chosen and rejected).
  sharegpt  LLaMA-Factory: {"conversations": [{"from", "value"}, ...], "chosen": {"from": "gpt", "value"},
            "rejected": {"from": "gpt", "value"}, "system"?}; the conversation ends with the question.
  alpaca    {"instruction", "input"?, "chosen", "rejected", "system"?, "history"?: [[question, answer], ...]}

Each pair becomes two conversations, prompt + chosen and prompt + rejected, encoded by the ChatRenderer with
labels on the final answer (and the end-of-turn token that closes it) only, whatever data.train_on says: that
is what a preference objective scores. Both token sequences must begin with the same prompt tokens;
prompt_tokens is where their labels start.

Problems are handled as those of SFT data: `file:line: field: reason`, counted per kind, data.on_error
fail|skip, left-out records written to the skipped file. Besides SFT's kinds: `identical answers` (chosen
and rejected the same, whitespace around them aside) and `prompt mismatch` (the two sequences do not share
the prompt). data.too_long: truncate cuts the start of the prompt of both sequences alike, and drops (and
counts) a pair whose answer does not fit with at least one token of prompt before it (the first answer token
is predicted from the token before it); drop drops the pair (counted); fail makes it a problem (data.on_error
decides); split has no meaning for pairs (a ConfigError). The data cache is not used.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from qflash.config import DataConfig, DatasetSpec
from qflash.data.formats import (
    PAIR_KEYS,
    Conversation,
    ROLES,
    SHAREGPT_ROLES,
    _fill,
    _history,
    _Issues,
    _missing_placeholders,
    _need_text,
    _turn_list,
    detect_format,
    detect_pair_format,
)
from qflash.data.pipeline import CHUNK, _apply_weight, encoding_lines, held_out
from qflash.data.problems import Problem, count_by_kind, format_counts, problems_error, write_problems_jsonl
from qflash.data.readers import FileRead, Record, read_one, resolve_files
from qflash.data.template import IGNORE, ChatRenderer, Example
from qflash.errors import ConfigError, DataError
from qflash.once import log_once
from qflash.paths import qflash_home

__all__ = ["PairExample", "PairStats", "build_pairs", "detect_pair_format"]

log = logging.getLogger(__name__)

FORCED_FORMATS = ("sharegpt", "alpaca")
"""Dataset formats that name a pair format (TRL's prompt/chosen/rejected has no DatasetSpec.format: auto finds it)."""


@dataclass
class PairExample:
    """One preference pair, tokenized: both sequences start with the same prompt_tokens ids (labels IGNORE there)
    and carry labels on their final answer only."""

    chosen: Example
    rejected: Example
    prompt_tokens: int
    """Length of the shared prompt prefix in tokens (= index of the first labelled token of both)."""
    file: str = ""
    line: int = 0

    @property
    def tokens(self) -> int:
        """Tokens of the pair with the shared prompt counted once."""
        return len(self.chosen.input_ids) + len(self.rejected.input_ids) - self.prompt_tokens

    @property
    def trained_tokens(self) -> int:
        return self.chosen.n_trained + self.rejected.n_trained

    @property
    def longest(self) -> int:
        return max(len(self.chosen.input_ids), len(self.rejected.input_ids))


@dataclass
class PairStats:
    records: int = 0
    """Records read from the files, good and bad."""
    pairs: int = 0
    """Pairs returned (after the eval split and weights)."""
    tokens: int = 0
    """Tokens of the pairs returned, each shared prompt counted once."""
    trained_tokens: int = 0
    """Answer tokens (chosen + rejected, with their end-of-turn tokens)."""
    prompt_tokens: int = 0
    """Prompt tokens, each pair's counted once."""
    longest: int = 0
    """Longest sequence (prompt + answer)."""
    per_file: dict[str, int] = field(default_factory=dict)
    """Pairs returned per dataset path."""
    formats: dict[str, int] = field(default_factory=dict)
    """Pair format -> records read as that format."""
    problems: dict[str, int] = field(default_factory=dict)
    """Reason -> records left out under data.on_error=skip."""
    skipped: int = 0
    dropped_too_long: int = 0
    """Pairs left out as longer than data.max_len: by data.too_long=drop, or by truncate ..."""
    answer_too_long: int = 0
    """... when the answer did not fit with any prompt (these are in dropped_too_long too)."""
    truncated: int = 0
    held_out: int = 0
    """Pairs of the training datasets held out for evaluation by data.eval_ratio."""
    skipped_path: str | None = None

    def add(self, pair: PairExample) -> None:
        self.pairs += 1
        self.tokens += pair.tokens
        self.trained_tokens += pair.trained_tokens
        self.prompt_tokens += pair.prompt_tokens
        self.longest = max(self.longest, pair.longest)

    def summary(self) -> str:
        """One line: what was read, what came out, and everything left out or changed."""
        formats = f" ({format_counts(self.formats)})" if self.formats else ""
        parts = [f"{self.pairs:,} preference pairs from {self.records:,} records{formats}",
                 f"{self.tokens:,} tokens ({self.prompt_tokens:,} prompt, counted once per pair; "
                 f"{self.trained_tokens:,} in answers), longest sequence {self.longest:,}"]
        if self.skipped:
            parts.append(f"skipped {self.skipped:,} bad record(s) ({format_counts(self.problems)})")
        if self.dropped_too_long:
            why = (f", {self.answer_too_long:,} of them because the answer alone does not fit "
                   "(data.too_long=truncate keeps whole answers only)" if self.answer_too_long else "")
            parts.append(f"dropped {self.dropped_too_long:,} longer than data.max_len{why}")
        if self.truncated:
            parts.append(f"truncated the prompt of {self.truncated:,} to data.max_len")
        if self.held_out:
            parts.append(f"held out {self.held_out:,} for evaluation")
        if self.skipped_path:
            parts.append(f"left-out records written to {self.skipped_path}")
        return "; ".join(parts)


# ---------------------------------------------------------------------------------------------
# Record -> prompt turns + chosen turns + rejected turns


@dataclass
class _Msg:
    role: str
    content: str
    field: str
    """Where the content is in the record (prompt.2.content, chosen.value, instruction)."""
    role_field: str
    """Where its role is (prompt.2.role); a turn read from a plain string: that string's field."""


@dataclass
class _PairConv:
    prompt: list[dict[str, str]]
    chosen: list[dict[str, str]]
    rejected: list[dict[str, str]]
    file: str
    line: int
    raw: Any
    fmt: str


def _from_list(d: dict, key: str, role_key: str, content_key: str, role_map: dict[str, str],
               issues: _Issues) -> list[_Msg]:
    return [_Msg(t.role, t.content, f"{t.field}.{content_key}", f"{t.field}.{role_key}")
            for t in _turn_list(d, key, role_key, content_key, role_map, issues)]


def _is_text_parts(value: list) -> bool:
    """OpenAI content parts ([{"type": "text", "text": ...}]): one text, not a list of messages."""
    return bool(value) and all(isinstance(p, dict) and "type" in p for p in value)


def _trl_side(d: dict, key: str, role: str, issues: _Issues) -> list[_Msg] | None:
    """TRL's prompt/chosen/rejected: a string (one `role` turn) or a list of messages."""
    value = d.get(key)
    if isinstance(value, list) and not _is_text_parts(value):
        turns = _from_list(d, key, "role", "content", {r: r for r in ROLES}, issues)
        return turns or None
    if value is not None and not isinstance(value, (str, list)):
        issues.add(key, f"expected a string or a list of messages, got {type(value).__name__}", "wrong type")
        return None
    text = _need_text(d, key, key, issues)
    return None if text is None else [_Msg(role, text, key, key)]


def _system(d: dict, prompt: list[_Msg], issues: _Issues) -> list[_Msg]:
    """The record's `system`, put first unless the prompt begins with a system turn (as for SFT ShareGPT)."""
    system = d.get("system")
    if not system or (prompt and prompt[0].role == "system"):
        return prompt
    if not isinstance(system, str):
        issues.add("system", f"expected a string, got {type(system).__name__}", "wrong type")
        return prompt
    return [_Msg("system", system, "system", "system")] + prompt


def _prompt_format(d: dict, issues: _Issues) -> tuple[list[_Msg], list[_Msg], list[_Msg]]:
    prompt = _trl_side(d, "prompt", "user", issues)
    chosen = _trl_side(d, "chosen", "assistant", issues)
    rejected = _trl_side(d, "rejected", "assistant", issues)
    return _system(d, prompt or [], issues), chosen or [], rejected or []


def _sharegpt_answer(d: dict, key: str, issues: _Issues) -> list[_Msg]:
    """LLaMA-Factory's chosen/rejected: one message {"from": "gpt", "value": ...}."""
    msg = d.get(key)
    if msg is None:
        issues.add(key, "missing", "missing content")
        return []
    if not isinstance(msg, dict):
        issues.add(key, f'expected a message {{"from": "gpt", "value": ...}}, got {type(msg).__name__}', "wrong type")
        return []
    role = msg.get("from")
    if role not in SHAREGPT_ROLES:
        issues.add(f"{key}.from", f"unknown role {role!r}; expected gpt or assistant", "unknown role")
        return []
    text = _need_text(msg, "value", f"{key}.value", issues)
    return [] if text is None else [_Msg(SHAREGPT_ROLES[role], text, f"{key}.value", f"{key}.from")]


def _sharegpt_format(d: dict, issues: _Issues) -> tuple[list[_Msg], list[_Msg], list[_Msg]]:
    prompt = _from_list(d, "conversations", "from", "value", SHAREGPT_ROLES, issues)
    return (_system(d, prompt, issues), _sharegpt_answer(d, "chosen", issues),
            _sharegpt_answer(d, "rejected", issues))


def _alpaca_format(d: dict, issues: _Issues) -> tuple[list[_Msg], list[_Msg], list[_Msg]]:
    prompt: list[_Msg] = []
    if d.get("system"):
        system = _need_text(d, "system", "system", issues)
        if system is not None:
            prompt.append(_Msg("system", system, "system", "system"))
    prompt += [_Msg(role, text, where, where) for role, text, where in _history(d, issues)]
    instruction = _need_text(d, "instruction", "instruction", issues)
    extra = d.get("input") or ""
    if not isinstance(extra, str):
        issues.add("input", f"expected a string, got {type(extra).__name__}", "wrong type")
        extra = ""
    if instruction is not None:
        text = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        prompt.append(_Msg("user", text, "instruction", "instruction"))
    answers = []
    for key in ("chosen", "rejected"):
        if d.get(key) is not None and not isinstance(d[key], str):
            issues.add(key, f"expected a string, got {type(d[key]).__name__}", "wrong type")
            answers.append([])
            continue
        text = _need_text(d, key, key, issues)
        answers.append([] if text is None else [_Msg("assistant", text, key, key)])
    return prompt, answers[0], answers[1]


_BUILDERS = {"prompt": _prompt_format, "sharegpt": _sharegpt_format, "alpaca": _alpaca_format}


def _order_problems(prompt: list[_Msg], sides: dict[str, list[_Msg]], prompt_key: str, issues: _Issues) -> None:
    """system? then user/assistant alternating, user first, ending with a user turn; each answer side
    assistant/user alternating, assistant first and last."""
    body = prompt[1:] if prompt and prompt[0].role == "system" else prompt
    if not body:
        issues.add(prompt_key, "no user turn: the prompt needs a question for the answers to reply to",
                   "wrong turn order")
        return
    for i, m in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if m.role != expected:
            what = ("a system message is only allowed first" if m.role == "system" else
                    f"turn {i}: expected {'an' if expected == 'assistant' else 'a'} {expected} turn, got {m.role} "
                    "(turns must alternate, user first)")
            issues.add(m.role_field, what, "wrong turn order")
            return
    if body[-1].role != "user":
        issues.add(body[-1].role_field, "the prompt must end with a user turn, the one the chosen and rejected "
                   f"answers reply to; it ends with an {body[-1].role} turn", "wrong turn order")
        return
    for key, turns in sides.items():
        for i, m in enumerate(turns):
            expected = "assistant" if i % 2 == 0 else "user"
            if m.role != expected:
                issues.add(m.role_field, f"turn {i} of {key}: expected {'an' if expected == 'assistant' else 'a'} "
                           f"{expected} turn, got {m.role} ({key} holds the answer that follows the prompt, "
                           "not the prompt again)", "wrong turn order")
                break
        else:
            if turns and turns[-1].role != "assistant":
                issues.add(turns[-1].role_field, f"{key} must end with an assistant turn, the answer",
                           "wrong turn order")


def _filled(turns: list[_Msg], variables: dict[str, str], issues: _Issues) -> list[dict[str, str]]:
    missing: list[str] = []
    out = []
    for m in turns:
        out.append({"role": m.role, "content": _fill(m.content, variables, missing)})
        _missing_placeholders(missing, m.field, issues)
    return out


def _normalize_pair(record: Record, fmt: str, variables: dict[str, str]) -> _PairConv | list[Problem]:
    """The record as a prompt with its two answers, or every problem it has. fmt: a pair format, or auto."""
    issues = _Issues(record)
    d = record.data
    if not isinstance(d, dict):
        issues.add("", f"expected a JSON object, got {type(d).__name__}", "not an object")
        return issues.items
    if fmt == "auto":
        fmt = detect_pair_format(d)  # type: ignore[assignment]
        if fmt is None:
            issues.add("", f"not a preference pair (keys: {sorted(map(str, d))[:6]}); expected "
                       f"{', or '.join(PAIR_KEYS.values())}", "unknown format")
            return issues.items
    prompt, chosen, rejected = _BUILDERS[fmt](d, issues)
    if issues.items:
        return issues.items
    _order_problems(prompt, {"chosen": chosen, "rejected": rejected},
                    {"prompt": "prompt", "sharegpt": "conversations", "alpaca": "instruction"}[fmt], issues)
    if issues.items:
        return issues.items
    p, c, r = (_filled(t, variables, issues) for t in (prompt, chosen, rejected))
    if issues.items:
        return issues.items
    if c[:-1] != r[:-1]:
        issues.add("rejected", "the turns before its final answer differ from chosen's; only the final answer may "
                   "differ (the turns before it are part of the prompt)", "prompt mismatch")
    elif c[-1]["content"].strip() == r[-1]["content"].strip():
        issues.add("rejected", "the same answer as chosen; a pair needs two different answers", "identical answers")
    return issues.items or _PairConv(p, c, r, record.file, record.line, d, fmt)


# ---------------------------------------------------------------------------------------------
# Tokens: both sequences, the shared prompt, data.max_len


def _first_label(ex: Example) -> int | None:
    at = np.flatnonzero(np.asarray(ex.labels) != IGNORE)
    return int(at[0]) if len(at) else None


def _shared_prompt(pc: _PairConv, chosen: Example, rejected: Example) -> int | Problem:
    """prompt_tokens of the pair, or the problem of two sequences that do not begin with the same prompt."""
    c, r = _first_label(chosen), _first_label(rejected)
    for key, at in (("chosen", c), ("rejected", r)):
        if at is None:
            return Problem(pc.file, pc.line, key, "no trained tokens after rendering; check the chat template",
                           "template mismatch", pc.raw)
    if c != r or not np.array_equal(np.asarray(chosen.input_ids)[:c], np.asarray(rejected.input_ids)[:r]):
        return Problem(pc.file, pc.line, "", f"the chosen and rejected sequences do not begin with the same prompt "
                       f"tokens (their answers start at tokens {c} and {r}); the chat template renders the prompt "
                       "differently for the two answers", "prompt mismatch", pc.raw)
    return c  # type: ignore[return-value]


@dataclass
class _Fitted:
    pair: PairExample | None
    truncated: bool = False
    reason: str = ""
    answer_too_long: bool = False


def _trim_end(ex: Example) -> int:
    """Length without what follows the last labelled token (the template's text after the end-of-turn)."""
    return int(np.flatnonzero(np.asarray(ex.labels) != IGNORE)[-1]) + 1


def _fit_pair(pair: PairExample, max_len: int, policy: str) -> _Fitted:
    """The pair within max_len tokens per data.too_long (see the module docstring)."""
    lc, lr = len(pair.chosen.input_ids), len(pair.rejected.input_ids)
    if max(lc, lr) <= max_len:
        return _Fitted(pair)
    lengths = f"pair is {lc} tokens (chosen) and {lr} (rejected), {pair.prompt_tokens} of them the prompt"
    if policy == "drop":
        return _Fitted(None, reason=f"{lengths}: longer than data.max_len={max_len}; dropped (data.too_long=drop)")
    if policy == "fail":
        return _Fitted(None, reason=(f"{lengths}: longer than data.max_len={max_len}; raise data.max_len, or set "
                                     "data.too_long=truncate (cuts the start of the prompt) or drop"))
    ends = _trim_end(pair.chosen), _trim_end(pair.rejected)
    cut = max(0, max(ends) - max_len)
    if cut >= pair.prompt_tokens:  # not even one prompt token would be left before the answer
        answer = max(ends) - pair.prompt_tokens
        return _Fitted(None, answer_too_long=True, reason=(
            f"{lengths}: its longer answer alone is {answer} tokens, so with any prompt it exceeds "
            f"data.max_len={max_len}; dropped (data.too_long=truncate keeps whole answers only; raise data.max_len "
            "to keep it)"))

    def cut_one(ex: Example, end: int) -> Example:
        return Example(np.asarray(ex.input_ids)[cut:end], np.asarray(ex.labels)[cut:end], ex.file, ex.line)

    return _Fitted(PairExample(cut_one(pair.chosen, ends[0]), cut_one(pair.rejected, ends[1]),
                               pair.prompt_tokens - cut, pair.file, pair.line), truncated=True)


@dataclass
class _DatasetPairs:
    spec: DatasetSpec
    pairs: list[PairExample]
    records: int
    problems: list[Problem]
    dropped: list[Problem]
    truncated: int = 0
    answer_too_long: int = 0
    formats: dict[str, int] = field(default_factory=dict)
    encodings: dict[str, str] = field(default_factory=dict)


def _encode(convs: Sequence[_PairConv], cfg: DataConfig, renderer: ChatRenderer, out: _DatasetPairs) -> None:
    """Both conversations of each pair, tokenized in chunks, checked and fitted to max_len, into `out`."""
    for k in range(0, len(convs), CHUNK):
        chunk = convs[k:k + CHUNK]
        encoded = renderer.encode_many([Conversation(pc.prompt + answer, pc.file, pc.line)
                                        for pc in chunk for answer in (pc.chosen, pc.rejected)])
        for j, pc in enumerate(chunk):
            chosen, rejected = encoded[2 * j], encoded[2 * j + 1]
            bad = [(key, res) for key, res in (("chosen", chosen), ("rejected", rejected)) if isinstance(res, Problem)]
            if bad:
                for key, res in bad:
                    res.field, res.raw = res.field or key, pc.raw
                    out.problems.append(res)
                continue
            prompt_tokens = _shared_prompt(pc, chosen, rejected)  # type: ignore[arg-type]
            if isinstance(prompt_tokens, Problem):
                out.problems.append(prompt_tokens)
                continue
            fitted = _fit_pair(PairExample(chosen, rejected, prompt_tokens, pc.file, pc.line),  # type: ignore[arg-type]
                              cfg.max_len, cfg.too_long)
            if fitted.pair is not None:
                out.pairs.append(fitted.pair)
                out.truncated += fitted.truncated
                continue
            problem = Problem(pc.file, pc.line, "", fitted.reason, "too long", pc.raw)
            (out.problems if cfg.too_long == "fail" else out.dropped).append(problem)
            out.answer_too_long += fitted.answer_too_long


# ---------------------------------------------------------------------------------------------
# Datasets and files


def _check_spec(spec: DatasetSpec, where: str) -> None:
    if spec.format not in ("auto",) + FORCED_FORMATS:
        raise ConfigError(f"{where}.format: {spec.format!r} is not a preference-pair format; use auto (detects "
                          "TRL prompt/chosen/rejected, ShareGPT and Alpaca pairs), sharegpt or alpaca")
    if spec.columns or spec.prompt_template:
        raise ConfigError(f"{where}: columns and prompt_template do not apply to preference pairs; give the records "
                          f"as {', '.join(PAIR_KEYS.values())}")


def _check_file_holds_pairs(fr: FileRead) -> None:
    """A file none of whose records is a preference pair: one error saying what it holds and what pairs look like."""
    if not fr.records or any(detect_pair_format(r.data) for r in fr.records):
        return
    expected = f"a pair record has {', or '.join(PAIR_KEYS.values())}"
    sft = [f for f in (detect_format(r.data) for r in fr.records[:50]) if f]
    if sft:
        raise DataError(f"{fr.path}: holds conversations for supervised fine-tuning ({sft[0]} format), not "
                        f"preference pairs; {expected}")
    keys = fr.columns or sorted({str(k) for r in fr.records[:50] if isinstance(r.data, dict) for k in r.data})
    raise DataError(f"{fr.path}: no preference pairs in it (keys: {keys[:10]}); {expected}")


def _read_dataset(spec: DatasetSpec, where: str, cfg: DataConfig, renderer: ChatRenderer) -> _DatasetPairs:
    _check_spec(spec, where)
    files, _ = resolve_files(spec.path)
    reads = [read_one(f, cfg.encoding) for f in files]
    for fr in reads:
        _check_file_holds_pairs(fr)
    out = _DatasetPairs(spec, [], 0, [p for fr in reads for p in fr.problems], [],
                        encodings={fr.path: fr.encoding for fr in reads})
    out.records = sum(len(fr.records) for fr in reads) + len({(p.file, p.line) for p in out.problems})
    convs: list[_PairConv] = []
    for rec in (rec for fr in reads for rec in fr.records):
        res = _normalize_pair(rec, spec.format, cfg.vars)
        if isinstance(res, list):
            out.problems += res
            continue
        convs.append(res)
        out.formats[res.fmt] = out.formats.get(res.fmt, 0) + 1
    _encode(convs, cfg, renderer, out)
    order = {str(f): i for i, f in enumerate(files)}
    out.problems.sort(key=lambda p: (order.get(p.file, 0), p.line))
    return out


def _default_skipped_path(results: Sequence[_DatasetPairs], split: str) -> Path:
    tag = hashlib.sha256(json.dumps([r.spec.path for r in results]).encode()).hexdigest()[:12]
    return qflash_home() / "skipped" / f"pairs-{split}-{tag}.jsonl"


def build_pairs(
    cfg: DataConfig,
    renderer: ChatRenderer,
    *,
    split: str = "train",
    seed: int = 0,
    skipped_path: Path | None = None,
) -> tuple[list[PairExample], PairStats]:
    """The preference pairs of a split: `train` (datasets, minus the data.eval_ratio share, weighted) or `eval`
    (eval_datasets plus that share); the same seed for both calls makes the shares complementary.

    skipped_path: where skip mode writes the records it leaves out (default under $QFLASH_HOME/skipped/).
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', not {split!r}")
    if cfg.too_long == "split":
        raise ConfigError("data.too_long: split cuts a sample into pieces, which a preference pair cannot be; set "
                          "data.too_long to truncate (cuts the start of the prompt), drop or fail")
    pair_renderer = renderer.with_train_on("last_assistant")  # the final answer is what a pair scores
    need_train = split == "train" or cfg.eval_ratio > 0
    train = [_read_dataset(s, f"data.datasets[{i}]", cfg, pair_renderer)
             for i, s in enumerate(cfg.datasets if need_train else [])]
    evals = [_read_dataset(s, f"data.eval_datasets[{i}]", cfg, pair_renderer)
             for i, s in enumerate(cfg.eval_datasets if split == "eval" else [])]
    results = train + evals
    problems = [p for r in results for p in r.problems]
    dropped = [p for r in results for p in r.dropped]
    if problems and cfg.on_error == "fail":
        raise problems_error(problems)
    stats = PairStats()
    if problems or dropped:
        skipped_path = skipped_path or _default_skipped_path(results, split)
        write_problems_jsonl(problems + dropped, skipped_path)
        stats.skipped_path = str(skipped_path)

    pairs: list[PairExample] = []
    for i, r in enumerate(train):
        held = held_out(len(r.pairs), cfg.eval_ratio, f"{seed}:{i}")
        stats.held_out += len(held)
        if split == "train":
            part = _apply_weight([p for k, p in enumerate(r.pairs) if k not in held], r.spec.weight, seed + i)
        else:
            part = [r.pairs[k] for k in sorted(held)]
        stats.per_file[r.spec.path] = stats.per_file.get(r.spec.path, 0) + len(part)
        pairs += part
    for r in evals:
        stats.per_file[r.spec.path] = stats.per_file.get(r.spec.path, 0) + len(r.pairs)
        pairs += r.pairs
    for r in results:
        stats.records += r.records
        stats.truncated += r.truncated
        stats.answer_too_long += r.answer_too_long
        for fmt, n in r.formats.items():
            stats.formats[fmt] = stats.formats.get(fmt, 0) + n
        for line in encoding_lines(r.encodings):
            log_once(log, f"data: {line}", logging.INFO)
    for p in pairs:
        stats.add(p)
    stats.problems = count_by_kind(problems)
    stats.skipped = len({(p.file, p.line) for p in problems})
    stats.dropped_too_long = len(dropped)
    if stats.skipped or stats.dropped_too_long or stats.truncated:
        log.warning("data: %s", stats.summary())
    if split == "train" and not pairs:
        files = [f for r in results for f in r.encodings] or [r.spec.path for r in results]
        raise DataError(f"data.datasets: no preference pairs to train on in {', '.join(files[:5])}"
                        f"{f' and {len(files) - 5} more' if len(files) > 5 else ''}: {stats.summary()}")
    return pairs, stats


def holds_pairs(paths: Sequence[str | Path]) -> bool:
    """True when the first readable record of `paths` is a preference pair (chosen/rejected). Records that cannot
    be read are not this question's business (the pipeline reports them); a path that cannot be read answers False."""
    from qflash.data.readers import read_path

    for path in paths:
        try:
            reads = read_path(Path(path))
        except Exception:  # noqa: BLE001 - missing or unreadable: the pipeline says what is wrong
            return False
        for fr in reads:
            for record in fr.records:
                return detect_pair_format(record.data) is not None
    return False
