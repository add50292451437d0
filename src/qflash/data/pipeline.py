"""From the config's datasets to tokenized examples, with problems, statistics and a fingerprint.

Per dataset: read its files (records, and problems for what could not be read) -> normalize each
record (a Conversation, or its problems) -> render and tokenize (an Example, or a problem) -> fit
to data.max_len (data.too_long) -> cache. Then across datasets: the problems are settled by
data.on_error (fail: one DataError listing them; skip: counted per reason and written to a JSONL),
data.eval_ratio holds out a seeded share of each training dataset, and weights repeat or subsample.
Nothing is left out silently: every skipped or dropped record is counted in DataStats, logged,
and written with its file, line, reason and raw record.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import multiprocessing
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from qflash.once import log_once
from qflash.paths import qflash_home
from qflash.config import DataConfig, DatasetSpec
from qflash.data import cache
from qflash.data.formats import Conversation, check_columns_spec, needed_columns, normalize
from qflash.data.lengths import fit_to_max_len
from qflash.data.problems import Problem, count_by_kind, format_counts, problems_error, write_problems_jsonl
from qflash.data.readers import FileRead, Record, read_one, resolve_files
from qflash.data.table import ExampleTable
from qflash.data.template import ChatRenderer, Example
from qflash.errors import DataError

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]
"""progress(what, done, total): called as long work advances."""

CHUNK = 256  # conversations per tokenizer call (and per job sent to a worker process)
PARALLEL_MIN = 2000  # fewer conversations than this are not worth starting worker processes for


def _no_progress(what: str, done: int, total: int) -> None:
    pass


@dataclass
class DataStats:
    records: int = 0
    """Records read from the files, good and bad."""
    examples: int = 0
    """Samples returned (after the eval split and weights)."""
    tokens: int = 0
    trained_tokens: int = 0
    longest: int = 0
    per_file: dict[str, int] = field(default_factory=dict)
    """Samples returned per dataset path."""
    problems: dict[str, int] = field(default_factory=dict)
    """Reason -> records left out under data.on_error=skip."""
    skipped: int = 0
    dropped_too_long: int = 0
    truncated: int = 0
    split: int = 0
    """Samples split into pieces (data.too_long=split) ..."""
    pieces: int = 0
    """... and the pieces they became."""
    held_out: int = 0
    """Records of the training datasets held out for evaluation by data.eval_ratio."""
    skipped_path: str | None = None
    cache: dict[str, str] = field(default_factory=dict)
    """Dataset path -> hit, written or off."""

    def add(self, ex: Example) -> None:
        self.examples += 1
        self.tokens += len(ex.input_ids)
        self.trained_tokens += ex.n_trained
        self.longest = max(self.longest, len(ex.input_ids))


@dataclass
class DatasetResult:
    """One dataset read, checked, tokenized and fitted to max_len (before eval split and weight)."""

    spec: DatasetSpec
    examples: ExampleTable
    records: int
    problems: list[Problem]
    """Bad records (fail mode raises them, skip mode leaves them out)."""
    dropped: list[Problem]
    """Too long, left out by data.too_long=drop."""
    truncated: int
    encodings: dict[str, str] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)
    cache: str = "off"
    formats: dict[str, int] = field(default_factory=dict)
    """format -> records read as that format."""
    split: int = 0
    """Samples split into pieces by data.too_long=split ..."""
    pieces: int = 0
    """... and the pieces they became (consecutive in `examples`, with the sample's file and line)."""


class LazyRenderer:
    """A renderer built on first use, so that a cache hit never loads a tokenizer."""

    def __init__(self, source: ChatRenderer | Callable[[], ChatRenderer]):
        self._source = source
        self._renderer = source if isinstance(source, ChatRenderer) else None

    def get(self) -> ChatRenderer:
        if self._renderer is None:
            self._renderer = self._source()  # type: ignore[operator]
        return self._renderer


def default_cache_dir() -> Path:
    return qflash_home() / "data-cache"


# ---------------------------------------------------------------------------------------------
# Records -> examples, in chunks, in worker processes for large datasets


@dataclass
class EncodedChunk:
    """One chunk of records normalized, tokenized and fitted to max_len (columnar: cheap to send
    back from a worker process)."""

    table: ExampleTable
    problems: list[Problem] = field(default_factory=list)
    dropped: list[Problem] = field(default_factory=list)
    truncated: int = 0
    unknown_format: dict[str, int] = field(default_factory=dict)
    """file -> records whose format could not be told."""
    formats: dict[str, int] = field(default_factory=dict)
    """format -> records read as that format (auto detects per record)."""
    split: int = 0
    """Samples longer than max_len split into pieces (data.too_long=split) ..."""
    pieces: int = 0
    """... and the pieces they became."""
    pair_records: dict[str, int] = field(default_factory=dict)
    """file -> records that are preference pairs (chosen/rejected), not conversations."""
    extra_turn_sequences: int = 0
    """Sequences beyond one per conversation: a template that is not prefix-stable renders a conversation once per
    trained turn."""


def process_records(records: Sequence[Record], spec: DatasetSpec, cfg: DataConfig,
                    renderer: ChatRenderer) -> EncodedChunk:
    """normalize -> encode -> fit_to_max_len for a chunk of records; problems keep their raw record."""
    convs: list[Conversation] = []
    raws: list[object] = []
    problems: list[Problem] = []
    unknown: dict[str, int] = {}
    pairs: dict[str, int] = {}
    formats: dict[str, int] = {}
    for rec in records:
        res = normalize(rec, spec, cfg.vars)
        if isinstance(res, list):
            problems += res
            if res[0].kind == "unknown format":
                unknown[rec.file] = unknown.get(rec.file, 0) + 1
            elif res[0].kind == "preference pair":
                pairs[rec.file] = pairs.get(rec.file, 0) + 1
        else:
            convs.append(res)
            raws.append(rec.data)
            formats[res.meta["format"]] = formats.get(res.meta["format"], 0) + 1
    kept: list[Example] = []
    dropped: list[Problem] = []
    truncated = split = pieces = 0
    per_turn = 0
    for conv, raw, res in zip(convs, raws, renderer.encode_sequences(convs) if convs else []):
        if isinstance(res, Problem):
            res.raw = raw
            problems.append(res)
            continue
        per_turn += len(res) - 1  # a template that is not prefix-stable: one sequence per trained turn
        for ex in res:
            if ex.n_trained == 0:
                problems.append(Problem(conv.file, conv.line, "", "no trained tokens after rendering; check the roles "
                                        "of its turns and data.train_on", "template mismatch", raw))
                continue
            fitted = fit_to_max_len(ex, cfg.max_len, cfg.too_long)
            if fitted.kept:
                kept += fitted.kept
                truncated += fitted.truncated
                if fitted.pieces is not None:
                    split, pieces = split + 1, pieces + len(fitted.pieces)
            else:
                (dropped if cfg.too_long == "drop" else problems).append(
                    Problem(conv.file, conv.line, "", fitted.reason, "too long", raw))
    return EncodedChunk(ExampleTable.from_examples(kept), problems, dropped, truncated, unknown, formats,
                        split=split, pieces=pieces, pair_records=pairs, extra_turn_sequences=per_turn)


def examples_of(chunks: Sequence[EncodedChunk]) -> ExampleTable:
    return ExampleTable.concat([c.table for c in chunks])


# Worker processes get the renderer and settings once, at start; then only chunks of records.
_worker_state: tuple[ChatRenderer, DatasetSpec, DataConfig] | None = None


def _init_worker(renderer: ChatRenderer, spec: DatasetSpec, cfg: DataConfig) -> None:
    global _worker_state
    _worker_state = (renderer, spec, cfg)


def _process_in_worker(records: list[Record]) -> EncodedChunk:
    assert _worker_state is not None
    renderer, spec, cfg = _worker_state
    return process_records(records, spec, cfg, renderer)


def process_all(records: Sequence[Record], spec: DatasetSpec, cfg: DataConfig, renderer: ChatRenderer,
                progress: Progress = _no_progress) -> list[EncodedChunk]:
    """process_records over all records in chunks, in data.num_proc processes when there are enough."""
    chunks = [list(records[k:k + CHUNK]) for k in range(0, len(records), CHUNK)]
    out: list[EncodedChunk] = []
    done = 0
    progress("tokenizing", 0, len(records))
    workers = cfg.num_proc or min(os.cpu_count() or 1, 8)  # 0 = one per core
    if workers > 1 and len(records) >= PARALLEL_MIN:
        # Forked workers must not inherit a half-used Rust thread pool; the processes are the parallelism.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
        log.info("tokenizing %d records of %s in %d processes", len(records), spec.path, workers)
        with ctx.Pool(workers, initializer=_init_worker, initargs=(renderer, spec, cfg)) as pool:
            for chunk, part in zip(chunks, pool.imap(_process_in_worker, chunks)):
                out.append(part)
                done += len(chunk)
                progress("tokenizing", done, len(records))
        return out
    for chunk in chunks:
        out.append(process_records(chunk, spec, cfg, renderer))
        done += len(chunk)
        progress("tokenizing", done, len(records))
    return out


# ---------------------------------------------------------------------------------------------
# One dataset


def _check_table_columns(fr: FileRead, spec: DatasetSpec) -> None:
    """A CSV/Parquet file without a column the settings name: one error instead of one per row."""
    if fr.columns is None:
        return
    missing = [c for c in needed_columns(spec) if c not in fr.columns]
    if missing:
        raise DataError(
            f"{fr.path}: no column(s) {missing}; the file has {fr.columns}. Fix the dataset's columns "
            "or prompt_template (e.g. --columns user=ask,assistant=answer)"
        )


def _check_format_known(reads: Sequence[FileRead], unknown: dict[str, int]) -> None:
    """Every record of a file of unknown format: one error with the hint, instead of one per record."""
    for fr in reads:
        if fr.records and unknown.get(fr.path, 0) == len(fr.records):
            keys = fr.columns or sorted({str(k) for r in fr.records[:50] if isinstance(r.data, dict) for k in r.data})
            raise DataError(
                f"{fr.path}: cannot tell the format of its records (keys: {keys[:10]}); set the dataset's format "
                "(alpaca, messages, sharegpt, text, columns), or map columns to roles, "
                "e.g. --columns user=ask,assistant=answer"
            )


def _check_not_pairs(reads: Sequence[FileRead], pairs: dict[str, int]) -> None:
    """A file of preference pairs given to supervised fine-tuning: one error that says what it is and what to set."""
    for fr in reads:
        if fr.records and pairs.get(fr.path, 0) == len(fr.records):
            raise DataError(
                f"{fr.path}: holds preference pairs (chosen/rejected answers to a prompt), not conversations to "
                "fine-tune on; to train on them set train.objective: dpo (or orpo, simpo)"
            )


def iter_conversations(spec: DatasetSpec, variables: dict[str, str], encoding: str = "auto"):
    """(raw record, Conversation or its problems) for every record of a dataset, file by file."""
    check_columns_spec(spec)
    files, _ = resolve_files(spec.path)
    for f in files:
        fr = read_one(f, encoding)
        _check_table_columns(fr, spec)
        for p in fr.problems:
            yield p.raw, [p]
        for rec in fr.records:
            yield rec.data, normalize(rec, spec, variables)


def encode_dataset(
    spec: DatasetSpec,
    cfg: DataConfig,
    renderer: LazyRenderer,
    *,
    tok_identity: str | None = None,
    cache_dir: Path | None = None,
    progress: Progress = _no_progress,
) -> DatasetResult:
    """One dataset, from the cache when its key matches, else read, checked, tokenized and cached."""
    check_columns_spec(spec)
    files, ignored = resolve_files(spec.path)
    key = None
    if cfg.cache and cache_dir is not None and tok_identity is not None:
        progress(f"hashing {spec.path}", 0, 1)
        key = cache.dataset_key(spec, cfg, files, tok_identity)
        hit = cache.load(cache_dir, key)
        if hit is not None:
            return DatasetResult(spec, hit.examples, hit.records, hit.problems, hit.dropped, hit.truncated,
                                 hit.encodings, hit.ignored, cache="hit", formats=hit.formats, split=hit.split,
                                 pieces=hit.pieces)
    reads: list[FileRead] = []
    for i, f in enumerate(files):
        progress(f"reading {f.name}", i, len(files))
        fr = read_one(f, cfg.encoding)
        _check_table_columns(fr, spec)
        reads.append(fr)
    records = [rec for fr in reads for rec in fr.records]
    chunks = process_all(records, spec, cfg, renderer.get(), progress) if records else []
    unknown: dict[str, int] = {}
    pairs: dict[str, int] = {}
    for c in chunks:
        for f, n in c.unknown_format.items():
            unknown[f] = unknown.get(f, 0) + n
        for f, n in c.pair_records.items():
            pairs[f] = pairs.get(f, 0) + n
    _check_not_pairs(reads, pairs)
    _check_format_known(reads, unknown)
    problems = [p for fr in reads for p in fr.problems] + [p for c in chunks for p in c.problems]
    file_order = {str(f): i for i, f in enumerate(files)}
    problems.sort(key=lambda p: (file_order.get(p.file, 0), p.line))
    unreadable = len({(p.file, p.line) for fr in reads for p in fr.problems})
    result = DatasetResult(
        spec, examples_of(chunks), len(records) + unreadable, problems, [p for c in chunks for p in c.dropped],
        sum(c.truncated for c in chunks), {fr.path: fr.encoding for fr in reads}, [str(p) for p in ignored],
        split=sum(c.split for c in chunks), pieces=sum(c.pieces for c in chunks),
    )
    for c in chunks:
        for fmt, n in c.formats.items():
            result.formats[fmt] = result.formats.get(fmt, 0) + n
    extra = sum(c.extra_turn_sequences for c in chunks)
    if extra:  # the token cost of a template that is not prefix-stable, said as information
        log.info("data: %s: the chat template renders earlier turns differently, so multi-turn conversations train "
                 "as one sequence per assistant turn: %s sequence(s) more than conversations", spec.path, f"{extra:,}")
    if key is not None:
        cache.save(cache_dir, key, cache.CachedDataset(  # type: ignore[arg-type]
            result.examples, result.records, result.problems, result.dropped, result.truncated,
            result.encodings, result.ignored, result.formats, result.split, result.pieces))
        result.cache = "written"
    return result


def encode_datasets(
    cfg: DataConfig,
    specs: Sequence[DatasetSpec],
    renderer: ChatRenderer | Callable[[], ChatRenderer],
    *,
    tok_identity: str | None = None,
    cache_dir: Path | None = None,
    progress: Progress = _no_progress,
) -> list[DatasetResult]:
    """encode_dataset for each spec. Without tok_identity, a live renderer's identity keys the cache."""
    lazy = LazyRenderer(renderer)
    if cfg.cache and tok_identity is None and isinstance(renderer, ChatRenderer):
        tok_identity = cache.renderer_identity(renderer)
    if cfg.cache and cache_dir is None:
        cache_dir = default_cache_dir()
    return [encode_dataset(s, cfg, lazy, tok_identity=tok_identity, cache_dir=cache_dir, progress=progress)
            for s in specs]


# ---------------------------------------------------------------------------------------------
# Across datasets: problems, eval split, weights


@dataclass
class Settled:
    """What data.on_error left out."""

    left_out: list[Problem]
    dropped: list[Problem]
    written_to: Path | None


def settle_problems(results: Sequence[DatasetResult], on_error: str, skipped_path: Path | None) -> Settled:
    """fail: raise one DataError listing the problems; skip: write them (and dropped records) to a JSONL."""
    problems = [p for r in results for p in r.problems]
    dropped = [p for r in results for p in r.dropped]
    if problems and on_error == "fail":
        raise problems_error(problems)
    written = None
    if (problems or dropped) and skipped_path is not None:
        write_problems_jsonl(problems + dropped, skipped_path)
        written = skipped_path
    return Settled(problems, dropped, written)


def _held_out_samples(r: DatasetResult, ratio: float, seed: str) -> tuple[set[int], int]:
    """(indices of r.examples held out for evaluation, how many records they are): held_out() over its samples,
    or — when some were split into pieces — over its records, so the pieces of one document are all trained or
    all held out."""
    if not r.split:
        held = held_out(len(r.examples), ratio, seed)
        return held, len(held)
    t = r.examples
    first = np.flatnonzero(np.r_[True, (t.file_of[1:] != t.file_of[:-1]) | (t.lines[1:] != t.lines[:-1])])
    ends = np.r_[first[1:], len(t)]
    groups = held_out(len(first), ratio, seed)
    return {k for g in groups for k in range(int(first[g]), int(ends[g]))}, len(groups)


def held_out(n: int, ratio: float, seed: str) -> set[int]:
    """Indices of the round(n * ratio) samples held out for evaluation; the same for the same seed."""
    return set(random.Random(seed).sample(range(n), round(n * ratio))) if ratio > 0 else set()


def _apply_weight(examples: list[Example], weight: float, seed: int) -> list[Example]:
    """weight 2 = every example twice per epoch; 0.5 = a fixed random half."""
    whole = math.floor(weight)
    out = examples * whole
    frac = weight - whole
    if frac > 0:
        rng = random.Random(seed)
        out += rng.sample(examples, round(frac * len(examples)))
    return out


def _default_skipped_path(results: Sequence[DatasetResult], split: str) -> Path:
    tag = hashlib.sha256(json.dumps([r.spec.path for r in results]).encode()).hexdigest()[:12]
    return qflash_home() / "skipped" / f"{split}-{tag}.jsonl"


def build_examples(
    cfg: DataConfig,
    renderer: ChatRenderer,
    *,
    split: str = "train",
    seed: int = 0,
    skipped_path: Path | None = None,
    cache_dir: Path | None = None,
    progress: Progress = _no_progress,
) -> tuple[list[Example], DataStats]:
    """The samples of a split: `train` (datasets, minus the eval_ratio share, weighted) or `eval`
    (eval_datasets plus that share). Use the same seed for both calls so the shares are complementary.

    skipped_path: where skip mode writes the records it leaves out (default under $QFLASH_HOME/skipped/).
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', not {split!r}")
    need_train = split == "train" or cfg.eval_ratio > 0
    train_results = encode_datasets(cfg, cfg.datasets if need_train else [], renderer, cache_dir=cache_dir,
                                    progress=progress)
    eval_results = encode_datasets(cfg, cfg.eval_datasets if split == "eval" else [], renderer,
                                   cache_dir=cache_dir, progress=progress)
    results = train_results + eval_results
    left_out = any(r.dropped or (r.problems and cfg.on_error == "skip") for r in results)
    if skipped_path is None and left_out:
        skipped_path = _default_skipped_path(results, split)
    settled = settle_problems(results, cfg.on_error, skipped_path)

    stats = DataStats(cache={r.spec.path: r.cache for r in results})
    examples: list[Example] = []
    for i, r in enumerate(train_results):
        held, records = _held_out_samples(r, cfg.eval_ratio, f"{seed}:{i}")
        stats.held_out += records
        if split == "train":
            kept = [ex for k, ex in enumerate(r.examples) if k not in held]
            part = _apply_weight(kept, r.spec.weight, seed + i)
        else:
            part = [r.examples[k] for k in sorted(held)]
        stats.per_file[r.spec.path] = stats.per_file.get(r.spec.path, 0) + len(part)
        examples += part
    for r in eval_results:
        stats.per_file[r.spec.path] = stats.per_file.get(r.spec.path, 0) + len(r.examples)
        examples += r.examples
    for r in results:
        stats.records += r.records
        stats.truncated += r.truncated
        stats.split += r.split
        stats.pieces += r.pieces
    for ex in examples:
        stats.add(ex)
    stats.problems = count_by_kind(settled.left_out)
    stats.skipped = len({(p.file, p.line) for p in settled.left_out})
    stats.dropped_too_long = len(settled.dropped)
    stats.skipped_path = str(settled.written_to) if settled.written_to else None
    for r in results:
        for line in encoding_lines(r.encodings):
            log_once(log, f"data: {line}", logging.INFO)
    _log_left_out(stats)
    if split == "train" and not examples:
        raise no_samples_error(results, stats, cfg.on_error)
    return examples, stats


def encoding_lines(encodings: dict[str, str], limit: int = 10) -> list[str]:
    """How each file was decoded, one line per file; for more than `limit` files, one line per encoding."""
    if len(encodings) <= limit:
        return [f"{f}: encoding {e}" for f, e in encodings.items()]
    by_encoding: dict[str, list[str]] = {}
    for f, e in encodings.items():
        by_encoding.setdefault(e, []).append(f)
    return [f"encoding {e}: {len(fs):,} files ({', '.join(fs[:3])}{', ...' if len(fs) > 3 else ''})"
            for e, fs in by_encoding.items()]


def no_samples_error(results: Sequence[DatasetResult], stats: DataStats, on_error: str) -> DataError:
    """No training sample is left: which files gave what, and why each record went (train raises it before it
    loads the model)."""
    files = [f for r in results for f in r.encodings] or [r.spec.path for r in results]
    shown = ", ".join(files[:5]) + (f" and {len(files) - 5} more" if len(files) > 5 else "")
    if stats.records == 0:
        why = "they hold no records (empty files?)"
    else:
        gone = []
        if stats.skipped:
            gone.append(f"{stats.skipped:,} skipped as bad under data.on_error={on_error} "
                        f"({format_counts(stats.problems)})")
        if stats.dropped_too_long:
            gone.append(f"{stats.dropped_too_long:,} dropped as longer than data.max_len (data.too_long=drop)")
        if stats.held_out:
            gone.append(f"{stats.held_out:,} held out for evaluation by data.eval_ratio")
        why = f"of their {stats.records:,} record(s), " + ("; ".join(gone) or "none gave a sample")
        if stats.skipped_path:
            why += f"; the left-out records are written to {stats.skipped_path}"
    return DataError(f"data.datasets: no training samples in {shown}: {why}. Nothing to train on; run "
                     "`qflash data check` on the config or the data to see every problem")


def _log_left_out(stats: DataStats) -> None:
    if stats.split:  # asked for, so said as information
        log.info("data: split %s sample(s) longer than data.max_len into %s pieces", f"{stats.split:,}",
                 f"{stats.pieces:,}")
    if not (stats.skipped or stats.dropped_too_long or stats.truncated):
        return
    parts = []
    if stats.skipped:
        parts.append(f"skipped {stats.skipped:,} bad record(s) ({format_counts(stats.problems)})")
    if stats.dropped_too_long:
        parts.append(f"dropped {stats.dropped_too_long:,} sample(s) longer than data.max_len")
    if stats.truncated:
        parts.append(f"truncated {stats.truncated:,} sample(s) to data.max_len")
    where = f"; written to {stats.skipped_path}" if stats.skipped_path else ""
    log.warning("data: %s%s", ", ".join(parts), where)


def load_conversations(spec: DatasetSpec, variables: dict[str, str], encoding: str = "auto") -> list[Conversation]:
    """Every record of a dataset as a Conversation; any problem raises one DataError listing them all."""
    convs: list[Conversation] = []
    problems: list[Problem] = []
    for _, res in iter_conversations(spec, variables, encoding):
        if isinstance(res, list):
            problems += res
        else:
            convs.append(res)
    if problems:
        raise problems_error(problems)
    return convs


# ---------------------------------------------------------------------------------------------
# Fingerprint (run metadata)


def _sha256_file(path: Path) -> str:
    return cache.sha256_file(path)


def tokenizer_fingerprint(tok) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(sorted(tok.get_vocab().items())).encode())
    h.update((tok.chat_template or "").encode() if isinstance(tok.chat_template, (str, type(None))) else
             json.dumps(tok.chat_template, sort_keys=True).encode())
    return h.hexdigest()[:16]


def _spec_settings(s: DatasetSpec) -> list:
    return [s.path, s.format, s.weight, s.columns, s.prompt_template]


def data_fingerprint(cfg: DataConfig, tok, replay_answers: str | None = None) -> dict:
    """What the tokenized data depends on: file contents, tokenizer, template and settings; with replay,
    its settings, its prompts file and the digest of the base model's answers (`replay_answers`)."""
    files: dict[str, str] = {}
    for spec in cfg.datasets + cfg.eval_datasets:
        p = Path(spec.path)
        if p.exists():
            for f in resolve_files(p)[0]:
                files[str(f)] = _sha256_file(f)
    if cfg.replay.prompts and Path(cfg.replay.prompts).is_file():
        files[str(Path(cfg.replay.prompts))] = _sha256_file(Path(cfg.replay.prompts))
    settings = {
        "datasets": [_spec_settings(s) for s in cfg.datasets],
        "eval_datasets": [_spec_settings(s) for s in cfg.eval_datasets],
        "vars": cfg.vars,
        "eval_ratio": cfg.eval_ratio,
        "max_len": cfg.max_len,
        "too_long": cfg.too_long,
        "on_error": cfg.on_error,
        "template": cfg.template,
        "train_on": cfg.train_on,
    }
    if cfg.encoding != "auto":  # only then, so runs that leave it alone keep the fingerprints they had
        settings["encoding"] = cfg.encoding
    if not cfg.train_reasoning:  # only then, so runs that leave it alone keep the fingerprints they had
        settings["train_reasoning"] = False
    if cfg.replay.prompts:  # only then, so runs without replay keep the fingerprints they had
        r = cfg.replay
        settings["replay"] = [r.prompts, r.ratio, r.max_new_tokens, r.system, r.unfinished, replay_answers]
    tok_fp = tokenizer_fingerprint(tok)
    digest = hashlib.sha256(json.dumps([files, settings, tok_fp], sort_keys=True).encode()).hexdigest()
    return {"fingerprint": digest[:16], "files": files, "tokenizer": tok_fp, "settings": settings}


