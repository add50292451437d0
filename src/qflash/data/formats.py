"""Record formats -> Conversation (system/user/assistant turns), with placeholders filled.

Formats (DatasetSpec.format; `auto` decides per record from its keys, in this order):
  messages  {"messages": [{"role": system|user|assistant|tool, "content": ...}]}     (OpenAI)
            an assistant message may carry "reasoning_content" (or <think>...</think> inline in its content) and
            "tool_calls" ([{"type": "function", "function": {"name", "arguments": JSON text or object}}], its
            content may then be empty); the "tool" messages that follow it hold the results; the record's
            "tools" (definitions) go to the template as `tools`
  sharegpt  {"conversations": [{"from": human|user|gpt|assistant|system, "value": ...}], "system"?: ...}
            LLaMA-Factory's tool turns too: "function_call" (its value the JSON text of {"name", "arguments"}, or
            of a list of them: an assistant turn calling tools) and "observation" (a tool result); the record's
            "tools" (a list of definitions, or its JSON text) go to the template as `tools`
  alpaca    {"instruction", "output", "input"?, "system"?, "history"?: [[question, answer], ...]}
  columns   any record, when DatasetSpec.columns maps roles to columns ({user: ask, assistant: answer});
            DatasetSpec.prompt_template builds the user turn from several columns
            ("[{department}] {title}\\n{ask}"); it wins over a `user` column
  text      {"text": ...} (or the column mapped as `text`): every token trained, EOS appended

A preference pair (chosen/rejected answers, see data/preference.py) is not a conversation: a record that
detect_pair_format() recognizes and that SFT could not read anyway is one `preference pair` problem saying
so, and a file of nothing else is refused whole (pipeline.py). Records SFT can read (a `messages` list
beside chosen/rejected, a columns mapping onto them) are read as before.

normalize() never raises for a bad record: it returns all the problems of that record (a record
with three empty turns gives three problems), each as `file:line: field: reason`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from qflash.config import DatasetSpec
from qflash.data.problems import Problem, ProblemKind
from qflash.data.readers import Record
from qflash.errors import DataError

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
# SFT conversations also take LLaMA-Factory's tool turns (preference pairs do not)
SHAREGPT_TOOL_ROLES = {**SHAREGPT_ROLES, "function_call": "function_call", "observation": "tool"}
COLUMN_ROLES = ("system", "user", "assistant", "text")

# {{name}} style, plus the <NAME>/<AUTHOR> style of public self-cognition files.
_CURLY = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
_ANGLE = re.compile(r"<(NAME|AUTHOR)>")
# A prompt_template field: {column}, but not the {{name}} placeholders.
_TEMPLATE_FIELD = re.compile(r"(?<!\{)\{([^{}\n]+)\}(?!\})")


@dataclass
class Conversation:
    messages: list[dict[str, Any]]
    """role + content, and on OpenAI records: reasoning_content, tool_calls (assistant), tool_call_id, name (tool)."""
    file: str = ""
    line: int = 0
    meta: dict[str, Any] = field(default_factory=dict)
    text: str | None = None
    """Set for format=text: the whole sample, trained on every token (messages is then empty)."""
    tools: list[dict[str, Any]] | None = None
    """Tool definitions of an OpenAI record (its `tools` list), passed to the chat template as `tools`."""

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass
class _Turn:
    role: str
    content: str
    field: str
    """Where the turn came from in the record (`conversations.2.value`), for problems."""
    extra: dict[str, Any] = field(default_factory=dict)
    """OpenAI fields passed to the chat template as they are: reasoning_content, tool_calls, tool_call_id, name."""


class _Issues:
    """The problems of one record."""

    def __init__(self, record: Record):
        self.record = record
        self.items: list[Problem] = []

    def add(self, fieldname: str, reason: str, kind: ProblemKind) -> None:
        self.items.append(Problem(self.record.file, self.record.line, fieldname, reason, kind, self.record.data))


# ---------------------------------------------------------------------------------------------
# Placeholders


def _fill(text: str, variables: dict[str, str], missing: list[str]) -> str:
    def curly(m: re.Match) -> str:
        if m.group(1) not in variables:
            missing.append(f"{{{{{m.group(1)}}}}}|{m.group(1)}")
            return m.group(0)
        return variables[m.group(1)]

    def angle(m: re.Match) -> str:
        key = m.group(1).lower()
        if key not in variables:
            missing.append(f"<{m.group(1)}>|{key}")
            return m.group(0)
        return variables[key]

    return _ANGLE.sub(angle, _CURLY.sub(curly, text))


def fill_placeholders(text: str, variables: dict[str, str], where: str, fieldname: str) -> str:
    """{{name}} / <NAME> -> variables['name']; a placeholder without a value is a DataError."""
    missing: list[str] = []
    out = _fill(text, variables, missing)
    if missing:
        shown, key = missing[0].split("|")
        raise DataError(f"{where}: {fieldname}: placeholder {shown} has no value; set data.vars.{key}=...")
    return out


# ---------------------------------------------------------------------------------------------
# Field access


def _content(value: Any) -> str | None:
    """A turn's text: a string, or OpenAI content parts that are all text."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(p, dict) and p.get("type") == "text" for p in value):
        texts = [p.get("text") for p in value]
        if all(isinstance(t, str) for t in texts):
            return "".join(texts)
    return None


