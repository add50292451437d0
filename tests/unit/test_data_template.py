"""Exact assistant-only labels: a property test over generated conversations, and the render paths."""

import copy

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from qflash.data.formats import Conversation
from qflash.data.template import CHATML, IGNORE, ChatRenderer

EOT = "<|im_end|>"
WORDS = st.sampled_from(["hello", "world", "Zyxo", "data", "I'm", "3.14", "x=1;", "naïve", "🙂", "<b>", "{x}",
                         "{{name}}", "|", "\\n", "assistant", "<|im_start|>", "\"quoted\"", "tab\there"])
CHINESE = st.text(alphabet="你好世界数据模型训练，。！？：“”（）", min_size=1, max_size=12)
SPACE = st.sampled_from([" ", "  ", "\n", "\n\n", "\t", " \n ", ""])


@st.composite
def content(draw):
    parts = draw(st.lists(st.one_of(WORDS, CHINESE, SPACE), min_size=1, max_size=12))
    text = "".join(parts)
    return text if text.strip() else "x" + text


@st.composite
def conversation(draw):
    msgs = []
    if draw(st.booleans()):
        msgs.append({"role": "system", "content": draw(content())})
    for _ in range(draw(st.integers(1, 6))):
        msgs.append({"role": "user", "content": draw(content())})
        msgs.append({"role": "assistant", "content": draw(content())})
    return Conversation(msgs, "gen", 1)


def trained_text(tok, ex) -> str:
    ids = [int(i) for i, label in zip(ex.input_ids, ex.labels) if label != IGNORE]
    return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


_RENDERERS: dict = {}


def renderer(tok, template=None, train_on="assistant", train_reasoning=True) -> ChatRenderer:
    """One renderer per setting for the whole module (hypothesis calls the tests many times)."""
    key = (id(tok), template, train_on, train_reasoning)
    if key not in _RENDERERS:
        _RENDERERS[key] = ChatRenderer(tok, template, train_on, train_reasoning)
    return _RENDERERS[key]


def check_exact(tok, template, conv: Conversation) -> None:
    ex = renderer(tok, template).encode(conv)
    replies = [m["content"] for m in conv.messages if m["role"] == "assistant"]
    assert trained_text(tok, ex) == "".join(r + EOT for r in replies)
    # Nothing is lost either: all tokens decode to the rendered conversation.
    assert tok.decode(list(ex.input_ids), skip_special_tokens=False, clean_up_tokenization_spaces=False) == \
        renderer(tok, template).render(conv.messages)
    last = renderer(tok, template, "last_assistant").encode(conv)
    assert trained_text(tok, last) == replies[-1] + EOT
    assert np.array_equal(last.input_ids, ex.input_ids)


PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(conv=conversation())
def test_trained_tokens_are_exactly_the_replies_with_their_end_of_turn_smollm(smol_tokenizer, conv):
    check_exact(smol_tokenizer, None, conv)


@PROPERTY
@given(conv=conversation())
def test_trained_tokens_are_exactly_the_replies_with_their_end_of_turn_chatml(smol_tokenizer, conv):
    check_exact(smol_tokenizer, "chatml", conv)


def test_fast_path_is_taken_and_matches_the_prefix_renders(smol_tokenizer):
    r = ChatRenderer(smol_tokenizer)
    assert r._compiled is not None and r.split_exact
    conv = Conversation([{"role": "user", "content": " lead"}, {"role": "assistant", "content": "\n\nyes "},
                         {"role": "user", "content": "中文"}, {"role": "assistant", "content": "好的"}])
    full, spans = r.reply_spans(conv)
    slow = [r._reply_bounds(conv.messages, full, i) for i in (1, 3)]
    assert spans == slow and full == smol_tokenizer.apply_chat_template(conv.messages, tokenize=False)


def test_a_template_that_rewrites_content_takes_the_exact_slow_path(smol_tokenizer):
    tok = copy.deepcopy(smol_tokenizer)
    tok.chat_template = CHATML.replace("message['content']", "(message['content'] | trim)")
    r = ChatRenderer(tok)
    conv = Conversation([{"role": "user", "content": "q"}, {"role": "assistant", "content": "  padded reply \n"}])
    assert trained_text(tok, r.encode(conv)) == "padded reply" + EOT
    plain = Conversation([{"role": "user", "content": "q"}, {"role": "assistant", "content": "plain"}])
    assert trained_text(tok, r.encode(plain)) == "plain" + EOT


