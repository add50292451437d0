"""Reading data files into records that remember their file and line.

Supported: JSON (an array of records, an object whose values are records, an object holding one
list of records such as {"data": [...]}, or a single record), JSONL, CSV/TSV (first row = header),
Parquet, and directories of them (recursively, in sorted order, hidden files left out). Every
record keeps its file and line: the line a JSON value or CSV row starts on, the JSONL line, or the
1-based row of a Parquet file.

Encodings are decided per file by qflash.data.encodings (Parquet is UTF-8 by definition); a file whose
encoding cannot be told is refused whole (DataError), never read as mojibake.

Nothing here raises for a bad record: lines that cannot be read come back as Problems, so one bad
line cannot abort a load of 100k.
"""

from __future__ import annotations

import bisect
import csv
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from qflash.data.encodings import AUTO, DecodedText, decode_bytes, printable
from qflash.data.problems import Problem, problems_error
from qflash.errors import DataError

KINDS_BY_SUFFIX = {
    ".json": "json",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
}
SUFFIXES = tuple(KINDS_BY_SUFFIX)
# Keys that mark a JSON object as one record rather than a container of records (chosen/rejected: a preference
# pair, whose TRL prompt may be the one list of objects in it).
RECORD_KEYS = frozenset({"messages", "conversations", "instruction", "output", "text", "chosen", "rejected"})



@dataclass
class Record:
    """One raw record as read from disk."""

    data: Any
    file: str
    line: int

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass
class FileRead:
    """What one file gave: its records, the problems of what could not be read, how it was decoded."""

    path: str
    encoding: str
    records: list[Record] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    columns: list[str] | None = None
    """Header of a CSV/TSV file or schema of a Parquet file; None for JSON."""


class _Lines:
    """Line number (1-based) of a character position."""

    def __init__(self, text: str):
        self.newlines = [m.start() for m in re.finditer("\n", text)]

    def at(self, pos: int) -> int:
        return bisect.bisect_left(self.newlines, pos) + 1


def _first_bad_line(bad_lines: dict[int, str], first: int, last: int) -> int | None:
    if not bad_lines:
        return None
    return next((n for n in range(first, last + 1) if n in bad_lines), None)


# ---------------------------------------------------------------------------------------------
# JSON and JSONL


def _jsonl(path: str, dec: DecodedText, out: FileRead) -> None:
    # split("\n"), not splitlines(): U+2028 inside a JSON string is not a line break.
    for lineno, line in enumerate(dec.text.split("\n"), start=1):
        if not line.strip():
            continue
        if lineno in dec.bad_lines:
            out.problems.append(Problem(path, lineno, "", dec.bad_lines[lineno], "invalid encoding", printable(line)))
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            out.problems.append(
                Problem(path, lineno, "", f"malformed JSON: {e.msg} (column {e.colno})", "malformed JSON", line)
            )
            continue
        out.records.append(Record(obj, path, lineno))


def _skip_ws(text: str, pos: int) -> int:
    n = len(text)
    while pos < n and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _json_array(path: str, text: str, start: int, dec: DecodedText, lines: _Lines, out: FileRead) -> None:
    """Records of the JSON array starting at text[start] == '['; after a malformed record, reading
    resumes at the next line that opens a record at the indentation of the first one."""
    decoder = json.JSONDecoder()
    n = len(text)
    i = _skip_ws(text, start + 1)
    if i < n and text[i] == "]":
        return
    line_start = text.rfind("\n", 0, i) + 1
    indent = text[line_start:i] if not text[line_start:i].strip() else ""
    resync = re.compile("\n" + re.escape(indent) + r"\{")

    def resume_after(pos: int, what: str) -> int | None:
        m = resync.search(text, pos)
        if m is None:
            out.problems.append(Problem(path, lines.at(pos), "", f"{what}; the rest of the file could not be read",
                                        "malformed JSON", printable(text[pos:pos + 200])))
            return None
        out.problems.append(Problem(path, lines.at(pos), "", what, "malformed JSON",
                                    printable(text[pos:m.start()][:2000])))
        return m.start() + 1 + len(indent)

    while True:
        i = _skip_ws(text, i)
        try:
            obj, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            nxt = resume_after(e.pos, f"malformed JSON: {e.msg}")
            if nxt is None:
                return
            i = nxt
            continue
        first, last = lines.at(i), lines.at(end - 1)
        bad = _first_bad_line(dec.bad_lines, first, last)
        if bad is not None:
            out.problems.append(Problem(path, bad, "", dec.bad_lines[bad], "invalid encoding", printable(text[i:end])))
        else:
            out.records.append(Record(obj, path, first))
        i = _skip_ws(text, end)
        if i < n and text[i] == ",":
            i += 1
            continue
        if i < n and text[i] == "]":
            return
        nxt = resume_after(min(i, n), "malformed JSON: expected ',' or ']' after a record")
        if nxt is None:
            return
        i = nxt