def _need_text(obj: dict, key: str, fieldname: str, issues: _Issues, *, scalars: bool = False) -> str | None:
    """The text under `key`, or None after recording why it is unusable."""
    if key not in obj or obj[key] is None:
        issues.add(fieldname, "missing", "missing content")
        return None
    value = obj[key]
    if scalars and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)  # a number in a CSV-like column is text
    text = _content(value)
    if text is None:
        issues.add(fieldname, f"expected a string, got {type(value).__name__}", "wrong type")
        return None
    if not text.strip():
        issues.add(fieldname, "empty", "empty content")
        return None
    return text


def detect_format(data: Any, spec: DatasetSpec | None = None) -> str | None:
    if not isinstance(data, dict):
        return None
    if "messages" in data:
        return "messages"
    if "conversations" in data:
        return "sharegpt"
    if "instruction" in data and "output" in data:
        return "alpaca"
    if spec is not None and spec.columns:
        return "text" if set(spec.columns) == {"text"} else "columns"
    if "text" in data:
        return "text"
    return None


PAIR_FORMATS = ("prompt", "sharegpt", "alpaca")
PAIR_KEYS = {"prompt": "'prompt'+'chosen'+'rejected' (TRL)", "sharegpt": "'conversations'+'chosen'+'rejected' (ShareGPT)",
             "alpaca": "'instruction'+'chosen'+'rejected' (Alpaca)"}
"""What a record of each preference-pair format holds, for messages."""


def detect_pair_format(data: Any) -> str | None:
    """The preference-pair format of a record, from its keys: prompt (TRL), sharegpt (LLaMA-Factory) or alpaca;
    None when it has neither chosen nor rejected, or no key that says where the prompt is. One of chosen and
    rejected is enough to tell: the other one missing is then a problem of the record, not an unknown format."""
    if not isinstance(data, dict) or not ("chosen" in data or "rejected" in data):
        return None
    if "prompt" in data:
        return "prompt"
    if "conversations" in data:
        return "sharegpt"
    if "instruction" in data:
        return "alpaca"
    return None


def _pair_not_conversation(d: dict, fmt: str | None, spec: DatasetSpec) -> bool:
    """A preference pair that SFT could not read as a conversation anyway: its answers are under chosen/rejected."""
    if detect_pair_format(d) is None:
        return False
    if fmt is None:
        return True
    if fmt == "alpaca":
        return "output" not in d
    if fmt == "sharegpt":  # LLaMA-Factory's pairs: the conversation ends with the question
        turns = d.get("conversations")
        last = turns[-1] if isinstance(turns, list) and turns else None
        return not (isinstance(last, dict) and SHAREGPT_ROLES.get(last.get("from")) == "assistant")
    if fmt == "messages":
        return "messages" not in d
    if fmt == "text":
        return spec.columns.get("text", "text") not in d
    return False  # columns: mapped onto the pair's keys on purpose (SFT on the chosen answers)


PAIR_REASON = ("a preference pair (chosen/rejected), not a conversation to fine-tune on; train on pairs with "
               "train.objective: dpo (or orpo, simpo)")


# ---------------------------------------------------------------------------------------------
# One builder per format: record -> turns (None where a problem was recorded)


