"""`qflash data check` and `qflash data preview`: validate the data before the GPU spins, and look at it.

The source is a data file, a directory of them, or a YAML config (then its data section and model
are used). Progress goes to stderr (a live bar on a terminal, a line every few seconds otherwise);
results go to stdout.
"""

from __future__ import annotations

import copy
import json
import time
import typing
from collections import Counter
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.text import Text

from qflash.config import EMBEDDED_MODEL, Config, DatasetSpec, load_config
from qflash.data import cache
from qflash.data.lengths import fit_to_max_len
from qflash.data.pipeline import (
    DatasetResult,
    default_cache_dir,
    encode_datasets,
    encoding_lines,
    held_out,
    iter_conversations,
    qflash_home,
)
from qflash.data.problems import Problem, count_by_kind, format_counts, format_problems, write_problems_jsonl
from qflash.data.stats import estimate_packing, length_histogram
from qflash.data.table import ExampleTable
from qflash.data.template import IGNORE, ChatRenderer, Example
from qflash.errors import ConfigError, DataError

DEFAULT_SKIPPED = "qflash-skipped.jsonl"
CONFIG_SUFFIXES = (".yaml", ".yml")
FORMATS = typing.get_args(typing.get_type_hints(DatasetSpec)["format"])


# ---------------------------------------------------------------------------------------------
# Building the config a command works on


def parse_columns(text: str | None) -> dict[str, str]:
    """'user=ask,assistant=answer' -> {'user': 'ask', 'assistant': 'answer'}."""
    if not text:
        return {}
    mapping = {}
    for pair in text.split(","):
        role, sep, column = pair.partition("=")
        if not sep or not role.strip() or not column.strip():
            raise ConfigError(f"--columns: '{pair}' is not role=column; e.g. --columns user=ask,assistant=answer")
        mapping[role.strip()] = column.strip()
    return mapping


def command_config(source: str, overrides: list[str] | tuple[str, ...], *, fmt: str | None,
                   columns: str | None, prompt_template: str | None = None) -> Config:
    """The Config of a config file, or a default one whose only dataset is the data file/directory."""
    if fmt is not None and fmt not in FORMATS:
        raise ConfigError(f"--format: unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    mapping = parse_columns(columns)
    path = Path(source)
    if path.suffix.lower() in CONFIG_SUFFIXES and path.is_file():
        cfg = load_config(path, list(overrides))
        for spec in cfg.data.datasets + cfg.data.eval_datasets:
            spec.format = fmt or spec.format  # type: ignore[assignment]
            spec.columns = mapping or spec.columns
            spec.prompt_template = prompt_template or spec.prompt_template
        return cfg
    if not path.exists():
        raise DataError(f"{source}: no such data file, directory or config")
    dataset = {"path": str(path), "format": fmt or "auto", "columns": mapping, "prompt_template": prompt_template}
    # JSON is YAML: the dataset goes through the same validation as any override.
    return load_config(None, [f"data.datasets={json.dumps([dataset], ensure_ascii=False)}", *overrides])


def _model_dir(cfg: Config, model: str | None) -> Path:
    path = model or cfg.model.path
    ready = _existing_model_dir(path)
    if ready is not None:
        return ready
    from qflash.model.loading import resolve_model_dir

    return resolve_model_dir(path)


def _existing_model_dir(path: str) -> Path | None:
    """The HF directory of `path` when it exists already, found without importing torch (as
    qflash.model.loading does at import: ~2 s of a cached check). Anything else goes through
    resolve_model_dir (conversion of GGUF files, errors for missing paths)."""
    if path in (EMBEDDED_MODEL, ""):
        candidate: Path | None = qflash_home() / "models" / EMBEDDED_MODEL
    else:
        p = Path(path).expanduser()
        candidate = p if p.is_dir() else None
    return candidate if candidate is not None and (candidate / "config.json").is_file() else None


def _renderer_factory(cfg: Config, model_dir: Path):
    def build() -> ChatRenderer:
        from qflash.model.loading import add_tokens, load_tokenizer

        tok = load_tokenizer(model_dir, cfg.model.trust_remote_code)
        add_tokens(tok, cfg.model.add_tokens)  # the data is tokenized as training will tokenize it
        return ChatRenderer(tok, cfg.data.template, cfg.data.train_on, cfg.data.train_reasoning)

    return build


# ---------------------------------------------------------------------------------------------
# Progress: a live bar on a terminal, a line every few seconds otherwise


class ProgressReport:
    """The pipeline's progress(what, done, total) callback, drawn on stderr."""

    EVERY_S = 5.0

    def __init__(self, console: Console):
        self.console = console
        self.live = console.is_terminal
        self._bar = None
        self._tasks: dict[str, int] = {}
        self._last_line = 0.0

    def __enter__(self) -> "ProgressReport":
        if self.live:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=self.console, transient=True)
            self._bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()

    def __call__(self, what: str, done: int, total: int) -> None:
        if self._bar is not None:
            if what not in self._tasks:
                self._tasks[what] = self._bar.add_task(what, total=total)
            self._bar.update(self._tasks[what], completed=done, total=total)
            return
        now = time.monotonic()
        if what == "tokenizing" and 0 < done < total and now - self._last_line >= self.EVERY_S:
            self._last_line = now
            self.console.print(f"  tokenizing {done:,}/{total:,} ({done / total:.0%})")