def _object_members(text: str, start: int) -> list[tuple[str, int, int]]:
    """(key, start, end) of each member's value, in file order, for the valid JSON object at text[start] == '{'.
    A key given twice is listed twice (json.loads would keep only the last)."""
    decoder = json.JSONDecoder()
    members: list[tuple[str, int, int]] = []
    i = _skip_ws(text, start + 1)
    while i < len(text) and text[i] != "}":
        key, i = decoder.raw_decode(text, i)
        i = _skip_ws(text, _skip_ws(text, i) + 1)  # past ':'
        _, end = decoder.raw_decode(text, i)
        members.append((key, i, end))
        i = _skip_ws(text, end)
        if text[i] == ",":
            i = _skip_ws(text, i + 1)
    return members


def _keyed_records(path: str, text: str, members: list[tuple[str, int, int]], dec: DecodedText, lines: _Lines,
                   out: FileRead) -> None:
    """{"id1": record, "id2": record}: one record per id; an id given twice is a problem of its second record."""
    first_line: dict[str, int] = {}
    for key, a, b in members:
        line = lines.at(a)
        if key in first_line:
            out.problems.append(Problem(
                path, line, "", f"duplicate id {key!r}: the record at line {first_line[key]} has the same id; "
                "give every record its own id", "duplicate id", printable(text[a:b])))
            continue
        first_line[key] = line
        _add_span(path, json.loads(text[a:b]), text, a, b, dec, lines, out)


def _add_span(path: str, record: Any, text: str, a: int, b: int, dec: DecodedText, lines: _Lines,
              out: FileRead) -> None:
    bad = _first_bad_line(dec.bad_lines, lines.at(a), lines.at(max(a, b - 1)))
    if bad is not None:
        out.problems.append(Problem(path, bad, "", dec.bad_lines[bad], "invalid encoding", printable(text[a:b])))
    else:
        out.records.append(Record(record, path, lines.at(a)))


def _json_object(path: str, text: str, start: int, dec: DecodedText, lines: _Lines, out: FileRead) -> None:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # one object per line in a .json file: it is JSON Lines
            _jsonl(path, dec, out)
            return
        out.problems.append(Problem(path, e.lineno, "", f"malformed JSON: {e.msg}; the file could not be read",
                                    "malformed JSON", printable(text[:200])))
        return
    if not isinstance(obj, dict) or RECORD_KEYS & obj.keys():
        _add_span(path, obj, text, start, len(text), dec, lines, out)
        return
    members = _object_members(text, start)
    lists = [k for k, v in obj.items() if isinstance(v, list) and v and all(isinstance(x, dict) for x in v)]
    if len(lists) == 1:  # {"data": [records]}
        spans = [(a, b) for key, a, b in members if key == lists[0]]
        if len(spans) > 1:
            lines_of = " and ".join(str(lines.at(a)) for a, _ in spans)
            out.problems.append(Problem(path, lines.at(spans[1][0]), "", f"the key {lists[0]!r} holding the records "
                                        f"is given {len(spans)} times (lines {lines_of}); keep one list of records; "
                                        "the file could not be read", "duplicate id", None))
            return
        _json_array(path, text, spans[0][0], dec, lines, out)
    elif obj and all(isinstance(v, dict) for v in obj.values()):  # {"id1": record, "id2": record}
        _keyed_records(path, text, members, dec, lines, out)
    else:
        _add_span(path, obj, text, start, len(text), dec, lines, out)


def _json(path: str, dec: DecodedText, out: FileRead) -> None:
    text = dec.text
    start = _skip_ws(text, 0)
    if start == len(text):
        return
    lines = _Lines(text)
    if text[start] == "[":
        _json_array(path, text, start, dec, lines, out)
    else:
        _json_object(path, text, start, dec, lines, out)


# ---------------------------------------------------------------------------------------------
# CSV / TSV and Parquet