def test_template_refusing_a_conversation_is_a_problem(smol_tokenizer):
    tok = copy.deepcopy(smol_tokenizer)
    tok.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
                         + CHATML)
    r = ChatRenderer(tok)
    bad = Conversation([{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                        {"role": "assistant", "content": "a"}], "f.json", 3)
    (problem,) = r.encode_many([bad])
    assert problem.message == "f.json:3: the chat template refuses this conversation: no system role"


def test_text_samples_train_every_token_and_end_with_eos(smol_tokenizer):
    r = ChatRenderer(smol_tokenizer)
    ex = r.encode(Conversation([], "t.jsonl", 1, text="Just some text."))
    assert int(ex.input_ids[-1]) == smol_tokenizer.eos_token_id
    assert np.array_equal(ex.labels, ex.input_ids)
    assert smol_tokenizer.decode(list(ex.input_ids)) == "Just some text." + smol_tokenizer.eos_token


def test_renderer_pickles_for_worker_processes(smol_tokenizer):
    import pickle

    r = pickle.loads(pickle.dumps(ChatRenderer(smol_tokenizer, template="chatml")))
    conv = Conversation([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}])
    assert trained_text(r.tok, r.encode(conv)) == "a" + EOT


@pytest.mark.parametrize("bad", ["jinja", "nope"])
def test_unknown_template_name(smol_tokenizer, bad):
    from qflash.errors import DataError

    with pytest.raises(DataError, match="is not a built-in template"):
        ChatRenderer(smol_tokenizer, template=bad)


def test_offsets_fallback_for_tokenizers_whose_pieces_do_not_concatenate(smol_tokenizer):
    r = ChatRenderer(smol_tokenizer)
    r.split_exact = False  # as for a SentencePiece tokenizer that prefixes every piece with a space
    conv = Conversation([{"role": "user", "content": "q"}, {"role": "assistant", "content": "an answer"},
                         {"role": "user", "content": "again"}, {"role": "assistant", "content": "好的"}])
    assert trained_text(smol_tokenizer, r.encode(conv)) == "an answer" + EOT + "好的" + EOT
    r.train_on = "last_assistant"
    assert trained_text(smol_tokenizer, r.encode(conv)) == "好的" + EOT


# ---------------------------------------------------------------------------------------------
# Templates that are not prefix-stable (Qwen3-style), reasoning and tool calls

import json  # noqa: E402

from qflash.data.template import template_source  # noqa: E402

MARKERS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<start_of_turn>", "<end_of_turn>", "[INST]",
           "[/INST]"]


@pytest.fixture(scope="module")
def base_tok(smol_tokenizer):
    """The embedded tokenizer as a base model's: no chat template, and the turn markers of every built-in template."""
    tok = copy.deepcopy(smol_tokenizer)
    tok.add_special_tokens({"additional_special_tokens": MARKERS})
    tok.chat_template = None
    return tok


@st.composite
def tool_call(draw):
    args = draw(st.dictionaries(st.sampled_from(["city", "q", "n", "单位"]),
                                st.one_of(st.integers(-5, 99), st.sampled_from(["Paris", "北京", "a \"b\""])),
                                max_size=2))
    name = draw(st.sampled_from(["get_weather", "search", "计算"]))
    return {"type": "function", "function": {"name": name, "arguments": json.dumps(args) if draw(st.booleans())
                                             else args}}


@st.composite
def reply(draw, calls=False):
    """An assistant message: reasoning as a field, inline, or none; tool calls when asked (content then maybe empty)."""
    answer = draw(content())
    msg = {"role": "assistant", "content": answer}
    how = draw(st.sampled_from(["field", "inline", "none"]))
    if how == "field":
        msg["reasoning_content"] = draw(content())
    elif how == "inline":
        msg["content"] = "<think>" + draw(content()) + "</think>" + draw(st.sampled_from(["", "\n", "\n\n"])) + answer
    if calls:
        msg["tool_calls"] = draw(st.lists(tool_call(), min_size=1, max_size=2))
        if how != "inline" and draw(st.booleans()):
            msg["content"] = ""
    return msg


@st.composite
def agent_conversation(draw):
    msgs = [{"role": "system", "content": draw(content())}] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(1, 3))):
        msgs.append({"role": "user", "content": draw(content())})
        for _ in range(draw(st.integers(0, 2))):  # rounds of tool calls and their results
            call = draw(reply(calls=True))
            msgs.append(call)
            msgs += [{"role": "tool", "content": draw(content())} for _ in call["tool_calls"]]
        msgs.append(draw(reply()))
    return Conversation(msgs, "gen", 1, tools=draw(st.sampled_from([None, TOOLS])))


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


