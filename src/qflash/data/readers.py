"""Reading data files into records that remember their file and line.

JSON arrays are decoded element by element so that every record knows the line it starts on;
JSONL is read line by line. A malformed record is an error naming its file and line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from qflash.errors import DataError

SUFFIXES = (".json", ".jsonl")


@dataclass
class Record:
    """One raw record as read from disk."""

    data: Any
    file: str
    line: int

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: byte {raw[e.start]:#04x} is not valid UTF-8; re-save the file as UTF-8") from None


def _json_array(path: Path, text: str, start: int) -> Iterator[Record]:
    decoder = json.JSONDecoder()
    i, n = start + 1, len(text)
    line, counted_to = 1, 0

    def line_at(pos: int) -> int:
        nonlocal line, counted_to
        line += text.count("\n", counted_to, pos)
        counted_to = pos
        return line

    def skip_ws(pos: int) -> int:
        while pos < n and text[pos] in " \t\r\n":
            pos += 1
        return pos

    i = skip_ws(i)
    if i < n and text[i] == "]":
        return
    while True:
        i = skip_ws(i)
        try:
            obj, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{line_at(e.pos)}: malformed JSON: {e.msg}") from None
        yield Record(obj, str(path), line_at(i))
        i = skip_ws(end)
        if i < n and text[i] == ",":
            i += 1
            continue
        if i < n and text[i] == "]":
            return
        raise DataError(f"{path}:{line_at(min(i, n))}: malformed JSON: expected ',' or ']' after a record")


def read_file(path: str | Path) -> Iterator[Record]:
    """Records of a .json (array of records, or one object) or .jsonl file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    if path.suffix not in SUFFIXES:
        raise DataError(f"{path}: unsupported data file type '{path.suffix}'; use one of {', '.join(SUFFIXES)}")
    text = _read_text(path)
    if path.suffix == ".jsonl":
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON: {e.msg} (column {e.colno})") from None
            yield Record(obj, str(path), lineno)
        return
    stripped = text.lstrip()
    start = len(text) - len(stripped)
    if stripped.startswith("["):
        yield from _json_array(path, text, start)
        return
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON: {e.msg}") from None
    yield Record(obj, str(path), text.count("\n", 0, start) + 1)