def _csv(path: str, dec: DecodedText, delimiter: str, out: FileRead) -> None:
    csv.field_size_limit(2**31 - 1)  # long answers are normal in fine-tuning data
    reader = csv.reader(io.StringIO(dec.text, newline=""), delimiter=delimiter)
    header: list[str] | None = None
    prev_end = 0
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            out.problems.append(Problem(path, prev_end + 1, "", f"malformed CSV: {e}", "malformed CSV", None))
            prev_end = reader.line_num
            continue
        first, last = prev_end + 1, reader.line_num
        prev_end = last
        if not row:
            continue  # blank line
        if header is None:
            header = [h.strip() for h in row]
            dupes = sorted({h for h in header if header.count(h) > 1})
            if dupes or not all(header):
                what = f"duplicate column(s) {dupes}" if dupes else "an empty column name"
                out.problems.append(Problem(path, first, "header", f"{what}; name every column once; "
                                            "the file could not be read", "malformed CSV", row))
                return
            out.columns = header
            continue
        bad = _first_bad_line(dec.bad_lines, first, last)
        if bad is not None:
            out.problems.append(Problem(path, bad, "", dec.bad_lines[bad], "invalid encoding",
                                        [printable(c) for c in row]))
            continue
        if len(row) != len(header):
            out.problems.append(Problem(
                path, first, "", f"malformed CSV: the row has {len(row)} fields, the header {len(header)} "
                "(an unquoted delimiter or line break inside a field?)", "malformed CSV", row,
            ))
            continue
        out.records.append(Record(dict(zip(header, row)), path, first))


def _parquet(path: Path, out: FileRead) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        out.columns = list(pf.schema_arrow.names)
        row = 0
        for batch in pf.iter_batches(batch_size=8192):
            for d in batch.to_pylist():
                row += 1
                out.records.append(Record(d, str(path), row))
    except (pa.ArrowException, OSError) as e:
        out.problems.append(Problem(str(path), 0, "", f"not a readable Parquet file: {e}", "unreadable file", None))


# ---------------------------------------------------------------------------------------------
# Files and directories


def read_one(path: Path, encoding: str = AUTO) -> FileRead:
    """Records and problems of one data file (its type from the suffix); `encoding` = data.encoding."""
    kind = KINDS_BY_SUFFIX[path.suffix.lower()]
    name = str(path)
    if kind == "parquet":
        out = FileRead(name, "parquet")
        _parquet(path, out)
        return out
    try:
        dec = decode_bytes(path.read_bytes(), name, encoding)
    except UnicodeDecodeError as e:
        out = FileRead(name, "unknown")
        out.problems.append(Problem(name, 0, "", f"cannot decode the file ({e.reason}); re-save it as UTF-8",
                                    "invalid encoding", None))
        return out
    out = FileRead(name, dec.encoding)
    if kind == "jsonl":
        _jsonl(name, dec, out)
    elif kind == "json":
        _json(name, dec, out)
    else:
        _csv(name, dec, "\t" if kind == "tsv" else ",", out)
    return out


def data_files(path: Path) -> tuple[list[Path], list[Path]]:
    """(data files, other files) under a directory, sorted, hidden files and folders left out."""
    found, ignored = [], []
    for p in sorted(path.rglob("*")):
        if not p.is_file() or any(part.startswith(".") for part in p.relative_to(path).parts):
            continue
        (found if p.suffix.lower() in KINDS_BY_SUFFIX else ignored).append(p)
    return found, ignored


def resolve_files(path: str | Path) -> tuple[list[Path], list[Path]]:
    """The data files a dataset path stands for, plus files of a directory that were left out."""
    p = Path(path)
    if p.is_dir():
        found, ignored = data_files(p)
        if not found:
            raise DataError(f"{p}: no data files in this directory (looked for {', '.join(SUFFIXES)})")
        return found, ignored
    if not p.is_file():
        raise DataError(f"{p}: data file not found")
    if p.suffix.lower() not in KINDS_BY_SUFFIX:
        raise DataError(f"{p}: unsupported data file type '{p.suffix}'; use one of {', '.join(SUFFIXES)}")
    return [p], []


def read_path(path: str | Path, encoding: str = AUTO) -> list[FileRead]:
    """Every file of a dataset path (a file or a directory), read."""
    files, _ = resolve_files(path)
    return [read_one(f, encoding) for f in files]


def read_file(path: str | Path, encoding: str = AUTO) -> Iterator[Record]:
    """Records of a data file or directory; any problem is raised (as a DataError listing them all)."""
    reads = read_path(path, encoding)
    problems = [p for r in reads for p in r.problems]
    if problems:
        raise problems_error(problems)
    for r in reads:
        yield from r.records
