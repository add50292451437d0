"""`qflash generate`: answer a JSONL file of prompts into a JSONL file, in batches, resumably.

Input lines are `{"prompt": "..."}` or `{"messages": [...]}` with an optional `"id"` (a string or an
integer; without one, the line number is the id). Each output line repeats the id and the prompt or
messages and adds `response`, `finish_reason` (stop | length), `prompt_tokens` and `completion_tokens`.

Order: prompts are sorted by token length, longest first, and batched in that order, so a batch holds
prompts of similar length (little padding) and an out-of-memory shows up at the first batch rather
than the last. Results are written in that order, not the input's: match them by id.

Greedy batched replies equal one-by-one replies: the attention mask hides the padding and position ids
start at each prompt's first real token. (A repetition penalty other than 1 also sees the padding
tokens, so with it a reply can depend on its batch.)

Resuming: the output file is read first and ids already answered there are skipped. Every complete
line is checked before anything is changed; only then is a last line cut off by a killed run (no newline
at its end, not complete JSON) dropped from the file, said on the terminal. A file that is not a qflash
output is refused untouched. Lines end at '\n' only (a reply may hold U+2028 and the like). Each batch
is appended, flushed and fsync'd before the next one starts, so at most the batch in flight is lost to a
crash; a batch that cannot be written (disk full) is cut back off, so the file stays whole lines. One
run writes an output file at a time (a lock on the file; a second run is refused). The output file is
a log that grows batch by batch on purpose (that is what makes it resumable); --overwrite starts it over.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from qflash.errors import DataError, StorageError
from qflash.infer.options import MessageError, SamplingOptions, check_messages

log = logging.getLogger(__name__)


@dataclass
class Request:
    id: Any
    line: int
    messages: list[dict[str, str]]
    source: dict[str, Any]
    """{"prompt": ...} or {"messages": [...]}, as written in the input: copied into the output."""

    @property
    def key(self) -> str:
        return id_key(self.id)


def id_key(value: Any) -> str:
    """Ids compare as JSON: the string "1" and the integer 1 are different ids."""
    return json.dumps(value, ensure_ascii=False)


def _json_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of the non-blank lines of a UTF-8 file (a BOM is accepted). Lines end at '\n'
    only, as JSONL has it: U+2028, U+2029 and U+0085 may stand raw inside a JSON string."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text; save the file as UTF-8") from None
    return [(n, s) for n, s in enumerate(text.split("\n"), start=1) if s.strip()]


def _parse_line(path: Path, n: int, text: str) -> dict:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno}); each line must be one JSON object") from None
    if not isinstance(obj, dict):
        raise DataError(f'{path}:{n}: expected a JSON object such as {{"prompt": "..."}}, got {type(obj).__name__}')
    return obj


def read_requests(path: Path) -> list[Request]:
    """Every prompt of the input file, checked: any problem is a DataError naming file:line: field."""
    requests: list[Request] = []
    seen: dict[str, int] = {}
    for n, text in _json_lines(path):
        obj = _parse_line(path, n, text)
        has_prompt, has_messages = "prompt" in obj, "messages" in obj
        if has_prompt == has_messages:
            what = "both" if has_prompt else "neither"
            raise DataError(f'{path}:{n}: {what} "prompt" and "messages": give exactly one of them')
        if has_prompt:
            if not isinstance(obj["prompt"], str) or not obj["prompt"].strip():
                raise DataError(f"{path}:{n}: prompt: expected a non-empty string")
            messages, source = [{"role": "user", "content": obj["prompt"]}], {"prompt": obj["prompt"]}
        else:
            try:
                messages = check_messages(obj["messages"])
            except MessageError as e:
                raise DataError(f"{path}:{n}: {e}") from None
            source = {"messages": obj["messages"]}
        rid = obj.get("id", n)
        if isinstance(rid, bool) or not isinstance(rid, (str, int)):
            raise DataError(f"{path}:{n}: id: expected a string or an integer, got {json.dumps(rid)}")
        req = Request(rid, n, messages, source)
        if req.key in seen:
            raise DataError(f"{path}:{n}: id: {req.key} is already the id of line {seen[req.key]}; ids must be unique")
        seen[req.key] = n
        requests.append(req)
    if not requests:
        raise DataError(f'{path}: no prompts in the file (expected one JSON object per line, e.g. {{"prompt": "..."}})')
    return requests


@dataclass
class Answered:
    keys: set[str] = field(default_factory=set)
    dropped_partial: bool = False
    foreign: int = 0
    """Output lines whose id is not in the input (kept, not counted as done)."""


def read_answered(out: Path, requests: list[Request], input_path: Path) -> Answered:
    """Ids already answered in `out`; refuses answers to other prompts and files qflash did not write; then,
    and only then, drops a cut-off last line."""
    done = Answered()
    if not out.exists():
        return done
    data = out.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    tail = data[len(complete):]
    if tail.strip() and not _cut_off_answer(tail):
        n = complete.count(b"\n") + 1
        raise DataError(f"{out}:{n}: not a line written by qflash generate (the file does not end with a "
                        "newline and its last line is not an answer cut off by a stopped run); left as it is: "
                        "give another --output, or --overwrite to start it over")
    by_key = {r.key: r for r in requests}
    whole_lines = complete.count(b"\n")
    for n, text in _json_lines(out):
        if n > whole_lines:
            break
        _check_answer_line(out, n, text, by_key, input_path, done)
    if tail:
        _drop_tail(out, len(complete))
        done.dropped_partial = True
    return done


def _cut_off_answer(tail: bytes) -> bool:
    """The start of a line qflash generate writes (json.dumps of {"id": ...}), cut before its end."""
    try:
        json.loads(tail)
    except ValueError:
        return tail.startswith(b'{"id": ')
    return False  # complete JSON without its newline: someone else's file (a minified .json)


def _check_answer_line(out: Path, n: int, text: str, by_key: dict[str, Request], input_path: Path,
                       done: Answered) -> None:
    obj = _parse_line(out, n, text)
    if "id" not in obj or "response" not in obj:
        raise DataError(f"{out}:{n}: not a line written by qflash generate (no id/response); "
                        "give another --output, or --overwrite to start it over")
    key = id_key(obj["id"])
    req = by_key.get(key)
    if req is None:
        done.foreign += 1
        return
    stored = {k: obj[k] for k in ("prompt", "messages") if k in obj}
    if stored != req.source:
        raise DataError(f"{out}:{n}: id {key} was answered for another prompt than {input_path}:{req.line} "
                        "holds now; give another --output, or --overwrite to answer everything again")
    done.keys.add(key)


def _drop_tail(out: Path, keep: int) -> None:
    with open(out, "r+b") as f:
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
    log.warning("%s: the last line was cut off (a run was stopped while writing it); dropped it, "
                "that prompt will be answered again", out)


@contextlib.contextmanager
def output_lock(output: Path):
    """The output file, locked against a second `qflash generate` (which is refused: two runs would interleave
    their lines). A file this call created is removed again if nothing was written to it."""
    output.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, created = os.open(output, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666), True
    except FileExistsError:
        fd, created = os.open(output, os.O_RDWR), False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DataError(f"--output {output}: another qflash generate is writing it; wait for it to finish, "
                            "or give another --output") from None
        try:
            yield fd
        finally:
            if created and os.fstat(fd).st_size == 0:
                output.unlink(missing_ok=True)
    finally:
        os.close(fd)


class _Progress:
    """A live bar on a terminal, otherwise a line every 5% (logs, CI)."""

    def __init__(self, total: int):
        from qflash.ui import console

        self.total, self.done, self.console = total, 0, console
        self._every = max(1, total // 20)
        self._next = self._every
        self._bar = None
        if console.is_terminal:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self._bar = Progress(TextColumn("[bold]generate"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                                 TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TextColumn("ETA"),
                                 TimeRemainingColumn(), console=console)
            self._task = self._bar.add_task("generate", total=total, stats="")
            self._bar.start()

    def update(self, n: int, tok_s: float) -> None:
        self.done += n
        stats = f"{tok_s:,.1f} tok/s"
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, stats=stats)
        elif self.done >= self._next or self.done == self.total:
            self._next = self.done + self._every
            self.console.print(f"generate {self.done}/{self.total} prompts  {stats}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


def _output_record(req: Request, c) -> dict:
    return {"id": req.id, **req.source, "response": c.text, "finish_reason": c.finish_reason,
            "prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens}


@dataclass
class GenerateSummary:
    answered: int
    skipped: int
    tokens: int
    seconds: float
    finish: dict[str, int]


def run_generate(
    load_engine: Callable[[], Any], input_path: Path, output: Path, opts: SamplingOptions, *,
    batch_size: int = 8, overwrite: bool = False,
) -> GenerateSummary:
    """Answer every prompt of input_path not yet in output; the model is loaded only if there is work."""
    input_path, output = Path(input_path), Path(output)
    if batch_size < 1:
        raise DataError(f"--batch-size: must be >= 1, got {batch_size}")
    if output.exists() and output.resolve() == input_path.resolve():
        raise DataError(f"--output {output}: is the input file; give another path")
    requests = read_requests(input_path)
    with output_lock(output) as fd:
        if overwrite:
            os.ftruncate(fd, 0)  # under the lock, and the same file the lock is on
        done = read_answered(output, requests, input_path)
        return _answer_pending(load_engine, requests, done, input_path, output, opts, batch_size)


def _answer_pending(load_engine: Callable[[], Any], requests: list[Request], done: Answered, input_path: Path,
                    output: Path, opts: SamplingOptions, batch_size: int) -> GenerateSummary:
    from qflash.ui import console

    pending = [r for r in requests if r.key not in done.keys]
    skipped = len(requests) - len(pending)
    if done.foreign:
        console.print(f"{output}: {done.foreign} answers to ids not in {input_path} are left as they are")
    if not pending:
        console.print(f"nothing to do: all {len(requests)} prompts of {input_path} are answered in {output}")
        return GenerateSummary(0, skipped, 0, 0.0, {})
    if skipped:
        console.print(f"resuming: {skipped} of {len(requests)} prompts already answered in {output}")

    engine = load_engine()
    prompts = _tokenized(engine, pending, input_path)
    order = sorted(range(len(pending)), key=lambda i: -len(prompts[i]))
    if opts.seed is not None:  # one seed for the whole run, not the same random stream in every batch
        import torch

        torch.manual_seed(opts.seed)
        opts = replace(opts, seed=None)

    summary = GenerateSummary(0, skipped, 0, 0.0, {"stop": 0, "length": 0})
    progress = _Progress(len(pending))
    try:
        _write_batches(engine, pending, prompts, order, opts, batch_size, output, summary, progress)
    except KeyboardInterrupt:
        progress.close()
        console.print(f"stopped after {summary.answered} of {len(pending)} prompts (all written to {output}); "
                      "run the same command again to answer the rest")
        raise
    progress.close()
    console.print(
        f"answered {summary.answered} prompts ({skipped} skipped: already answered) in {summary.seconds:.1f}s: "
        f"{summary.tokens:,} tokens generated, {summary.tokens / max(summary.seconds, 1e-9):,.1f} tok/s; "
        f"finish: {summary.finish['stop']} stop, {summary.finish['length']} length -> {output}"
    )
    return summary


def _write_batches(engine, pending: list[Request], prompts: list[list[int]], order: list[int], opts: SamplingOptions,
                   batch_size: int, output: Path, summary: GenerateSummary, progress: _Progress) -> None:
    """Each batch's answers appended and fsync'd; a batch that cannot be written is cut back off the file."""
    t0 = time.perf_counter()
    with open(output, "ab", buffering=0) as f:  # unbuffered: a failed write leaves nothing behind to flush later
        for k in range(0, len(order), batch_size):
            batch = order[k : k + batch_size]
            results = engine.complete_batch([prompts[i] for i in batch], opts)
            lines = "".join(json.dumps(_output_record(pending[i], c), ensure_ascii=False) + "\n"
                            for i, c in zip(batch, results))
            _append_durably(f, output, lines.encode("utf-8"), summary.answered + summary.skipped)
            for c in results:
                summary.finish[c.finish_reason] += 1
                summary.tokens += c.completion_tokens
            summary.answered += len(batch)
            summary.seconds = time.perf_counter() - t0
            progress.update(len(batch), summary.tokens / max(summary.seconds, 1e-9))


def _append_durably(f, output: Path, data: bytes, answered_before: int) -> None:
    """One batch's lines on the disk, or none of them (disk full: the file is cut back to where it was)."""
    size = os.fstat(f.fileno()).st_size
    try:
        view = memoryview(data)
        while view:
            view = view[f.write(view):]
        os.fsync(f.fileno())
    except OSError as e:
        os.ftruncate(f.fileno(), size)
        what = "disk full" if e.errno == errno.ENOSPC else e.strerror or str(e)
        raise StorageError(f"--output {output}: could not append a batch ({what}); the {answered_before} answers "
                           "written before it are intact. Free space, then run the same command again to resume") \
            from None


def _tokenized(engine, pending: list[Request], input_path: Path) -> list[list[int]]:
    """Prompt ids of each request; a prompt that leaves no room for a reply is an error at its line."""
    out = []
    for r in pending:
        try:
            ids = engine.prompt_ids(r.messages)
        except MessageError as e:
            raise DataError(f"{input_path}:{r.line}: {e}") from None
        if len(ids) >= engine.context_window:
            raise DataError(f"{input_path}:{r.line}: the prompt is {len(ids)} tokens, the model's context window "
                            f"is {engine.context_window}: no room for a reply; shorten it")
        out.append(ids)
    return out