# ---------------------------------------------------------------------------------------------
# check


def _print_datasets(out: Console, results: list[DatasetResult]) -> None:
    for r in results:
        per_file = len(r.encodings) > 1
        encodings = "per file below" if per_file else next(iter(r.encodings.values()), "-")
        detected = ", ".join(f"{fmt} {n:,}" if len(r.formats) > 1 else fmt for fmt, n in r.formats.items())
        fmt = f"{r.spec.format} ({detected})" if r.spec.format == "auto" and detected else r.spec.format
        out.print(
            f"  {escape(r.spec.path)}  [dim]format {fmt}, encoding {encodings}, cache {r.cache}[/]\n"
            f"    {r.records:,} records -> {len(r.examples):,} samples"
            + (f", {len(r.problems):,} problems" if r.problems else "")
            + (f", {len(r.dropped):,} dropped (too long)" if r.dropped else "")
            + (f", {r.truncated:,} truncated" if r.truncated else "")
            + (f", {r.split:,} split into {r.pieces:,} pieces" if r.split else ""),
            highlight=False,
        )
        if per_file:
            for line in encoding_lines(r.encodings):
                out.print(f"    {escape(line)}", highlight=False)
        if r.ignored:
            out.print(f"    [yellow]not data files, left out:[/] {', '.join(r.ignored[:5])}"
                      + (f" and {len(r.ignored) - 5} more" if len(r.ignored) > 5 else ""))


def _print_numbers(out: Console, tables: list[ExampleTable], max_len: int) -> None:
    lengths = np.concatenate([t.lengths for t in tables]) if tables else np.zeros(0, dtype=np.int64)
    if not len(lengths):
        out.print("  [yellow]no usable samples[/]")
        return
    tokens = int(lengths.sum())
    trained = int(sum(int(t.trained.sum()) for t in tables))
    out.print(f"  tokens   {tokens:,}, trained {trained:,} ({trained / max(tokens, 1):.1%})")
    out.print(f"  length   min {lengths.min()}, median {int(np.median(lengths))}, p95 "
              f"{int(np.percentile(lengths, 95))}, max {lengths.max()} (data.max_len {max_len})")
    hist = length_histogram(lengths, max_len)
    peak = max(c for _, _, c in hist) or 1
    for low, high, count in hist:
        bar = "█" * round(30 * count / peak)
        out.print(f"    {low:>6}-{high:<6} {bar:<30} {count:,}")
    est = estimate_packing(np.minimum(lengths, max_len).tolist(), max_len)
    out.print(f"  packing  {est.efficiency:.1%} of {est.bins:,} bins of {max_len} tokens filled "
              "(best-fit decreasing)")


def _print_problems(out: Console, problems: list[Problem], dropped: list[Problem]) -> None:
    if problems:
        out.print(f"  [red]problems[/] {len(problems):,} ({format_counts(count_by_kind(problems))})")
        out.print(Text(format_problems(problems), style="red"))
    if dropped:
        out.print(f"  [yellow]dropped[/] {len(dropped):,} samples longer than data.max_len (data.too_long=drop)")