def qwen_reply_as_last(m: dict, train_reasoning: bool) -> str:
    """What the qwen template writes for reply `m` when it is the last message, by hand: the trained text."""
    content, reasoning = m["content"], m.get("reasoning_content", "")
    if not reasoning and "</think>" in content:
        reasoning = content.split("</think>")[0].split("<think>")[-1]
        content = content.split("</think>")[-1].lstrip("\n")
    calls = ""
    for j, c in enumerate(m.get("tool_calls", [])):
        args = c["function"]["arguments"]
        args = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
        calls += ("\n" if j or content else "") + '<tool_call>\n{"name": ' + \
            json.dumps(c["function"]["name"], ensure_ascii=False) + ', "arguments": ' + args + "}\n</tool_call>"
    think = "<think>\n" + reasoning.strip("\n") + "\n</think>\n\n" if train_reasoning else ""
    return think + content + calls + EOT


def decoded(tok, ids) -> str:
    return tok.decode([int(i) for i in ids], skip_special_tokens=False, clean_up_tokenization_spaces=False)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv=agent_conversation(), train_reasoning=st.booleans())
def test_qwen_style_template_trains_each_reply_as_rendered_when_last(base_tok, conv, train_reasoning):
    r = renderer(base_tok, "qwen", "assistant", train_reasoning)
    (seqs,) = r.encode_sequences([conv])
    turns = [i for i, m in enumerate(conv.messages) if m["role"] == "assistant"]
    replies = [qwen_reply_as_last(conv.messages[i], train_reasoning) for i in turns]
    event("one sequence" if len(seqs) == 1 else "one sequence per reply")
    if len(seqs) == 1:
        # Prefix-stable for this conversation (every reply after the last user message keeps its reasoning, or
        # there is one reply): one sequence, every reply trained in it as it renders when last.
        turns = turns[-1:]
        replies = ["".join(replies)]
    assert len(seqs) == len(turns)
    for i, ex, expected in zip(turns, seqs, replies):
        # All tokens: the conversation up to turn i as transformers renders it; trained: turn i's reply (and, in a
        # single sequence, the replies before it).
        assert decoded(base_tok, ex.input_ids) == base_tok.apply_chat_template(
            conv.messages[:i + 1], tokenize=False, chat_template=template_source("qwen"), tools=conv.tools)
        assert trained_text(base_tok, ex) == expected


@PROPERTY
@given(conv=agent_conversation())
def test_qwen_style_template_last_assistant_is_one_sequence(base_tok, conv):
    (seqs,) = renderer(base_tok, "qwen", "last_assistant").encode_sequences([conv])
    assert len(seqs) == 1
    assert trained_text(base_tok, seqs[0]) == qwen_reply_as_last(conv.messages[-1], True)


def test_the_qwen_template_is_what_makes_the_conversation_several_sequences(base_tok):
    """Not prefix-stable: the earlier reply's reasoning is dropped in the whole rendering. The same conversation under
    a prefix-stable template (llama3) stays one sequence, with both replies trained in it."""
    conv = Conversation([{"role": "user", "content": "q1"},
                         {"role": "assistant", "content": "a1", "reasoning_content": "r1"},
                         {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}], "f.jsonl", 4)
    whole = ChatRenderer(base_tok, "qwen").render(conv.messages)
    assert "r1" not in whole
    first, second = ChatRenderer(base_tok, "qwen").encode_sequences([conv])[0]
    assert trained_text(base_tok, first) == "<think>\nr1\n</think>\n\na1" + EOT
    assert "r1" not in decoded(base_tok, second.input_ids)
    assert trained_text(base_tok, second) == "<think>\n\n</think>\n\na2" + EOT
    by_offsets = ChatRenderer(base_tok, "qwen", train_reasoning=False)
    by_offsets.split_exact = False  # as for a tokenizer whose pieces do not concatenate
    assert [trained_text(base_tok, ex) for ex in by_offsets.encode_sequences([conv])[0]] == ["a1" + EOT, "a2" + EOT]
    (one,) = ChatRenderer(base_tok, "llama3").encode_sequences([conv])[0]
    assert trained_text(base_tok, one) == "<think>\nr1\n</think>\n\na1<|eot_id|>a2<|eot_id|>"
    (problem,) = ChatRenderer(base_tok, "qwen").encode_many([conv])
    assert problem.message.startswith("f.jsonl:4: the chat template renders earlier turns differently, so this "
                                      "conversation trains as 2 sequences")
    assert "data.train_on=last_assistant" in problem.message


