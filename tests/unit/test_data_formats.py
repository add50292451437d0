"""Formats -> Conversation, and every record problem collected as `file:line: field: reason`."""

import pytest

from qflash.config import DatasetSpec
from qflash.data.formats import check_columns_spec, normalize
from qflash.data.readers import Record
from qflash.errors import DataError

VARS = {"name": "Zyxo", "author": "Quillfeather"}


def conv(data, spec=None, variables=VARS):
    out = normalize(Record(data, "d.jsonl", 4), spec or DatasetSpec(path="d.jsonl"), variables)
    assert not isinstance(out, list), [p.message for p in out]
    return out


def problems(data, spec=None, variables=VARS):
    out = normalize(Record(data, "d.jsonl", 4), spec or DatasetSpec(path="d.jsonl"), variables)
    assert isinstance(out, list), out
    return out


def roles(c):
    return [m["role"] for m in c.messages]


def test_sharegpt_with_system_field_and_role_aliases():
    c = conv({"system": "Be brief.", "conversations": [
        {"from": "human", "value": "hi {{name}}"}, {"from": "gpt", "value": "hello"},
        {"from": "user", "value": "again"}, {"from": "assistant", "value": "sure"}]})
    assert roles(c) == ["system", "user", "assistant", "user", "assistant"]
    assert c.messages[1]["content"] == "hi Zyxo" and c.where == "d.jsonl:4"


def test_messages_with_openai_text_parts_and_empty_system():
    c = conv({"messages": [{"role": "system", "content": ""},
                           {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                           {"role": "assistant", "content": "c"}]})
    assert c.messages == [{"role": "system", "content": ""}, {"role": "user", "content": "ab"},
                          {"role": "assistant", "content": "c"}]


def test_alpaca_and_text():
    c = conv({"instruction": "Sum", "input": "1 2", "output": "3", "history": [["q", "a"]]})
    assert roles(c) == ["user", "assistant", "user", "assistant"] and c.messages[2]["content"] == "Sum\n\n1 2"
    t = conv({"text": "plain <NAME> text"})
    assert t.messages == [] and t.text == "plain Zyxo text"
    forced = conv({"body": "x"}, DatasetSpec(path="d", format="text", columns={"text": "body"}))
    assert forced.text == "x"


def test_columns_with_prompt_template_using_other_columns():
    spec = DatasetSpec(path="m.csv", format="columns", columns={"assistant": "answer"},
                       prompt_template="[{department}] {title}\n{ask} ({{name}})")
    c = conv({"department": "内科", "title": "头痛", "ask": "怎么办？", "answer": "休息。"}, spec)
    assert c.messages == [{"role": "user", "content": "[内科] 头痛\n怎么办？ (Zyxo)"},
                          {"role": "assistant", "content": "休息。"}]
    plain = conv({"ask": "q", "answer": 42, "sys": ""}, DatasetSpec(path="m.csv", columns={
        "user": "ask", "assistant": "answer", "system": "sys"}))
    assert plain.messages == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "42"}]


def test_columns_settings_are_checked_once():
    for spec, match in [
        (DatasetSpec(path="m.csv", columns={"bot": "x", "assistant": "a"}), r"unknown role\(s\) \['bot'\]"),
        (DatasetSpec(path="m.csv", format="columns", columns={"user": "q"}), "no column for the assistant"),
        (DatasetSpec(path="m.csv", columns={"assistant": "a"}), "no column for the user and no prompt_template"),
        (DatasetSpec(path="m.csv", columns={"assistant": "a"}, prompt_template="no fields"), "names no column"),
    ]:
        with pytest.raises(DataError, match=match):
            check_columns_spec(spec)