def run_check(source: str, overrides, *, fmt: str | None = None, columns: str | None = None,
              prompt_template: str | None = None,
              on_error: str | None = None, model: str | None = None, skipped: str | None = None,
              console: Console | None = None) -> int:
    """Validate the data and print statistics. 0: usable (problems skipped under skip), 2: problems under fail."""
    t0 = time.perf_counter()
    out = console or Console(highlight=False, soft_wrap=True)
    err = Console(stderr=True) if console is None else console
    cfg = command_config(source, overrides or [], fmt=fmt, columns=columns, prompt_template=prompt_template)
    if on_error:
        cfg.data.on_error = on_error  # type: ignore[assignment]
    model_dir = _model_dir(cfg, model)
    identity = cache.tokenizer_identity_for_dir(model_dir, cfg.data.template)
    specs = cfg.data.datasets + cfg.data.eval_datasets
    if not specs:
        raise DataError(f"{source}: the config names no datasets (data.datasets)")
    if _preference_data(cfg):
        return _check_pairs(out, source, cfg, model_dir, skipped, t0)
    with ProgressReport(err) as progress:
        results = encode_datasets(cfg.data, specs, _renderer_factory(cfg, model_dir), tok_identity=identity,
                                  cache_dir=default_cache_dir() if cfg.data.cache else None, progress=progress)
    out.print(f"[bold]qflash data check[/] {source}  [dim](tokenizer {model_dir.name}, train_on "
              f"{cfg.data.train_on}, on_error {cfg.data.on_error}, too_long {cfg.data.too_long})[/]")
    _print_datasets(out, results)
    _print_numbers(out, [r.examples for r in results], cfg.data.max_len)
    if cfg.data.eval_ratio > 0:
        n_eval = sum(len(held_out(len(r.examples), cfg.data.eval_ratio, f"{cfg.train.seed}:{i}"))
                     for i, r in enumerate(results[: len(cfg.data.datasets)]))
        out.print(f"  eval     data.eval_ratio={cfg.data.eval_ratio} holds out {n_eval:,} samples")
    problems = [p for r in results for p in r.problems]
    dropped = [p for r in results for p in r.dropped]
    _print_problems(out, problems, dropped)
    return _verdict(out, cfg, problems, dropped, skipped, time.perf_counter() - t0, sum(len(r.examples) for r in results))


def _preference_data(cfg: Config) -> bool:
    """Preference pairs: the config's objective says so, or (a bare data file) its first record is a pair."""
    from qflash.data.preference import holds_pairs

    if cfg.train.objective != "sft":
        return True
    return holds_pairs([s.path for s in cfg.data.datasets + cfg.data.eval_datasets])


def _check_pairs(out: Console, source: str, cfg: Config, model_dir: Path, skipped: str | None, t0: float) -> int:
    """`qflash data check` of preference pairs (data/preference.py build_pairs): the train and held-out pairs."""
    from qflash.data.preference import build_pairs

    renderer = _renderer_factory(cfg, model_dir)()
    out.print(f"[bold]qflash data check[/] {source}  [dim](preference pairs; tokenizer {model_dir.name}, on_error "
              f"{cfg.data.on_error}, too_long {cfg.data.too_long}, max_len {cfg.data.max_len})[/]")
    total = 0
    for split in ("train", "eval") if cfg.data.eval_datasets or cfg.data.eval_ratio else ("train",):
        try:
            pairs, stats = build_pairs(cfg.data, renderer, split=split, seed=cfg.train.seed,
                                       skipped_path=Path(skipped) if skipped else None)
        except DataError as e:
            out.print(f"[bold red]not usable[/] ({split}): {escape(str(e))}")
            return 2
        out.print(f"  {split:5}  " + escape(stats.summary()))
        total += len(pairs)
    out.print(f"[bold green]ok[/]: {total:,} pairs ready ({time.perf_counter() - t0:.1f}s)")
    return 0


def _verdict(out: Console, cfg: Config, problems: list[Problem], dropped: list[Problem], skipped: str | None,
             seconds: float, samples: int) -> int:
    left_out = problems if cfg.data.on_error == "skip" else []
    written = None
    if left_out or dropped:
        written = Path(skipped or DEFAULT_SKIPPED)
        write_problems_jsonl(left_out + dropped, written)
    if problems and cfg.data.on_error == "fail":
        out.print(f"[bold red]not usable[/]: {len(problems):,} problems ({seconds:.1f}s). Fix them, or run with "
                  "--on-error skip (data.on_error=skip) to leave those records out"
                  + (f"; dropped samples written to {written}" if written else ""))
        return 2
    if not samples:
        out.print(f"[bold red]not usable[/]: no samples ({seconds:.1f}s): the files hold no records, or every record "
                  "was left out (see above)" + (f"; the left-out records are written to {written}" if written else ""))
        return 2
    summary = f"[bold green]ok[/]: {samples:,} samples ready ({seconds:.1f}s)"
    if left_out:
        records = len({(p.file, p.line) for p in left_out})
        summary += f"; skipped {records:,} records ({format_counts(count_by_kind(left_out))})"
    if dropped:
        summary += f"; dropped {len(dropped):,} too long"
    if written:
        summary += f"; written to {written}"
    out.print(summary)
    return 0