def test_prefix_stable_template_keeps_one_sequence_and_masks_inline_reasoning(smol_tokenizer):
    conv = Conversation([{"role": "user", "content": "q"},
                         {"role": "assistant", "content": "<think>hmm</think>\n\nyes"},
                         {"role": "user", "content": "again"}, {"role": "assistant", "content": "ok"}])
    (kept,) = renderer(smol_tokenizer).encode_sequences([conv])[0]
    assert trained_text(smol_tokenizer, kept) == "<think>hmm</think>\n\nyes" + EOT + "ok" + EOT
    masked = ChatRenderer(smol_tokenizer, train_reasoning=False).encode(conv)
    assert trained_text(smol_tokenizer, masked) == "yes" + EOT + "ok" + EOT
    assert decoded(smol_tokenizer, masked.input_ids) == decoded(smol_tokenizer, kept.input_ids)


def test_a_field_the_template_does_not_render_is_a_problem_not_a_silent_drop(smol_tokenizer):
    conv = Conversation([{"role": "user", "content": "q"},
                         {"role": "assistant", "content": "a", "reasoning_content": "why"}], "d.jsonl", 7)
    (problem,) = renderer(smol_tokenizer, "chatml").encode_many([conv])
    assert problem.message.startswith("d.jsonl:7: messages.1.reasoning_content: the chat template does not render it")
    calls = Conversation([{"role": "user", "content": "q"},
                          {"role": "assistant", "content": "", "tool_calls": [
                              {"type": "function", "function": {"name": "f", "arguments": {}}}]},
                          {"role": "tool", "content": "1"}, {"role": "assistant", "content": "a"}], "d.jsonl", 8)
    (problem,) = renderer(smol_tokenizer, "chatml").encode_many([calls])
    assert "messages.1.tool_calls: the chat template does not render tool calls" in problem.message
    calls.tools = TOOLS
    (problem,) = renderer(smol_tokenizer, "chatml").encode_many([calls])
    assert problem.message.startswith("d.jsonl:8: tools: the chat template does not render tool definitions")
    (problem,) = renderer(smol_tokenizer, "qwen", "all").encode_many([calls])
    assert problem.message.startswith("d.jsonl:8: messages.2: a tool result, which is never trained, but "
                                      "data.train_on=all trains every token")
    assert trained_text(smol_tokenizer, renderer(smol_tokenizer, "qwen").encode_sequences([calls])[0][0]) == \
        '<think>\n\n</think>\n\n<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>' + EOT


# ---------------------------------------------------------------------------------------------
# Built-in templates and template files

@pytest.mark.parametrize("name, eot", [("chatml", EOT), ("qwen", EOT), ("llama3", "<|eot_id|>"),
                                       ("gemma", "<end_of_turn>"), ("mistral", "<|im_end|>")])
def test_each_built_in_template_compiles_as_transformers_does_and_labels_exactly(base_tok, name, eot):
    """mistral ends a reply with the tokenizer's EOS, which is <|im_end|> for the embedded tokenizer."""
    r = renderer(base_tok, name)
    assert r._compiled is not None and r.eot_text == eot
    assert all(r.renders.values()) or name == "chatml"
    conv = Conversation([{"role": "system", "content": "s"}, {"role": "user", "content": "q1"},
                         {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"},
                         {"role": "assistant", "content": "a2"}])
    exs = r.encode_sequences([conv])[0]
    assert [trained_text(base_tok, ex) for ex in exs] == (["<think>\n\n</think>\n\na1" + eot, "<think>\n\n</think>\n\na2" + eot]
                                                          if name == "qwen" else ["a1" + eot + "a2" + eot])
    assert decoded(base_tok, exs[-1].input_ids) == base_tok.apply_chat_template(
        conv.messages, tokenize=False, chat_template=template_source(name))


def test_a_template_file(base_tok, tmp_path):
    path = tmp_path / "mine.jinja"
    path.write_text(template_source("llama3").replace("<|start_header_id|>", "<|start_header_id|>#"), encoding="utf-8")
    r = ChatRenderer(base_tok, str(path))
    conv = Conversation([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}])
    assert "<|start_header_id|>#user" in decoded(base_tok, r.encode(conv).input_ids)
    assert trained_text(base_tok, r.encode(conv)) == "a<|eot_id|>"