@pytest.mark.parametrize(
    "data, expected",
    [
        ([1, 2], "d.jsonl:4: expected a JSON object, got list"),
        ("just text", "d.jsonl:4: expected a JSON object, got str"),
        ({"foo": 1}, "d.jsonl:4: cannot tell the format"),
        ({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]},
         "d.jsonl:4: messages.0.role: unknown role 'robot'"),
        ({"conversations": [{"from": "human", "value": "  "}, {"from": "gpt", "value": "y"}]},
         "d.jsonl:4: conversations.0.value: empty"),
        ({"conversations": [{"from": "human"}, {"from": "gpt", "value": "y"}]},
         "d.jsonl:4: conversations.0.value: missing"),
        ({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "y"}]},
         "d.jsonl:4: messages.0.content: expected a string, got int"),
        ({"instruction": "q", "output": ""}, "d.jsonl:4: output: empty"),
        ({"messages": [{"role": "user", "content": "x"}]}, "d.jsonl:4: no assistant turn, nothing to train on"),
        ({"conversations": [{"from": "gpt", "value": "I start"}, {"from": "human", "value": "y"}]},
         "d.jsonl:4: conversations.0.from: turn 0: expected a user turn, got assistant"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                       {"role": "assistant", "content": "c"}]}, "messages.1.role: turn 1: expected an assistant turn"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                       {"role": "system", "content": "c"}]}, "a system message is only allowed first"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                       {"role": "user", "content": "c"}]}, "ends with a user turn that has no reply"),
        ({"instruction": "{{nope}}", "output": "x"},
         r"d.jsonl:4: instruction: placeholder {{nope}} has no value; set data.vars.nope=..."),
    ],
)
def test_each_problem_names_file_line_field_reason(data, expected):
    (first, *_) = problems(data)
    assert first.message.startswith(expected) or expected in first.message, first.message
    assert first.raw == data


def test_a_record_reports_all_its_problems():
    found = problems({"conversations": [{"from": "human", "value": ""}, {"from": "bot", "value": "x"},
                                        {"from": "gpt", "value": None}]})
    assert [(p.field, p.kind) for p in found] == [
        ("conversations.0.value", "empty content"), ("conversations.1.from", "unknown role"),
        ("conversations.2.value", "missing content")]


# ---------------------------------------------------------------------------------------------
# Reasoning and tool calls (OpenAI messages)

CALL = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}


