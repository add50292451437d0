"""Exact assistant-only labels: a property test over generated conversations, and the render paths."""

import copy

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
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


def renderer(tok, template=None, train_on="assistant") -> ChatRenderer:
    """One renderer per setting for the whole module (hypothesis calls the tests many times)."""
    key = (id(tok), template, train_on)
    if key not in _RENDERERS:
        _RENDERERS[key] = ChatRenderer(tok, template, train_on)
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

    with pytest.raises(DataError, match="unknown template"):
        ChatRenderer(smol_tokenizer, template=bad)


def test_offsets_fallback_for_tokenizers_whose_pieces_do_not_concatenate(smol_tokenizer):
    r = ChatRenderer(smol_tokenizer)
    r.split_exact = False  # as for a SentencePiece tokenizer that prefixes every piece with a space
    conv = Conversation([{"role": "user", "content": "q"}, {"role": "assistant", "content": "an answer"},
                         {"role": "user", "content": "again"}, {"role": "assistant", "content": "好的"}])
    assert trained_text(smol_tokenizer, r.encode(conv)) == "an answer" + EOT + "好的" + EOT
    r.train_on = "last_assistant"
    assert trained_text(smol_tokenizer, r.encode(conv)) == "好的" + EOT