def _turn_list(d: dict, key: str, role_key: str, content_key: str, role_map: dict[str, str],
               issues: _Issues) -> list[_Turn]:
    turns_data = d.get(key)
    if not isinstance(turns_data, list) or not turns_data:
        kind: ProblemKind = "missing content" if turns_data in (None, []) else "wrong type"
        issues.add(key, "expected a non-empty list of turns", kind)
        return []
    turns = []
    for i, t in enumerate(turns_data):
        where = f"{key}.{i}"
        if not isinstance(t, dict):
            issues.add(where, f"expected an object with '{role_key}' and '{content_key}'", "wrong type")
            continue
        role = t.get(role_key)
        if role not in role_map:
            issues.add(f"{where}.{role_key}", f"unknown role {role!r}; expected one of {', '.join(sorted(role_map))}",
                       "unknown role")
            continue
        if role_map[role] in ("system", "tool") and t.get(content_key) == "":
            text: str | None = ""  # an empty system prompt or tool result is data too
        else:
            text = _need_text(t, content_key, f"{where}.{content_key}", issues)
        if text is not None:
            turns.append(_Turn(role_map[role], text, where))
    return turns


MESSAGE_ROLES = ROLES + ("tool",)


def _messages(d: dict, spec: DatasetSpec, issues: _Issues) -> list[_Turn]:
    items = d.get("messages")
    if not isinstance(items, list) or not items:
        kind: ProblemKind = "missing content" if items in (None, []) else "wrong type"
        issues.add("messages", "expected a non-empty list of turns", kind)
        return []
    turns = []
    for i, m in enumerate(items):
        turn = _message(m, f"messages.{i}", issues)
        if turn is not None:
            turns.append(turn)
    return turns


def _message(m: Any, where: str, issues: _Issues) -> _Turn | None:
    """One OpenAI message as a turn (None after recording its problems)."""
    if not isinstance(m, dict):
        issues.add(where, "expected an object with 'role' and 'content'", "wrong type")
        return None
    role = m.get("role")
    if role not in MESSAGE_ROLES:
        issues.add(f"{where}.role", f"unknown role {role!r}; expected one of {', '.join(sorted(MESSAGE_ROLES))}",
                   "unknown role")
        return None
    before = len(issues.items)
    extra: dict[str, Any] = {}
    if role == "assistant":
        extra = _assistant_extras(m, where, issues)
    elif role == "tool":
        extra = {k: m[k] for k in ("tool_call_id", "name") if isinstance(m.get(k), str)}
    if (role == "system" and m.get("content") == "") or (role == "tool" and m.get("content") == ""):
        text: str | None = ""  # an empty system prompt or tool result is data too
    elif role == "assistant" and extra.get("tool_calls") and m.get("content") in (None, ""):
        text = ""  # a reply that only calls tools
    else:
        text = _need_text(m, "content", f"{where}.content", issues)
    if text is None or len(issues.items) > before:
        return None
    return _Turn(role, text, where, extra)


def _assistant_extras(m: dict, where: str, issues: _Issues) -> dict[str, Any]:
    """reasoning_content and tool_calls of an assistant message, checked (problems recorded)."""
    extra: dict[str, Any] = {}
    reasoning = m.get("reasoning_content")
    if reasoning is not None and not isinstance(reasoning, str):
        issues.add(f"{where}.reasoning_content", f"expected a string, got {type(reasoning).__name__}", "wrong type")
    elif reasoning:
        extra["reasoning_content"] = reasoning
    calls = m.get("tool_calls")
    if calls is None or calls == []:
        return extra
    if not isinstance(calls, list):
        issues.add(f"{where}.tool_calls", f"expected a list of tool calls, got {type(calls).__name__}", "wrong type")
        return extra
    checked = [_tool_call(c, f"{where}.tool_calls.{j}", issues) for j, c in enumerate(calls)]
    if all(c is not None for c in checked):
        extra["tool_calls"] = checked
    return extra


def _tool_call(call: Any, where: str, issues: _Issues) -> dict | None:
    """One OpenAI tool call {"type": "function", "function": {"name", "arguments"}} (None after a problem)."""
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict):
        issues.add(where, 'expected {"type": "function", "function": {"name": ..., "arguments": ...}}', "wrong type")
        return None
    if call.get("type", "function") != "function":
        issues.add(f"{where}.type", f"expected 'function', got {call.get('type')!r}", "wrong type")
        return None
    name, args = fn.get("name"), fn.get("arguments", {})
    if not isinstance(name, str) or not name.strip():
        issues.add(f"{where}.function.name", "expected the tool's name (a non-empty string)", "missing content")
        return None
    if isinstance(args, str):
        try:
            json.loads(args)
        except ValueError as e:
            issues.add(f"{where}.function.arguments", f"not valid JSON ({e}); write the arguments as a JSON object "
                       "or as its JSON text", "wrong type")
            return None
    elif not isinstance(args, dict):
        issues.add(f"{where}.function.arguments", f"expected a JSON object or its text, got {type(args).__name__}",
                   "wrong type")
        return None
    out = {"type": "function", "function": {"name": name, "arguments": args}}
    if isinstance(call.get("id"), str):
        out["id"] = call["id"]
    return out


