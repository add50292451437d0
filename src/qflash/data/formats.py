"""Record formats -> Conversation (system/user/assistant turns), with placeholders filled."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from qflash.data.readers import Record
from qflash.errors import DataError

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}

# {{name}} style, plus the <NAME>/<AUTHOR> style of public self-cognition files.
_CURLY = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
_ANGLE = re.compile(r"<(NAME|AUTHOR)>")


@dataclass
class Conversation:
    messages: list[dict[str, str]]
    file: str = ""
    line: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


def fill_placeholders(text: str, variables: dict[str, str], where: str, fieldname: str) -> str:
    def curly(m: re.Match) -> str:
        key = m.group(1)
        if key not in variables:
            raise DataError(
                f"{where}: {fieldname}: placeholder {{{{{key}}}}} has no value; set data.vars.{key}=..."
            )
        return variables[key]

    def angle(m: re.Match) -> str:
        key = m.group(1).lower()
        if key not in variables:
            raise DataError(f"{where}: {fieldname}: placeholder <{m.group(1)}> has no value; set data.vars.{key}=...")
        return variables[key]

    return _ANGLE.sub(angle, _CURLY.sub(curly, text))


def detect_format(data: Any) -> str | None:
    if not isinstance(data, dict):
        return None
    if "messages" in data:
        return "messages"
    if "conversations" in data:
        return "sharegpt"
    if "instruction" in data and "output" in data:
        return "alpaca"
    return None


def _need_str(obj: dict, key: str, where: str, fieldname: str, allow_empty: bool = False) -> str:
    if key not in obj:
        raise DataError(f"{where}: {fieldname}: missing")
    value = obj[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: {fieldname}: expected a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataError(f"{where}: {fieldname}: empty")
    return value


def _from_alpaca(d: dict, where: str) -> list[dict[str, str]]:
    instruction = _need_str(d, "instruction", where, "instruction")
    extra = d.get("input") or ""
    if not isinstance(extra, str):
        raise DataError(f"{where}: input: expected a string, got {type(extra).__name__}")
    output = _need_str(d, "output", where, "output")
    msgs: list[dict[str, str]] = []
    system = d.get("system")
    if system:
        msgs.append({"role": "system", "content": _need_str(d, "system", where, "system")})
    for i, pair in enumerate(d.get("history") or []):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise DataError(f"{where}: history.{i}: expected [question, answer]")
        msgs += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    return msgs


def _from_turns(turns: Any, where: str, key: str, role_key: str, content_key: str, role_map: dict[str, str]):
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: {key}: expected a non-empty list of turns")
    msgs = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict):
            raise DataError(f"{where}: {key}.{i}: expected an object with '{role_key}' and '{content_key}'")
        role = t.get(role_key)
        if role not in role_map:
            raise DataError(f"{where}: {key}.{i}.{role_key}: unknown role {role!r}; expected one of {sorted(role_map)}")
        content = _need_str(t, content_key, where, f"{key}.{i}.{content_key}")
        msgs.append({"role": role_map[role], "content": content})
    return msgs


def check_order(msgs: list[dict[str, str]], where: str) -> None:
    """system? then user/assistant alternating, starting with user, with at least one assistant turn."""
    body = msgs[1:] if msgs and msgs[0]["role"] == "system" else msgs
    for i, m in enumerate(body):
        if m["role"] == "system":
            raise DataError(f"{where}: turn {i}: a system message is only allowed first")
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise DataError(f"{where}: turn {i}: expected a {expected} turn, got {m['role']} (turns must alternate, user first)")
    if not any(m["role"] == "assistant" for m in body):
        raise DataError(f"{where}: no assistant turn, nothing to train on")


def to_conversation(record: Record, fmt: str, variables: dict[str, str]) -> Conversation:
    where = record.where
    d = record.data
    if not isinstance(d, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(d).__name__}")
    if fmt == "auto":
        fmt = detect_format(d) or ""
        if not fmt:
            raise DataError(
                f"{where}: cannot tell the format from keys {sorted(d)[:6]}; expected 'messages', "
                "'conversations', or 'instruction'+'output' (or set the dataset's format)"
            )
    if fmt == "alpaca":
        msgs = _from_alpaca(d, where)
    elif fmt == "messages":
        msgs = _from_turns(d.get("messages"), where, "messages", "role", "content", {r: r for r in ROLES})
    elif fmt == "sharegpt":
        msgs = _from_turns(d.get("conversations"), where, "conversations", "from", "value", SHAREGPT_ROLES)
    else:
        raise DataError(f"{where}: unknown format {fmt!r}")
    check_order(msgs, where)
    for i, m in enumerate(msgs):
        m["content"] = fill_placeholders(m["content"], variables, where, f"turn {i} ({m['role']})")
    return Conversation(msgs, record.file, record.line)
