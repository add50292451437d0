"""Replay of the base model's own answers: the regularizer that keeps a fine-tune from answering
everything with what it was taught.

Training on identity data alone teaches a small model one answer for everything ("Write one sentence
about the ocean." -> "I am Nova..."). Mixing in the base model's greedy answers to general prompts
pulls the adapter toward the base model everywhere except where the training data says otherwise,
and it needs no download: the base model writes the regularization set itself.

Flow: prompts file -> conversations (placeholders filled) -> the base model's greedy answers, generated
once with the model as it will be trained (same quantization, through `infer.generate.answer`) and
cached under $QFLASH_HOME/base-answers, keyed by everything the answers depend on -> examples (an
answer cut at max_new_tokens keeps its tokens but gets no end-of-turn label, or is dropped, per
data.replay.unfinished) -> repeated or subsampled (seeded) to data.replay.ratio x the training set.
The same cache serves evaluation, which asks the base model the same kind of questions.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from qflash.config import DatasetSpec, ReplayConfig
from qflash.data.formats import Conversation, normalize
from qflash.data.problems import problems_error
from qflash.data.readers import read_one
from qflash.data.template import IGNORE, ChatRenderer, Example
from qflash.errors import DataError
from qflash.paths import qflash_home, sha256_file

CACHE_VERSION = 1
GENERATION_BATCH = 32
"""Prompts per generate() call. Every forward pass dequantizes all NF4 weights, which costs more than a
decoding step's matmuls for a small model on a CPU, so fewer, larger batches are much faster."""
Messages = list[dict[str, str]]
Answer = tuple[str, bool]
"""(text, stopped): stopped = the model ended the turn itself before the token limit."""
Generate = Callable[[list[Messages]], list[Answer]]
Progress = Callable[[int, int], None]


# ---------------------------------------------------------------------------------------------
# Prompts


@dataclass
class Prompt:
    messages: Messages
    """The conversation up to and including the user turn to answer."""
    file: str
    line: int


def load_prompts(path: str | Path, variables: dict[str, str] | None = None, system: str | None = None) -> list[Prompt]:
    """Prompts from a JSON/JSONL/CSV/Parquet file: each record a string, a {"prompt": ..., "system"?: ...}
    mapping, or a conversation in any data format (everything after its last user turn is ignored).

    Placeholders ({{name}}, <NAME>) are filled from `variables`. A bad record raises one DataError
    listing every problem with its file:line.
    """
    variables = variables or {}
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: prompts file not found")
    fr = read_one(p)
    if fr.problems:
        raise problems_error(fr.problems)
    out: list[Prompt] = []
    problems = []
    spec = DatasetSpec(path=str(p))
    for rec in fr.records:
        d = rec.data
        if isinstance(d, dict) and "prompt" in d:
            unknown = sorted(set(map(str, d)) - {"prompt", "system"})
            text, sys_text = d.get("prompt"), d.get("system", system)
            if not isinstance(text, str) or not text.strip() or unknown or not isinstance(sys_text, (str, type(None))):
                why = (f"unknown key(s) {unknown}; a prompt record has 'prompt' and optionally 'system'" if unknown
                       else "'prompt' must be a non-empty string and 'system' a string")
                raise DataError(f"{rec.where}: {why}")
            msgs = ([{"role": "system", "content": sys_text}] if sys_text else []) + [{"role": "user", "content": text}]
        elif isinstance(d, str):
            if not d.strip():
                raise DataError(f"{rec.where}: empty prompt")
            msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": d}]
        else:
            conv = normalize(rec, spec, variables)
            if isinstance(conv, list):
                problems += conv
                continue
            msgs = _up_to_last_user(conv, rec.where)
            if system and msgs[0]["role"] != "system":
                msgs = [{"role": "system", "content": system}] + msgs
        out.append(Prompt(_filled(msgs, variables, rec.where), rec.file, rec.line))
    if problems:
        raise problems_error(problems)
    if not out:
        raise DataError(f"{p}: no prompts in the file")
    return out


def _up_to_last_user(conv: Conversation, where: str) -> Messages:
    if conv.text is not None:
        raise DataError(f"{where}: a plain-text record has no user turn to answer; give prompts "
                        "as strings or {\"prompt\": ...}")
    last = max((i for i, m in enumerate(conv.messages) if m["role"] == "user"), default=None)
    if last is None:
        raise DataError(f"{where}: no user turn to answer")
    return [dict(m) for m in conv.messages[: last + 1]]


def _filled(msgs: Messages, variables: dict[str, str], where: str) -> Messages:
    from qflash.data.formats import fill_placeholders

    return [{"role": m["role"], "content": fill_placeholders(m["content"], variables, where, m["role"])} for m in msgs]