# ---------------------------------------------------------------------------------------------
# preview


def sample_text(tok, ex: Example) -> Text:
    """The sample's tokens decoded, trained runs highlighted and masked runs dimmed."""
    ids = np.asarray(ex.input_ids)
    trained = np.asarray(ex.labels) != IGNORE
    text = Text()
    start = 0
    for k in range(1, len(ids) + 1):
        if k == len(ids) or trained[k] != trained[start]:
            piece = tok.decode(ids[start:k].tolist(), skip_special_tokens=False, clean_up_tokenization_spaces=False)
            text.append(piece, style="bold green" if trained[start] else "dim")
            start = k
    return text


def run_preview(source: str, overrides, *, fmt: str | None = None, columns: str | None = None,
                prompt_template: str | None = None,
                model: str | None = None, n: int = 3, console: Console | None = None) -> int:
    """Show the first n samples as the model will see them. 0 when at least one could be shown."""
    out = console or Console(highlight=False, soft_wrap=True)
    cfg = command_config(source, overrides or [], fmt=fmt, columns=columns, prompt_template=prompt_template)
    model_dir = _model_dir(cfg, model)
    renderer = _renderer_factory(cfg, model_dir)()
    if _preference_data(cfg):
        return _preview_pairs(out, source, cfg, model_dir, renderer, n)
    out.print(f"[bold]qflash data preview[/] {source}  [dim](tokenizer {model_dir.name}, train_on "
              f"{cfg.data.train_on})[/]  legend: [bold green]trained[/] [dim]masked (no loss)[/]")
    shown, records = 0, 0
    problems: Counter[str] = Counter()
    for spec in cfg.data.datasets + cfg.data.eval_datasets:
        for _, result in iter_conversations(spec, cfg.data.vars, cfg.data.encoding):
            if shown >= n:
                break
            records += 1
            if isinstance(result, list):
                problems[result[0].kind] += 1
                continue
            (sequences,) = renderer.encode_sequences([result])
            if isinstance(sequences, Problem):
                problems[sequences.kind] += 1
                continue
            for k, encoded in enumerate(sequences):  # several: one per turn, for a template that is not prefix-stable
                fitted = fit_to_max_len(encoded, cfg.data.max_len, cfg.data.too_long)
                ex = fitted.example or encoded
                note = " [yellow]truncated[/]" if fitted.truncated else (
                    f" [yellow]split into {len(fitted.pieces)} pieces[/]" if fitted.pieces is not None else
                    f" [red]{fitted.reason}[/]" if fitted.example is None else "")
                turn = f" · turn {k + 1} of {len(sequences)}" if len(sequences) > 1 else ""
                shown += 1
                out.rule(f"sample {shown} · {escape(result.where)}{turn} · {len(ex.input_ids)} tokens, "
                         f"{ex.n_trained} trained{note}")
                out.print(sample_text(renderer.tok, ex))
    out.rule()
    summary = f"shown {shown} of the first {records:,} records"
    if problems:
        summary += f"; {sum(problems.values()):,} had problems ({format_counts(dict(problems))}); run qflash data check"
    out.print(summary)
    return 0 if shown else 2


def _preview_pairs(out: Console, source: str, cfg: Config, model_dir: Path, renderer: ChatRenderer, n: int) -> int:
    """The first n preference pairs as the model sees them: the shared prompt dimmed, each answer highlighted."""
    from qflash.data.preference import build_pairs

    data = copy.deepcopy(cfg.data)
    data.on_error = "skip"  # a preview shows what it can; `qflash data check` lists the problems
    pairs, stats = build_pairs(data, renderer, split="train", seed=cfg.train.seed)
    out.print(f"[bold]qflash data preview[/] {source}  [dim](preference pairs; tokenizer {model_dir.name})[/]  "
              "legend: [bold green]trained[/] [dim]masked (no loss)[/]")
    for k, pair in enumerate(pairs[:n], 1):
        for side, ex in (("chosen", pair.chosen), ("rejected", pair.rejected)):
            out.rule(f"pair {k} · {escape(f'{pair.file}:{pair.line}')} · {side}: {len(ex.input_ids)} tokens, "
                     f"{ex.n_trained} trained, the first {pair.prompt_tokens} the shared prompt")
            out.print(sample_text(renderer.tok, ex))
    out.rule()
    out.print(f"shown {min(n, len(pairs))} of {len(pairs):,} pairs; " + escape(stats.summary()))
    return 0 if pairs else 2