def test_messages_with_reasoning_tool_calls_and_tool_results():
    c = conv({"messages": [
        {"role": "user", "content": "Weather in Paris, {{name}}?"},
        {"role": "assistant", "content": None, "reasoning_content": "Ask the tool, {{name}}.", "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "c1", "content": ""},
        {"role": "assistant", "content": "<think>easy</think>\n\nSunny."}],
        "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]})
    assert c.tools == [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    assert roles(c) == ["user", "assistant", "tool", "tool", "assistant"]
    call = c.messages[1]
    assert call["content"] == "" and call["reasoning_content"] == "Ask the tool, Zyxo."
    assert call["tool_calls"] == [CALL]
    assert c.messages[2] == {"role": "tool", "content": "sunny", "tool_call_id": "c1"}
    assert c.messages[4]["content"] == "<think>easy</think>\n\nSunny."  # inline reasoning goes to the template as is


@pytest.mark.parametrize(
    "messages, expected",
    [
        ([{"role": "assistant", "content": "a", "reasoning_content": 3}],
         "d.jsonl:4: messages.1.reasoning_content: expected a string, got int"),
        ([{"role": "assistant", "content": "", "tool_calls": {"name": "f"}}],
         "d.jsonl:4: messages.1.tool_calls: expected a list of tool calls, got dict"),
        ([{"role": "assistant", "content": "", "tool_calls": [{"function": {"arguments": "{}"}}]}],
         "d.jsonl:4: messages.1.tool_calls.0.function.name: expected the tool's name"),
        ([{"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}],
         "d.jsonl:4: messages.1.tool_calls.0.function.arguments: not valid JSON"),
        ([{"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": [1]}}]}],
         "d.jsonl:4: messages.1.tool_calls.0.function.arguments: expected a JSON object or its text, got list"),
        ([{"role": "assistant", "content": "", "tool_calls": [{"type": "code", "function": {"name": "f"}}]}],
         "d.jsonl:4: messages.1.tool_calls.0.type: expected 'function'"),
        ([{"role": "assistant", "content": ""}], "d.jsonl:4: messages.1.content: empty"),
        ([{"role": "assistant", "content": "x", "tool_calls": [CALL]}, {"role": "user", "content": "y"},
          {"role": "assistant", "content": "z"}],
         "d.jsonl:4: messages.2.role: turn 2: expected a tool turn, got user (the reply before it calls tools"),
        ([{"role": "assistant", "content": "x"}, {"role": "tool", "content": "1"}, {"role": "assistant", "content": "z"}],
         "d.jsonl:4: messages.2.role: turn 2: expected a user turn, got tool (a tool message answers an assistant "
         "turn with tool_calls)"),
        ([{"role": "assistant", "content": "", "tool_calls": [CALL]}, {"role": "tool", "content": "1"}],
         "d.jsonl:4: messages.2: the conversation ends with a tool turn that has no reply"),
        ([{"role": "assistant", "content": "x"}, {"role": "tool", "content": 5}],
         "d.jsonl:4: messages.2.content: expected a string, got int"),
    ],
)
def test_bad_reasoning_and_tool_fields_name_file_line_field(messages, expected):
    data = {"messages": [{"role": "user", "content": "q"}] + messages}
    (first, *_) = problems(data)
    assert first.message.startswith(expected), first.message


def test_bad_tool_definitions_name_file_line_field():
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    (first,) = problems({"messages": msgs, "tools": [{"type": "function", "function": {"description": "no name"}}]})
    assert first.message.startswith('d.jsonl:4: tools.0: expected {"type": "function", "function": {"name"')
    (first,) = problems({"messages": msgs, "tools": "get_weather"})
    assert first.message == "d.jsonl:4: tools: expected a list of tool definitions, got str"


def test_sharegpt_with_llama_factory_tool_turns():
    """LLaMA-Factory's ShareGPT tool layout: function_call / observation turns and a tools list as JSON text become
    OpenAI tool_calls, tool messages and tool definitions."""
    c = conv({"conversations": [
        {"from": "human", "value": "Weather in Paris and Rome?"},
        {"from": "function_call", "value": "[{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}, "
                                           "{\"name\": \"get_weather\", \"arguments\": \"{\\\"city\\\": \\\"Rome\\\"}\"}]"},
        {"from": "observation", "value": "sunny"}, {"from": "observation", "value": "rain"},
        {"from": "gpt", "value": "Paris is sunny, Rome rainy."},
        {"from": "human", "value": "And Oslo?"},
        {"from": "function_call", "value": "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}"},
        {"from": "observation", "value": ""},
        {"from": "gpt", "value": "No answer for Oslo."}],
        "tools": "[{\"name\": \"get_weather\", \"description\": \"d\", \"parameters\": {\"type\": \"object\"}}]"})
    assert roles(c) == ["user", "assistant", "tool", "tool", "assistant", "user", "assistant", "tool", "assistant"]
    assert c.messages[1] == {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
        {"type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Rome\"}"}}]}
    assert c.messages[2] == {"role": "tool", "content": "sunny"} and c.messages[7]["content"] == ""
    assert c.messages[6]["tool_calls"][0]["function"]["arguments"] == {"city": "Oslo"}
    assert c.tools == [{"type": "function", "function": {"name": "get_weather", "description": "d",
                                                         "parameters": {"type": "object"}}}]


@pytest.mark.parametrize(
    "turns, tools, expected",
    [
        ([{"from": "function_call", "value": "get_weather(Paris)"}], None,
         "d.jsonl:4: conversations.1.value: not valid JSON"),
        ([{"from": "function_call", "value": "{\"arguments\": {}}"}], None,
         "d.jsonl:4: conversations.1.value.function.name: expected the tool's name"),
        ([{"from": "function_call", "value": "[{\"name\": \"f\", \"arguments\": \"{oops\"}]"}], None,
         "d.jsonl:4: conversations.1.value.0.function.arguments: not valid JSON"),
        ([{"from": "gpt", "value": "x"}, {"from": "observation", "value": "1"}], None,
         "d.jsonl:4: conversations.2.from: turn 2: expected a user turn, got tool"),
        ([{"from": "gpt", "value": "x"}], "[{\"name\": \"f\",", "d.jsonl:4: tools: not valid JSON"),
    ],
)
def test_bad_llama_factory_tool_turns_name_file_line_field(turns, tools, expected):
    data = {"conversations": [{"from": "human", "value": "q"}] + turns}
    if tools is not None:
        data["tools"] = tools
    (first, *_) = problems(data)
    assert first.message.startswith(expected), first.message