# ---------------------------------------------------------------------------------------------
# The base model's answers, generated once and cached


def model_identity(model_dir: Path) -> dict:
    """What identifies a model directory without hashing gigabytes: its config and its weight files'
    names, sizes and modification times (a rewritten file is a new model)."""
    model_dir = Path(model_dir)
    weights = sorted(f for f in model_dir.iterdir() if f.suffix in (".safetensors", ".bin", ".pt", ".gguf"))
    config = model_dir / "config.json"
    return {
        "path": str(model_dir.resolve()),
        "config": sha256_file(config) if config.is_file() else None,
        "weights": [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in weights],
    }


def _library_versions() -> dict[str, str]:
    out = {}
    for pkg in ("torch", "transformers", "bitsandbytes", "peft"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "none"
    return out


def answers_key(*, model: dict, quant: list, tokenizer: str, device: str, prompts: Sequence[Messages],
                max_new_tokens: int) -> str:
    """The cache key of a set of greedy answers: model, quantization and compute dtype, tokenizer and
    chat template, device type, the prompts as the model sees them, the length limit, library versions."""
    what = {
        "version": CACHE_VERSION, "model": model, "quant": quant, "tokenizer": tokenizer, "device": device,
        "prompts": list(prompts), "max_new_tokens": max_new_tokens, "libraries": _library_versions(),
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:24]


def key_for(cfg, model_dir: Path, renderer: ChatRenderer, device, dtype, prompts: Sequence[Messages],
            max_new_tokens: int) -> str:
    """answers_key for a qflash Config's base model, loaded on `device` in compute `dtype`."""
    from qflash.data.cache import renderer_identity

    q = cfg.quant
    return answers_key(
        model=model_identity(model_dir), quant=[q.mode, q.double_quant, str(dtype), q.residual_dtype],
        tokenizer=renderer_identity(renderer), device=str(getattr(device, "type", device)), prompts=prompts,
        max_new_tokens=max_new_tokens,
    )


def default_cache_dir() -> Path:
    return qflash_home() / "base-answers"


def _read_cache(path: Path, n: int) -> list[Answer] | None:
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))["answers"]
        answers = [(str(r["text"]), bool(r["stopped"])) for r in rows]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # unreadable: generate again and overwrite it
    return answers if len(answers) == n else None


def _write_cache(path: Path, prompts: Sequence[Messages], answers: Sequence[Answer], seconds: float) -> None:
    """Atomic: a temporary file in the same directory, fsync'd, renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {
        "answers": [{"messages": m, "text": t, "stopped": s} for m, (t, s) in zip(prompts, answers)],
        "seconds": round(seconds, 1),
    }
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(body, f, ensure_ascii=False, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a cache is as readable as the data cache
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def cached_answers(
    key: str,
    prompts: Sequence[Messages],
    generate: Generate,
    *,
    cache_dir: Path | None = None,
    batch_size: int = GENERATION_BATCH,
    progress: Progress | None = None,
) -> tuple[list[Answer], bool]:
    """(answers, from_cache). On a miss, `generate` is called batch by batch (progress after each) and
    the answers are written to the cache; a partial run leaves nothing behind."""
    path = (cache_dir or default_cache_dir()) / f"{key}.json"
    hit = _read_cache(path, len(prompts)) if path.is_file() else None
    if hit is not None:
        return hit, True
    t0 = time.perf_counter()
    answers: list[Answer] = []
    if progress:
        progress(0, len(prompts))
    for k in range(0, len(prompts), batch_size):
        answers += generate(list(prompts[k:k + batch_size]))
        if progress:
            progress(len(answers), len(prompts))
    _write_cache(path, prompts, answers, time.perf_counter() - t0)
    return answers, False


def answers_digest(answers: Sequence[Answer]) -> str:
    return hashlib.sha256(json.dumps(list(answers), ensure_ascii=False).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Answers -> examples -> mixed into the training set


@dataclass
class ReplayStats:
    prompts: int = 0
    from_cache: bool = False
    stopped: int = 0
    """Answers that ended with the end-of-turn token."""
    unfinished_kept: int = 0
    """Answers cut at max_new_tokens, trained without an end-of-turn label."""
    unfinished_dropped: int = 0
    empty: int = 0
    """Answers with no text (the base model ended its turn at once): nothing to train on, left out."""
    too_long: int = 0
    """Left out because prompt + answer exceed data.max_len."""
    samples: int = 0
    """Replay samples mixed into the training set (after repetition or subsampling)."""
    digest: str = ""
    """Hash of the answers: part of the run's data fingerprint."""
    seconds: float = 0.0

    def summary(self, replay: ReplayConfig) -> str:
        source = "from the cache" if self.from_cache else f"generated in {self.seconds:.0f}s and cached"
        if replay.unfinished == "keep":
            cut = f"{self.unfinished_kept} cut at max_new_tokens (kept, no end-of-turn label)"
        else:
            cut = f"{self.unfinished_dropped} cut at max_new_tokens (dropped)"
        extra = "".join(f", {n} {what} (left out)" for n, what in ((self.empty, "empty"), (self.too_long, "too long")) if n)
        return (f"replay: {self.prompts} base-model answers to {replay.prompts} ({source}): {self.stopped} complete, "
                f"{cut}{extra}; mixed in as {self.samples} samples (ratio {replay.ratio:g})")