def _sharegpt(d: dict, spec: DatasetSpec, issues: _Issues) -> list[_Turn]:
    turns = [_sharegpt_call(t, issues) if t.role == "function_call" else t
             for t in _turn_list(d, "conversations", "from", "value", SHAREGPT_TOOL_ROLES, issues)]
    turns = [t for t in turns if t is not None]
    system = d.get("system")
    if system and not (turns and turns[0].role == "system"):
        if isinstance(system, str):
            turns.insert(0, _Turn("system", system, "system"))
        else:
            issues.add("system", f"expected a string, got {type(system).__name__}", "wrong type")
    return turns


def _history(d: dict, issues: _Issues) -> list[tuple[str, str, str]]:
    """An Alpaca record's `history` ([question, answer] pairs) as (role, text, field) turns; problems recorded."""
    history = d.get("history") or []
    if not isinstance(history, list):
        issues.add("history", "expected a list of [question, answer] pairs", "wrong type")
        return []
    turns = []
    for i, pair in enumerate(history):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            issues.add(f"history.{i}", "expected [question, answer]", "wrong type")
            continue
        for j, (role, text) in enumerate(zip(("user", "assistant"), pair)):
            if not text.strip():
                issues.add(f"history.{i}.{j}", "empty", "empty content")
            turns.append((role, text, f"history.{i}.{j}"))
    return turns


def _alpaca(d: dict, spec: DatasetSpec, issues: _Issues) -> list[_Turn]:
    instruction = _need_text(d, "instruction", "instruction", issues)
    extra = d.get("input") or ""
    if not isinstance(extra, str):
        issues.add("input", f"expected a string, got {type(extra).__name__}", "wrong type")
        extra = ""
    output = _need_text(d, "output", "output", issues)
    turns: list[_Turn] = []
    if d.get("system"):
        system = _need_text(d, "system", "system", issues)
        if system is not None:
            turns.append(_Turn("system", system, "system"))
    turns += [_Turn(role, text, where) for role, text, where in _history(d, issues)]
    if instruction is not None:
        turns.append(_Turn("user", f"{instruction}\n\n{extra}" if extra.strip() else instruction, "instruction"))
    if output is not None:
        turns.append(_Turn("assistant", output, "output"))
    return turns


def template_columns(prompt_template: str) -> list[str]:
    """Columns a prompt_template reads: '[{department}] {title}' -> ['department', 'title']."""
    return [m.group(1).strip() for m in _TEMPLATE_FIELD.finditer(prompt_template)]


def _from_template(d: dict, template: str, issues: _Issues) -> str | None:
    ok = True
    values: dict[str, str] = {}
    for col in template_columns(template):
        text = _need_text(d, col, col, issues, scalars=True) if d.get(col) != "" else ""
        ok &= text is not None
        values[col] = text or ""
    if not ok:
        return None
    filled = _TEMPLATE_FIELD.sub(lambda m: values[m.group(1).strip()], template)
    if not filled.strip():
        issues.add("prompt_template", "empty after filling in the columns", "empty content")
        return None
    return filled


def _columns(d: dict, spec: DatasetSpec, issues: _Issues) -> list[_Turn]:
    cols = spec.columns
    turns: list[_Turn] = []
    system_col = cols.get("system")
    if system_col and d.get(system_col) not in (None, ""):  # an empty system cell: no system prompt
        system = _need_text(d, system_col, system_col, issues, scalars=True)
        if system is not None:
            turns.append(_Turn("system", system, system_col))
    if spec.prompt_template:
        user = _from_template(d, spec.prompt_template, issues)
        user_field = "prompt_template"
    else:
        user_field = cols["user"]
        user = _need_text(d, user_field, user_field, issues, scalars=True)
    if user is not None:
        turns.append(_Turn("user", user, user_field))
    answer = _need_text(d, cols["assistant"], cols["assistant"], issues, scalars=True)
    if answer is not None:
        turns.append(_Turn("assistant", answer, cols["assistant"]))
    return turns