def test_a_missing_template_file_or_unknown_name_is_a_config_error_naming_file_and_line(tmp_path):
    from qflash.config import load_config
    from qflash.errors import ConfigError

    cfg = tmp_path / "run.yaml"
    cfg.write_text("data:\n  max_len: 64\n  template: lama3\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"run.yaml:3: data.template is not a built-in template \('lama3'\); "
                                          r"did you mean 'llama3'\?"):
        load_config(cfg)
    with pytest.raises(ConfigError, match=r"command line 'data.template=nope/x.jinja': data.template is not a file "
                                          r"\(nope/x.jinja\)"):
        load_config(None, ["data.template=nope/x.jinja"])
    assert load_config(None, ["data.template=gemma"]).data.template == "gemma"


def test_a_base_model_given_a_template_is_warned_once_and_refused_without_its_tokens(smol_tokenizer, base_tok, caplog):
    from qflash import once
    from qflash.errors import DataError

    once._said.clear()
    with caplog.at_level("WARNING", logger="qflash.data.template"):
        ChatRenderer(base_tok, "gemma")
        ChatRenderer(base_tok, "gemma")
    warned = [r.message for r in caplog.records if "no chat template of its own" in r.message]
    assert len(warned) == 1 and warned[0].startswith(
        "the model has no chat template of its own (a base model); data.template=gemma marks turns with "
        "<start_of_turn>, <end_of_turn>: <start_of_turn>, <end_of_turn> are in its vocabulary, but it has most likely "
        "never seen them in pre-training")
    caplog.clear()
    with caplog.at_level("WARNING", logger="qflash.data.template"):
        ChatRenderer(smol_tokenizer, "chatml")  # a chat model (it has a template of its own): no warning
    assert not caplog.records
    bare = copy.deepcopy(smol_tokenizer)
    bare.chat_template = None
    with pytest.raises(DataError, match=r"data.template=llama3 ends a reply with <\|eot_id\|>, which is not a token of "
                                        r"this tokenizer, so a fine-tuned model could not learn to stop; use a template "
                                        r"whose end-of-turn token it has \(chatml, qwen, mistral\)"):
        ChatRenderer(bare, "llama3")
    caplog.clear()
    with caplog.at_level("WARNING", logger="qflash.data.template"):
        r = ChatRenderer(bare, "mistral")  # ends replies with EOS; [INST] and [/INST] become plain text
    assert [rec.message for rec in caplog.records] == [
        "the model has no chat template of its own (a base model); data.template=mistral marks turns with [INST], "
        "[/INST]: [INST], [/INST] are not tokens of its vocabulary (written as plain text); expect more steps before "
        "replies stop cleanly"]
    conv = Conversation([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}])
    assert trained_text(bare, r.encode(conv)) == "a" + EOT


GOLDEN = {  # system, user, reply, user, reply: each template's turn format, written out by hand
    "llama3": "<|im_start|><|start_header_id|>system<|end_header_id|>\n\ns<|eot_id|><|start_header_id|>user"
              "<|end_header_id|>\n\nq1<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\na1<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\nq2<|eot_id|><|start_header_id|>assistant"
              "<|end_header_id|>\n\na2<|eot_id|>",
    "gemma": "<|im_start|><start_of_turn>user\ns\n\nq1<end_of_turn>\n<start_of_turn>model\na1<end_of_turn>\n"
             "<start_of_turn>user\nq2<end_of_turn>\n<start_of_turn>model\na2<end_of_turn>\n",
    "mistral": "<|im_start|>[INST] s\n\nq1[/INST]a1<|im_end|>[INST] q2[/INST]a2<|im_end|>",
    "qwen": "<|im_start|>system\ns<|im_end|>\n<|im_start|>user\nq1<|im_end|>\n<|im_start|>assistant\na1<|im_end|>\n"
            "<|im_start|>user\nq2<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\na2<|im_end|>\n",
}


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_built_in_templates_render_their_turn_format(base_tok, name):
    """The embedded tokenizer's BOS is <|im_start|>, hence the first token of the BOS-writing ones."""
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
            {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]
    assert renderer(base_tok, name).render(msgs) == GOLDEN[name]


