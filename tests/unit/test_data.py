
import pytest

from qflash.data.formats import Conversation, to_conversation
from qflash.data.readers import Record, read_file
from qflash.data.template import IGNORE, ChatRenderer
from qflash.errors import DataError

VARS = {"name": "Zyxo", "author": "Quillfeather"}


def test_json_array_records_keep_their_lines(tmp_path):
    p = tmp_path / "a.json"
    p.write_text('[\n {"a": 1},\n\n {"b": [1,\n 2]},\n {"c": 3}\n]\n', encoding="utf-8")
    recs = list(read_file(p))
    assert [r.line for r in recs] == [2, 4, 6]
    assert recs[1].data == {"b": [1, 2]}


def test_malformed_json_names_the_line(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('[\n {"a": 1},\n {"b": oops}\n]\n', encoding="utf-8")
    with pytest.raises(DataError, match=rf"{p}:3: malformed JSON"):
        list(read_file(p))
    q = tmp_path / "bad.jsonl"
    q.write_text('{"a": 1}\n{"a": \n', encoding="utf-8")
    with pytest.raises(DataError, match=rf"{q}:2: malformed JSON"):
        list(read_file(q))


def test_bom_and_invalid_utf8(tmp_path):
    p = tmp_path / "bom.jsonl"
    p.write_bytes(b'\xef\xbb\xbf{"instruction": "hi", "output": "yo"}\n')
    assert list(read_file(p))[0].data["instruction"] == "hi"
    q = tmp_path / "latin1.jsonl"
    q.write_bytes(b'{"a": "ok"}\n{"a": "caf\xe9"}\n')
    with pytest.raises(DataError, match=rf"{q}:2: byte 0xe9 is not valid UTF-8"):
        list(read_file(q))


def rec(data, line=7):
    return Record(data, "f.json", line)


def test_alpaca_with_input_system_history_and_placeholders():
    c = to_conversation(
        rec({"system": "Be brief.", "instruction": "Who made <NAME>?", "input": "Answer.", "output": "{{author}} made me, {{name}}.",
             "history": [["hi", "hello, I am {{ name }}"]]}),
        "auto", VARS,
    )
    assert [m["role"] for m in c.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert c.messages[2]["content"] == "hello, I am Zyxo"
    assert c.messages[3]["content"] == "Who made Zyxo?\n\nAnswer."
    assert c.messages[4]["content"] == "Quillfeather made me, Zyxo."


def test_public_style_placeholders_are_filled(tmp_path):
    from conftest import DEMO

    for r in read_file(DEMO / "identity_public_style.json"):
        c = to_conversation(r, "alpaca", VARS)
        text = " ".join(m["content"] for m in c.messages)
        assert "<NAME>" not in text and "<AUTHOR>" not in text and "Zyxo" in text


def test_messages_and_sharegpt():
    c = to_conversation(rec({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}), "auto", {})
    assert c.messages[-1] == {"role": "assistant", "content": "b"}
    s = to_conversation(rec({"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}), "auto", {})
    assert s.messages == c.messages


@pytest.mark.parametrize(
    "data, match",
    [
        ([1, 2], "expected a JSON object"),
        ({"foo": 1}, "cannot tell the format"),
        ({"instruction": "q", "output": "  "}, "output: empty"),
        ({"instruction": "q"}, "cannot tell the format"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "unknown role 'robot'"),
        ({"messages": [{"role": "user", "content": "x"}]}, "no assistant turn"),
        ({"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]}, "expected a user turn"),
        ({"instruction": "{{nope}}", "output": "x"}, r"placeholder \{\{nope\}\} has no value; set data.vars.nope"),
    ],
)
def test_bad_records_name_file_line_field(data, match):
    with pytest.raises(DataError, match=match) as e:
        to_conversation(rec(data), "auto", VARS)
    assert str(e.value).startswith("f.json:7: ")


def _trained_text(tok, ex):
    return tok.decode([i for i, l in zip(ex.input_ids, ex.labels) if l != IGNORE])


def test_assistant_only_labels_with_end_of_turn(smol_tokenizer):
    r = ChatRenderer(smol_tokenizer)
    assert r.eot_text == "<|im_end|>"
    conv = Conversation([
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Who are you?"},
        {"role": "assistant", "content": "I am Zyxo. <|im_start|>assistant is just text here"},
        {"role": "user", "content": "你叫什么名字？"},
        {"role": "assistant", "content": "我叫Zyxo。"},
    ])
    ex = r.encode(conv)
    assert ex.labels[0] == IGNORE and len(ex.labels) == len(ex.input_ids)
    assert _trained_text(smol_tokenizer, ex) == (
        "I am Zyxo. <|im_start|>assistant is just text here<|im_end|>我叫Zyxo。<|im_end|>"
    )
    last = ChatRenderer(smol_tokenizer, train_on="last_assistant").encode(conv)
    assert _trained_text(smol_tokenizer, last) == "我叫Zyxo。<|im_end|>"
    every = ChatRenderer(smol_tokenizer, train_on="all").encode(conv)
    assert list(every.labels) == list(every.input_ids)


def test_chatml_template_for_tokenizer_without_one(smol_tokenizer):
    import copy

    tok = copy.deepcopy(smol_tokenizer)
    tok.chat_template = None
    with pytest.raises(DataError, match="no chat template; set data.template=chatml"):
        ChatRenderer(tok)
    r = ChatRenderer(tok, template="chatml")
    ex = r.encode(Conversation([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]))
    assert _trained_text(tok, ex) == "hello there<|im_end|>"
    assert not tok.decode(ex.input_ids).startswith("<|im_start|>system")  # chatml adds no default system prompt