_BUILDERS = {"messages": _messages, "sharegpt": _sharegpt, "alpaca": _alpaca, "columns": _columns}


def check_columns_spec(spec: DatasetSpec) -> None:
    """Mistakes in a dataset's `columns`/`prompt_template` settings: one error, before any record is read."""
    unknown = sorted(set(spec.columns) - set(COLUMN_ROLES))
    if unknown:
        raise DataError(f"{spec.path}: columns: unknown role(s) {unknown}; map system, user, assistant "
                        "(or text) to columns, e.g. --columns user=ask,assistant=answer")
    if spec.format == "columns" or (spec.format == "auto" and spec.columns and set(spec.columns) != {"text"}):
        if "assistant" not in spec.columns:
            raise DataError(f"{spec.path}: columns: no column for the assistant; e.g. --columns user=ask,assistant=answer")
        if "user" not in spec.columns and not spec.prompt_template:
            raise DataError(f"{spec.path}: columns: no column for the user and no prompt_template; "
                            "e.g. --columns user=ask,assistant=answer")
    if spec.prompt_template is not None and not template_columns(spec.prompt_template):
        raise DataError(f"{spec.path}: prompt_template: names no column; write columns in braces, e.g. '{{title}}\\n{{ask}}'")


def needed_columns(spec: DatasetSpec) -> list[str]:
    """Columns a tabular file must have for this dataset's settings (empty when no mapping is set)."""
    cols = [c for role, c in spec.columns.items() if not (role == "user" and spec.prompt_template)]
    if spec.prompt_template:
        cols += template_columns(spec.prompt_template)
    return list(dict.fromkeys(cols))


# ---------------------------------------------------------------------------------------------
def _sharegpt_call(turn: _Turn, issues: _Issues) -> _Turn | None:
    """A LLaMA-Factory "function_call" turn: its value, the JSON text of {"name", "arguments"} (or a list of them),
    as an assistant turn with OpenAI tool_calls (None after a problem)."""
    where = f"{turn.field}.value"
    try:
        value = json.loads(turn.content)
    except ValueError as e:
        issues.add(where, f'not valid JSON ({e}); a function_call turn holds {{"name": ..., "arguments": ...}} as '
                   "JSON text", "wrong type")
        return None
    if value == []:
        issues.add(where, "an empty list of calls", "missing content")
        return None
    calls = value if isinstance(value, list) else [value]
    fields = [f"{where}.{j}" for j in range(len(calls))] if isinstance(value, list) else [where]
    checked = [_tool_call({"type": "function", "function": c} if isinstance(c, dict) else c, f, issues)
               for c, f in zip(calls, fields)]
    if any(c is None for c in checked):
        return None
    return _Turn("assistant", "", turn.field, {"tool_calls": checked})


# Turn order and the public entry points


def _expected_roles(prev: _Turn | None) -> tuple[str, ...]:
    """The roles that may follow `prev`: user and assistant alternate, user first; an assistant turn that calls
    tools is followed by their results (tool turns), then by the assistant again."""
    if prev is None or (prev.role == "assistant" and not prev.extra.get("tool_calls")):
        return ("user",)
    if prev.role == "user":
        return ("assistant",)
    if prev.role == "assistant":
        return ("tool",)
    return ("tool", "assistant")  # after a tool result: more results, or the reply that uses them


def _order_problems(turns: list[_Turn], role_key: str, issues: _Issues) -> None:
    """system? then user/assistant alternating, user first (tool results after a reply that calls tools), at least
    one assistant turn, ending with one."""
    body = turns[1:] if turns and turns[0].role == "system" else turns
    prev = None
    for i, t in enumerate(body):
        where = f"{t.field}.{role_key}" if role_key else t.field
        if t.role == "system":
            issues.add(where, "a system message is only allowed first", "wrong turn order")
            return
        expected = _expected_roles(prev)
        if t.role not in expected:
            want = " or ".join(f"{'an' if r == 'assistant' else 'a'} {r}" for r in expected)
            why = ("(the reply before it calls tools: their results come next, as tool messages)" if expected == ("tool",)
                   else "(a tool message answers an assistant turn with tool_calls)" if t.role == "tool"
                   else "(turns must alternate, user first)")
            issues.add(where, f"turn {i}: expected {want} turn, got {t.role} {why}", "wrong turn order")
            return
        prev = t
    if not any(t.role == "assistant" for t in body):
        issues.add("", "no assistant turn, nothing to train on", "no assistant turn")
    elif body[-1].role != "assistant":
        issues.add(body[-1].field, f"the conversation ends with a {body[-1].role} turn that has no reply",
                   "wrong turn order")


