"""Problems found in the data: one per bad record, collected instead of raised one by one.

A problem names where it is (file and line; for Parquet the 1-based row), the field, what is wrong,
and keeps the raw record so skip mode can write it out. `kind` is the short reason used to count
problems per reason ("malformed JSON", "no assistant turn", ...).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal

from qflash.errors import DataError

ProblemKind = Literal[
    "unreadable file",
    "invalid encoding",
    "malformed JSON",
    "malformed CSV",
    "duplicate id",
    "not an object",
    "unknown format",
    "unknown role",
    "missing content",
    "empty content",
    "wrong type",
    "wrong turn order",
    "no assistant turn",
    "missing placeholder value",
    "template mismatch",
    "too long",
    "preference pair",
    "identical answers",
    "prompt mismatch",
]

LISTED = 20  # problems spelled out in an error message; the rest are counted


@dataclass
class Problem:
    file: str
    line: int
    field: str
    reason: str
    kind: ProblemKind
    raw: Any = None

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"

    @property
    def message(self) -> str:
        """`file:line: field: reason` (no field part for problems of the whole record)."""
        return f"{self.where}: {self.field}: {self.reason}" if self.field else f"{self.where}: {self.reason}"

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "line": self.line, "field": self.field, "kind": self.kind,
                "reason": self.reason, "record": self.raw}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Problem":
        return cls(d["file"], d["line"], d["field"], d["reason"], d["kind"], d.get("record"))


def count_by_kind(problems: Iterable[Problem]) -> dict[str, int]:
    """Per-reason counts, most frequent first."""
    return dict(Counter(p.kind for p in problems).most_common())


def format_counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{kind}: {n:,}" for kind, n in counts.items())


def format_problems(problems: list[Problem], limit: int = LISTED) -> str:
    """Up to `limit` problems, one per line, then '... and N more'."""
    lines = [p.message for p in problems[:limit]]
    if len(problems) > limit:
        lines.append(f"... and {len(problems) - limit:,} more")
    return "\n".join(lines)


def problems_error(problems: list[Problem]) -> DataError:
    """The DataError of fail mode: a count per reason, then the problems themselves."""
    records = len({(p.file, p.line) for p in problems})
    head = (
        f"{len(problems):,} data problem(s) in {records:,} record(s) ({format_counts(count_by_kind(problems))}); "
        "fix them, or set data.on_error=skip to leave those records out:"
    )
    return DataError(head + "\n" + format_problems(problems))


def write_problems_jsonl(problems: Iterable[Problem], path: Path) -> int:
    """Write one JSON object per problem (file, line, field, kind, reason, record); returns how many."""
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    tmp = path.with_name(path.name + ".tmp")
    # backslashreplace: a raw record with undecodable bytes still gets written, visibly.
    with open(tmp, "w", encoding="utf-8", errors="backslashreplace") as f:
        for p in problems:
            f.write(json.dumps(p.to_json(), ensure_ascii=False, default=str) + "\n")
            n += 1
    tmp.replace(path)
    return n
