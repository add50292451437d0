"""Reading data files into records that remember their file and line.

Supported: JSON (an array of records, an object whose values are records, an object holding one
list of records such as {"data": [...]}, or a single record), JSONL, CSV/TSV (first row = header),
Parquet, and directories of them (recursively, in sorted order, hidden files left out). Every
record keeps its file and line: the line a JSON value or CSV row starts on, the JSONL line, or the
1-based row of a Parquet file.

Encoding, decided per file (Parquet is UTF-8 by definition):
  1. a byte-order mark decides (UTF-8, UTF-16);
  2. strict UTF-8;
  3. if that fails, GB18030 (a superset of GBK/GB2312; Chinese spreadsheet exports use it), but only
     when the whole file decodes strictly as GB18030, most non-ASCII bytes are *not* valid UTF-8,
     and the high bytes come in runs as Chinese characters do (Latin-1 accents stand alone);
  4. otherwise the file is UTF-8 with a few invalid bytes (a stray Latin-1 `é`, a cut character):
     each record holding one is an "invalid encoding" problem and the rest of the file is fine.
So one bad byte never flips a UTF-8 file to another encoding, and never aborts the file.

Nothing here raises for a bad record: lines that cannot be read come back as Problems, so one bad
line cannot abort a load of 100k.
"""

from __future__ import annotations

import bisect
import codecs
import csv
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

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
# Keys that mark a JSON object as one record rather than a container of records.
RECORD_KEYS = frozenset({"messages", "conversations", "instruction", "output", "text"})

_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")  # bytes that surrogateescape could not decode
_VALID_NON_ASCII = re.compile("[^\x00-\x7f\udc80-\udcff]")
_ISOLATED_HIGH_BYTE = re.compile(rb"(?<![\x80-\xff])[\x80-\xff](?![\x80-\xff])")
_HIGH_BYTE = re.compile(rb"[\x80-\xff]")
# A GB18030 file of Chinese text has almost no lone high bytes; a Latin-1 one has almost only those.
_MAX_ISOLATED_SHARE = 0.2


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


@dataclass
class DecodedText:
    text: str
    encoding: str
    bad_lines: dict[int, str]
    """line -> reason, for lines holding bytes that are not valid in `encoding`."""


# ---------------------------------------------------------------------------------------------
# Encoding


def decode_bytes(raw: bytes) -> DecodedText:
    """Decode a whole file following the rules in the module docstring."""
    if raw.startswith(codecs.BOM_UTF8):
        return _utf8_with_bad_lines(raw[len(codecs.BOM_UTF8):], "utf-8 (BOM)")
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return DecodedText(raw.decode("utf-16"), "utf-16", {})  # UnicodeDecodeError: the caller reports the file
    try:
        return DecodedText(raw.decode("utf-8"), "utf-8", {})
    except UnicodeDecodeError:
        pass
    if _looks_like_gb18030(raw):
        return DecodedText(raw.decode("gb18030"), "gb18030", {})
    return _utf8_with_bad_lines(raw, "utf-8")


def _looks_like_gb18030(raw: bytes) -> bool:
    as_utf8 = raw.decode("utf-8", "surrogateescape")
    invalid = len(_ESCAPED_BYTE.findall(as_utf8))
    if len(_VALID_NON_ASCII.findall(as_utf8)) >= invalid:
        return False  # mostly valid UTF-8: the invalid bytes are the exception, not the encoding
    try:
        raw.decode("gb18030")
    except UnicodeDecodeError:
        return False
    high = len(_HIGH_BYTE.findall(raw))
    return len(_ISOLATED_HIGH_BYTE.findall(raw)) <= _MAX_ISOLATED_SHARE * high


def _utf8_with_bad_lines(raw: bytes, name: str) -> DecodedText:
    try:
        return DecodedText(raw.decode("utf-8"), name, {})
    except UnicodeDecodeError:
        pass
    # surrogateescape keeps every undecodable byte as one lone surrogate, so positions stay exact.
    text = raw.decode("utf-8", "surrogateescape")
    bad: dict[int, str] = {}
    line, counted_to = 1, 0
    for m in _ESCAPED_BYTE.finditer(text):
        line += text.count("\n", counted_to, m.start())
        counted_to = m.start()
        if line not in bad:
            column = m.start() - text.rfind("\n", 0, m.start())
            byte = ord(m.group()) - 0xDC00
            bad[line] = f"byte {byte:#04x} is not valid UTF-8 (column {column}); re-save the file as UTF-8"
    return DecodedText(text, name, bad)


def printable(text: str) -> str:
    """Text that may hold undecodable bytes, with those bytes shown as \\xNN."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


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


def _object_members(text: str, start: int) -> dict[str, tuple[int, int]]:
    """key -> (start, end) positions of its value, for the valid JSON object at text[start] == '{'."""
    decoder = json.JSONDecoder()
    spans: dict[str, tuple[int, int]] = {}
    i = _skip_ws(text, start + 1)
    while i < len(text) and text[i] != "}":
        key, i = decoder.raw_decode(text, i)
        i = _skip_ws(text, _skip_ws(text, i) + 1)  # past ':'
        _, end = decoder.raw_decode(text, i)
        spans[key] = (i, end)
        i = _skip_ws(text, end)
        if text[i] == ",":
            i = _skip_ws(text, i + 1)
    return spans


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
    spans: list[tuple[Any, int, int]]  # (record, start, end)
    if not isinstance(obj, dict) or RECORD_KEYS & obj.keys():
        spans = [(obj, start, len(text))]
    else:
        lists = [k for k, v in obj.items() if isinstance(v, list) and v and all(isinstance(x, dict) for x in v)]
        if len(lists) == 1:  # {"data": [records]}
            _json_array(path, text, _object_members(text, start)[lists[0]][0], dec, lines, out)
            return
        if obj and all(isinstance(v, dict) for v in obj.values()):  # {"id1": record, "id2": record}
            spans = [(obj[k], a, b) for k, (a, b) in _object_members(text, start).items()]
        else:
            spans = [(obj, start, len(text))]
    for record, a, b in spans:
        bad = _first_bad_line(dec.bad_lines, lines.at(a), lines.at(max(a, b - 1)))
        if bad is not None:
            out.problems.append(Problem(path, bad, "", dec.bad_lines[bad], "invalid encoding", printable(text[a:b])))
        else:
            out.records.append(Record(record, path, lines.at(a)))


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


def read_one(path: Path) -> FileRead:
    """Records and problems of one data file (its type from the suffix)."""
    kind = KINDS_BY_SUFFIX[path.suffix.lower()]
    name = str(path)
    if kind == "parquet":
        out = FileRead(name, "parquet")
        _parquet(path, out)
        return out
    try:
        dec = decode_bytes(path.read_bytes())
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


def read_path(path: str | Path) -> list[FileRead]:
    """Every file of a dataset path (a file or a directory), read."""
    files, _ = resolve_files(path)
    return [read_one(f) for f in files]


def read_file(path: str | Path) -> Iterator[Record]:
    """Records of a data file or directory; any problem is raised (as a DataError listing them all)."""
    reads = read_path(path)
    problems = [p for r in reads for p in r.problems]
    if problems:
        raise problems_error(problems)
    for r in reads:
        yield from r.records