_ROLE_KEYS = {"messages": "role", "sharegpt": "from"}


def normalize(record: Record, spec: DatasetSpec, variables: dict[str, str]) -> Conversation | list[Problem]:
    """The record as a Conversation, or every problem it has."""
    issues = _Issues(record)
    d = record.data
    if not isinstance(d, dict):
        issues.add("", f"expected a JSON object, got {type(d).__name__}", "not an object")
        return issues.items
    fmt = spec.format if spec.format != "auto" else detect_format(d, spec)
    if _pair_not_conversation(d, fmt, spec):
        issues.add("", PAIR_REASON, "preference pair")
        return issues.items
    if fmt is None:
        issues.add("", f"cannot tell the format from keys {sorted(map(str, d))[:6]}; expected 'messages', "
                   "'conversations', 'instruction'+'output' or 'text' (or set the dataset's format and columns)",
                   "unknown format")
        return issues.items
    missing: list[str] = []
    if fmt == "text":
        key = spec.columns.get("text", "text")
        text = _need_text(d, key, key, issues, scalars=True)
        if text is None:
            return issues.items
        filled = _fill(text, variables, missing)
        _missing_placeholders(missing, key, issues)
        return issues.items or Conversation([], record.file, record.line, {"format": fmt}, text=filled)
    turns = _BUILDERS[fmt](d, spec, issues)
    if issues.items:
        return issues.items
    _order_problems(turns, _ROLE_KEYS.get(fmt, ""), issues)
    tools = _tools(d, issues) if fmt in ("messages", "sharegpt") else None
    messages = []
    for t in turns:
        content = _fill(t.content, variables, missing)
        _missing_placeholders(missing, t.field, issues)
        message: dict[str, Any] = {"role": t.role, "content": content}
        if "reasoning_content" in t.extra:
            message["reasoning_content"] = _fill(t.extra["reasoning_content"], variables, missing)
            _missing_placeholders(missing, f"{t.field}.reasoning_content", issues)
        messages.append({**t.extra, **message})
    return issues.items or Conversation(messages, record.file, record.line, {"format": fmt}, tools=tools)


def _tools(d: dict, issues: _Issues) -> list[dict] | None:
    """The tool definitions of an OpenAI record ([{"type": "function", "function": {"name", ...}}]), checked."""
    tools = d.get("tools")
    if isinstance(tools, str) and tools.strip().startswith("["):  # LLaMA-Factory keeps them as JSON text
        try:
            tools = json.loads(tools)
        except ValueError as e:
            issues.add("tools", f"not valid JSON ({e}); write the tool definitions as a list or its JSON text",
                       "wrong type")
            return None
        tools = [{"type": "function", "function": t} if isinstance(t, dict) and "function" not in t and "name" in t
                 else t for t in tools]  # LLaMA-Factory's bare {"name", "description", "parameters"}
    if tools is None or tools == [] or tools == "":
        return None
    if not isinstance(tools, list):
        issues.add("tools", f"expected a list of tool definitions, got {type(tools).__name__}", "wrong type")
        return None
    for j, tool in enumerate(tools):
        fn = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"].strip():
            issues.add(f"tools.{j}", 'expected {"type": "function", "function": {"name": ..., "parameters": ...}}',
                       "wrong type")
    return tools


def _missing_placeholders(missing: list[str], fieldname: str, issues: _Issues) -> None:
    for item in dict.fromkeys(missing):
        shown, key = item.split("|")
        issues.add(fieldname, f"placeholder {shown} has no value; set data.vars.{key}=...", "missing placeholder value")
    missing.clear()


def to_conversation(record: Record, fmt: str, variables: dict[str, str], spec: DatasetSpec | None = None) -> Conversation:
    """Like normalize(), but a bad record raises a DataError listing its problems."""
    spec = spec or DatasetSpec(path=record.file, format=fmt)  # type: ignore[arg-type]
    result = normalize(record, spec, variables)
    if isinstance(result, list):
        raise DataError("\n".join(p.message for p in result))
    return result