def test_tool_definitions_reach_the_template(base_tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Paris?"},
            {"role": "assistant", "content": "Sunny."}]
    text = renderer(base_tok, "qwen").render(msgs, tools=TOOLS)
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n") and text.count("Be brief.") == 1
    assert "<tools>\n" + json.dumps(TOOLS[0], ensure_ascii=False) + "\n</tools>" in text
    for name in ("llama3", "gemma", "mistral"):
        ex = renderer(base_tok, name).encode(Conversation(msgs, tools=TOOLS))
        assert '"get_weather"' in decoded(base_tok, ex.input_ids) and trained_text(base_tok, ex).startswith("Sunny.")


def test_a_reply_the_generation_prompt_does_not_lead_to_is_a_problem_that_says_where(base_tok):
    """A template that turns thinking off (its generation prompt holds an empty think block), given a reply with
    reasoning: the reply cannot be what the model generates after that prompt."""
    tok = copy.deepcopy(base_tok)
    gen = "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
    assert gen in template_source("qwen")
    tok.chat_template = template_source("qwen").replace(gen, gen.replace("assistant\\n", "assistant\\n<think>\\n\\n"
                                                                          "</think>\\n\\n"))
    r = ChatRenderer(tok)
    plain = Conversation([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}])
    assert trained_text(tok, r.encode(plain)) == "a" + EOT
    (problem,) = r.encode_many([Conversation([{"role": "user", "content": "q"},
                                              {"role": "assistant", "content": "a", "reasoning_content": "r"}],
                                             "f.jsonl", 3)])
    assert problem.message == ("f.jsonl:3: turn 1: the chat template's generation prompt ends '\\n</think>\\n\\n' where "
                               "the reply starts 'r\\n</think>\\n\\na<|im_end|>\\n', so the reply cannot be located "
                               "exactly (a template that turns thinking off, given a reply with reasoning?); use a "
                               "template that renders this reply as it generates it (data.template=qwen for "
                               "reasoning data)")


def test_an_agent_turn_whose_replies_all_keep_their_reasoning_stays_one_sequence(base_tok):
    """Under the Qwen3-style template, replies after the last user message keep their reasoning: a conversation of
    one question, a tool round and the answer (both replies with reasoning) renders prefix-stably, so it trains as one
    sequence, although placeholder replies (without reasoning) would not."""
    call = {"type": "function", "function": {"name": "f", "arguments": {}}}
    conv = Conversation([{"role": "user", "content": "q"},
                         {"role": "assistant", "content": "", "reasoning_content": "r1", "tool_calls": [call]},
                         {"role": "tool", "content": "out"},
                         {"role": "assistant", "content": "a", "reasoning_content": "r2"}])
    (one,) = renderer(base_tok, "qwen").encode_sequences([conv])[0]
    assert trained_text(base_tok, one) == ('<think>\nr1\n</think>\n\n<tool_call>\n{"name": "f", "arguments": {}}\n'
                                           '</tool_call>' + EOT + "<think>\nr2\n</think>\n\na" + EOT)


def test_a_llama_factory_sharegpt_tool_record_trains_calls_and_replies_not_observations(base_tok):
    """A LLaMA-Factory ShareGPT record (function_call / observation turns, tools as JSON text) through the built-in
    qwen template: each sequence is transformers' rendering of the OpenAI form; what is trained is the reply as
    rendered when last (a call renders as its <tool_call> block), never a tool result."""
    from qflash.config import DatasetSpec
    from qflash.data.formats import normalize
    from qflash.data.readers import Record

    record = {"conversations": [
        {"from": "human", "value": "Weather in Paris?"},
        {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})},
        {"from": "observation", "value": "OBSERVED-sunny"},
        {"from": "gpt", "value": "Sunny in Paris."}],
        "tools": json.dumps([{"name": "get_weather", "description": "Weather of a city",
                              "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}])}
    conv = normalize(Record(record, "lf.json", 1), DatasetSpec(path="lf.json"), {})
    assert not isinstance(conv, list), conv
    (seqs,) = renderer(base_tok, "qwen").encode_sequences([conv])
    trained = "".join(trained_text(base_tok, ex) for ex in seqs)
    assert '"get_weather"' in trained and "Sunny in Paris." in trained
    assert "OBSERVED" not in trained
    full = base_tok.apply_chat_template(conv.messages, tokenize=False, chat_template=template_source("qwen"),
                                        tools=conv.tools)
    assert decoded(base_tok, seqs[-1].input_ids) == full and "OBSERVED-sunny" in full