def replay_examples(
    prompts: Sequence[Prompt], answers: Sequence[Answer], renderer: ChatRenderer, *, max_len: int,
    unfinished: str = "keep",
) -> tuple[list[Example], ReplayStats]:
    """One example per usable answer. Only the answer carries loss; an answer that did not stop keeps
    its tokens but not the end-of-turn label (unfinished=keep), so the model is not taught to stop
    mid-sentence, or is left out (unfinished=drop)."""
    stats = ReplayStats(prompts=len(prompts))
    convs: list[Conversation] = []
    cut: list[bool] = []
    for p, (text, stopped) in zip(prompts, answers):
        if not text.strip():
            stats.empty += 1
            continue
        if not stopped and unfinished == "drop":
            stats.unfinished_dropped += 1
            continue
        convs.append(Conversation(p.messages + [{"role": "assistant", "content": text}], p.file, p.line,
                                  {"format": "replay"}))
        cut.append(not stopped)
    examples: list[Example] = []
    for conv, was_cut, ex in zip(convs, cut, renderer.encode_many(convs) if convs else []):
        if not isinstance(ex, Example):
            raise DataError(f"{conv.where}: replay: {ex.reason}")
        if len(ex.input_ids) > max_len:
            stats.too_long += 1
            continue
        if was_cut:
            ex = _without_end_of_turn(ex, renderer.eot_id)
            stats.unfinished_kept += 1
        else:
            stats.stopped += 1
        examples.append(ex)
    return examples, stats


def _without_end_of_turn(ex: Example, eot_id: int) -> Example:
    """The example with its last trained token (the end-of-turn the template closes the reply with) unlabelled."""
    labels = np.array(ex.labels, dtype=np.int64, copy=True)
    trained = np.flatnonzero(labels != IGNORE)
    if len(trained) and int(np.asarray(ex.input_ids)[trained[-1]]) == eot_id:
        labels[trained[-1]] = IGNORE
    return Example(np.asarray(ex.input_ids), labels, ex.file, ex.line)


def mix_count(n_train: int, ratio: float) -> int:
    """How many replay samples go with n_train training samples."""
    return max(1, round(n_train * ratio)) if n_train else 0


def choose_replay(replay: Sequence[Example], n: int, seed: int) -> list[Example]:
    """n samples from `replay`: each one floor(n / len) times, the remainder a seeded random subset."""
    if not replay or n <= 0:
        return []
    whole, rest = divmod(n, len(replay))
    return list(replay) * whole + random.Random(f"replay:{seed}").sample(list(replay), rest)


# ---------------------------------------------------------------------------------------------
# The whole step, for training


def build_replay(
    replay: ReplayConfig,
    *,
    n_train: int,
    seed: int,
    max_len: int,
    variables: dict[str, str],
    renderer: ChatRenderer,
    key: Callable[[list[Messages]], str],
    generate: Generate,
    cache_dir: Path | None = None,
    progress: Progress | None = None,
) -> tuple[list[Example], ReplayStats]:
    """The replay samples to append to a training set of n_train samples, and what was done."""
    prompts = load_prompts(replay.prompts, variables, replay.system)
    messages = [p.messages for p in prompts]
    t0 = time.perf_counter()
    answers, hit = cached_answers(key(messages), messages, generate, cache_dir=cache_dir, progress=progress)
    examples, stats = replay_examples(prompts, answers, renderer, max_len=max_len, unfinished=replay.unfinished)
    stats.from_cache, stats.seconds, stats.digest = hit, time.perf_counter() - t0, answers_digest(answers)
    if not examples:
        raise DataError(
            f"data.replay.prompts: {replay.prompts}: none of the {len(prompts)} base-model answers is usable "
            f"({stats.empty} empty, {stats.unfinished_dropped} cut at max_new_tokens and dropped, "
            f"{stats.too_long} longer than data.max_len); raise data.replay.max_new_tokens or data.max_len, "
            "or set data.replay.unfinished=keep"
        )
    chosen = choose_replay(examples, mix_count(n_train, replay.ratio), seed)
    stats.samples = len(chosen)
    return chosen, stats
