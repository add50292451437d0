"""Preference pairs: formats, labels on the final answer only, the shared prompt, problems, too_long, eval split,
and each pipeline refusing the other's files."""

import copy
import json

import numpy as np
import pytest

from qflash.config import load_config
from qflash.data import template as template_module
from qflash.data.formats import Conversation
from qflash.data.pipeline import build_examples
from qflash.data.preference import PairExample, _shared_prompt, build_pairs, detect_pair_format
from qflash.data.template import CHATML, IGNORE, ChatRenderer, Example
from qflash.errors import ConfigError, DataError

EOT = "<|im_end|>"


@pytest.fixture(scope="module")
def renderer(smol_tokenizer):
    """train_on=assistant, as SFT configs have it: pairs must still be labelled on the final answer only."""
    return ChatRenderer(smol_tokenizer)


@pytest.fixture(scope="module")
def reference(smol_tokenizer):
    """A renderer of its own (not a twin of the one under test) labelling the last reply: the expected encoding."""
    return ChatRenderer(smol_tokenizer, train_on="last_assistant")


def data_cfg(path, *overrides, key="datasets"):
    return load_config(None, [f"data.{key}=[{json.dumps({'path': str(path)})}]", "data.cache=false",
                              *overrides]).data


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def decode(tok, ids):
    return tok.decode([int(i) for i in ids], skip_special_tokens=False, clean_up_tokenization_spaces=False)


def trained_text(tok, ex):
    return decode(tok, [i for i, label in zip(ex.input_ids, ex.labels) if label != IGNORE])


def trl(prompt, chosen, rejected, **more):
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, **more}


def msg(role, content):
    return {"role": role, "content": content}


# (record, pair format, the prompt's messages, chosen answer, rejected answer)
FORMATS = {
    "trl strings": (trl("What is 2+2?", "4", "5"), "prompt",
                    [msg("user", "What is 2+2?")], "4", "5"),
    "trl messages, multi-turn prompt, system key": (
        trl([msg("user", "Hi"), msg("assistant", "Hello! How can I help?"), msg("user", "Name a colour.")],
            [msg("assistant", "Blue.")], [msg("assistant", "I will not.")], system="Be brief."),
        "prompt",
        [msg("system", "Be brief."), msg("user", "Hi"), msg("assistant", "Hello! How can I help?"),
         msg("user", "Name a colour.")], "Blue.", "I will not."),
    "trl messages with system turn, content parts": (
        trl([msg("system", "You are terse."), msg("user", "Capital of France?")],
            [{"role": "assistant", "content": [{"type": "text", "text": "Paris"}]}], "Lyon"),
        "prompt", [msg("system", "You are terse."), msg("user", "Capital of France?")], "Paris", "Lyon"),
    "sharegpt": (
        {"conversations": [{"from": "human", "value": "你好"}, {"from": "gpt", "value": "你好！"},
                           {"from": "human", "value": "讲个笑话"}],
         "chosen": {"from": "gpt", "value": "好的：……"}, "rejected": {"from": "gpt", "value": "不要。"},
         "system": "You are {{name}}."},
        "sharegpt",
        [msg("system", "You are Zyxo."), msg("user", "你好"), msg("assistant", "你好！"), msg("user", "讲个笑话")],
        "好的：……", "不要。"),
    "alpaca": (
        {"instruction": "Add the numbers.", "input": "2 and 3", "chosen": "5", "rejected": "23",
         "history": [["Can you add?", "Yes."]]},
        "alpaca",
        [msg("user", "Can you add?"), msg("assistant", "Yes."), msg("user", "Add the numbers.\n\n2 and 3")], "5",
        "23"),
}


@pytest.mark.parametrize("train_on", ["assistant", "all"])
@pytest.mark.parametrize("name", list(FORMATS))
def test_each_format_is_detected_and_labelled_on_the_final_answer_only(name, train_on, tmp_path, renderer, reference,
                                                                       smol_tokenizer):
    record, fmt, prompt, chosen, rejected = FORMATS[name]
    assert detect_pair_format(record) == fmt
    p = write_jsonl(tmp_path / "pairs.jsonl", [record])
    (pair,), stats = build_pairs(data_cfg(p, "data.vars.name=Zyxo"), renderer.with_train_on(train_on))
    assert stats.formats == {fmt: 1} and stats.pairs == 1 and (pair.file, pair.line) == (str(p), 1)
    for ex, answer in ((pair.chosen, chosen), (pair.rejected, rejected)):
        expected = reference.encode(Conversation(prompt + [msg("assistant", answer)], str(p), 1))
        assert np.array_equal(ex.input_ids, expected.input_ids) and np.array_equal(ex.labels, expected.labels)
        assert trained_text(smol_tokenizer, ex) == answer + EOT
        labelled = np.flatnonzero(np.asarray(ex.labels) != IGNORE)
        assert labelled[0] == pair.prompt_tokens and (labelled == np.arange(labelled[0], labelled[-1] + 1)).all()
    assert np.array_equal(pair.chosen.input_ids[:pair.prompt_tokens], pair.rejected.input_ids[:pair.prompt_tokens])
    assert decode(smol_tokenizer, pair.chosen.input_ids[:pair.prompt_tokens]) == \
        reference.render(prompt, add_generation_prompt=True)
    assert stats.prompt_tokens == pair.prompt_tokens
    assert stats.tokens == len(pair.chosen.input_ids) + len(pair.rejected.input_ids) - pair.prompt_tokens
    assert stats.trained_tokens == pair.chosen.n_trained + pair.rejected.n_trained


def test_pairs_from_csv_and_a_single_record_json_file(tmp_path, renderer):
    csv = tmp_path / "pairs.csv"
    csv.write_text('prompt,chosen,rejected\n"Say hi, please",hi,no\n2+2?,4,5\n', encoding="utf-8")
    pairs, stats = build_pairs(data_cfg(csv), renderer)
    assert [x.line for x in pairs] == [2, 3] and stats.formats == {"prompt": 2}
    # The prompt is the object's one list of objects: still one record, not a container of records.
    one = tmp_path / "one.json"
    one.write_text(json.dumps(trl([msg("user", "2+2?")], "4", "5")), encoding="utf-8")
    (pair,), _ = build_pairs(data_cfg(one), renderer)
    assert pair.line == 1 and pair.chosen.n_trained == 2


def test_pairs_reuse_the_compiled_template(renderer, monkeypatch, tmp_path):
    def no_compiling(source):
        raise AssertionError("the chat template was compiled again")

    monkeypatch.setattr(template_module, "compile_template", no_compiling)
    twin = renderer.with_train_on("last_assistant")
    assert twin._compiled is renderer._compiled and renderer.train_on == "assistant"
    p = write_jsonl(tmp_path / "pairs.jsonl", [trl("q", "a", "b")])
    pairs, _ = build_pairs(data_cfg(p), renderer)
    assert len(pairs) == 1 and renderer.train_on == "assistant"


@pytest.fixture(scope="module")
def picky_renderer(smol_tokenizer):
    """ChatML that refuses a message containing FORBIDDEN (the probes do not), for template errors."""
    tok = copy.copy(smol_tokenizer)
    tok.chat_template = CHATML.replace(
        "{% for message in messages %}",
        "{% for message in messages %}{% if 'FORBIDDEN' in message['content'] %}"
        "{{ raise_exception('no forbidden words') }}{% endif %}")
    return ChatRenderer(tok)


GOOD = trl("q", "good", "bad")
# (record, field, reason, kind)
PROBLEMS = {
    "missing key": (trl("q", "a", None), "rejected", "missing", "missing content"),
    "missing prompt message list": ({"conversations": [{"from": "human", "value": "q"}],
                                     "chosen": {"from": "gpt", "value": "a"}},
                                    "rejected", "missing", "missing content"),
    "wrong type": (trl("q", 5, "b"), "chosen", "expected a string or a list of messages, got int", "wrong type"),
    "wrong type sharegpt": ({"conversations": [{"from": "human", "value": "q"}], "chosen": "a",
                             "rejected": {"from": "gpt", "value": "b"}},
                            "chosen", 'expected a message {"from": "gpt", "value": ...}, got str', "wrong type"),
    "empty answer": (trl("q", "a", "  \n"), "rejected", "empty", "empty content"),
    "empty answer alpaca": ({"instruction": "q", "chosen": "", "rejected": "b"}, "chosen", "empty", "empty content"),
    "identical answers": (trl("q", "same answer", " same answer\n"), "rejected",
                          "the same answer as chosen; a pair needs two different answers", "identical answers"),
    "prompt ends with an assistant turn": (
        trl([msg("user", "q"), msg("assistant", "a")], "x", "y"), "prompt.1.role",
        "the prompt must end with a user turn, the one the chosen and rejected answers reply to; it ends with an "
        "assistant turn", "wrong turn order"),
    "sharegpt prompt ends with gpt": (
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
         "chosen": {"from": "gpt", "value": "x"}, "rejected": {"from": "gpt", "value": "y"}},
        "conversations.1.from", "the prompt must end with a user turn", "wrong turn order"),
    "answer holding the prompt again": (
        trl("q", [msg("user", "q"), msg("assistant", "a")], [msg("assistant", "b")]), "chosen.0.role",
        "turn 0 of chosen: expected an assistant turn, got user", "wrong turn order"),
    "earlier answer turns differ": (
        trl("q", [msg("assistant", "a"), msg("user", "more?"), msg("assistant", "x")],
            [msg("assistant", "b"), msg("user", "more?"), msg("assistant", "y")]), "rejected",
        "the turns before its final answer differ from chosen's", "prompt mismatch"),
    "missing placeholder value": (trl("Who is {{author}}?", "a", "b"), "prompt",
                                  "placeholder {{author}} has no value; set data.vars.author=...",
                                  "missing placeholder value"),
    "template error": (trl("q", "fine", "FORBIDDEN"), "rejected",
                       "the chat template refuses this conversation: no forbidden words", "template mismatch"),
    "not a pair in a pair file": ({"messages": [msg("user", "q"), msg("assistant", "a")]}, "",
                                  "not a preference pair (keys: ['messages']); expected 'prompt'+'chosen'+'rejected' "
                                  "(TRL), or 'conversations'+'chosen'+'rejected' (ShareGPT), or "
                                  "'instruction'+'chosen'+'rejected' (Alpaca)", "unknown format"),
    "not an object": ('"just a string"', "", "expected a JSON object, got str", "not an object"),
}


@pytest.mark.parametrize("case", list(PROBLEMS))
def test_every_problem_names_file_line_field_and_is_settled_by_on_error(case, tmp_path, picky_renderer):
    record, fieldname, reason, kind = PROBLEMS[case]
    p = write_jsonl(tmp_path / "pairs.jsonl", [GOOD, record, GOOD])
    where = f"{p}:2: {fieldname}: " if fieldname else f"{p}:2: "
    with pytest.raises(DataError) as e:
        build_pairs(data_cfg(p), picky_renderer)
    head, *listed = str(e.value).splitlines()
    assert head.startswith(f"1 data problem(s) in 1 record(s) ({kind}: 1)")
    assert listed == [listed[0]] and listed[0].startswith(where + reason)

    skipped = tmp_path / "skipped.jsonl"
    pairs, stats = build_pairs(data_cfg(p, "data.on_error=skip"), picky_renderer, skipped_path=skipped)
    assert [x.line for x in pairs] == [1, 3] and stats.records == 3
    assert stats.skipped == 1 and stats.problems == {kind: 1} and stats.skipped_path == str(skipped)
    assert f"skipped 1 bad record(s) ({kind}: 1)" in stats.summary()
    (row,) = [json.loads(line) for line in skipped.read_text(encoding="utf-8").splitlines()]
    raw = json.loads(record) if isinstance(record, str) else record
    assert (row["line"], row["field"], row["kind"], row["record"]) == (2, fieldname, kind, raw)


def test_sequences_that_do_not_share_the_prompt_are_a_problem():
    def ex(ids, first_label):
        ids = np.asarray(ids)
        labels = np.where(np.arange(len(ids)) >= first_label, ids, IGNORE)
        return Example(ids, labels)

    class Conv:
        file, line, raw = "f.jsonl", 4, {"prompt": "q"}

    assert _shared_prompt(Conv, ex([1, 2, 3, 9], 2), ex([1, 2, 4], 2)) == 2
    for chosen, rejected in ((ex([1, 2, 3, 9], 2), ex([1, 2, 3, 4], 3)), (ex([1, 2, 3], 2), ex([1, 7, 4], 2))):
        problem = _shared_prompt(Conv, chosen, rejected)
        assert problem.kind == "prompt mismatch" and problem.message.startswith(
            "f.jsonl:4: the chosen and rejected sequences do not begin with the same prompt tokens")
    problem = _shared_prompt(Conv, ex([1, 2], 2), ex([1, 2, 4], 2))
    assert problem.message == "f.jsonl:4: chosen: no trained tokens after rendering; check the chat template"


LONG_PROMPT = " ".join(["context"] * 100)


SHORT, LONGER = "a short answer", "another, longer, answer here"


def long_pairs(tmp_path, chosen=SHORT, rejected=LONGER):
    return write_jsonl(tmp_path / "long.jsonl", [trl(LONG_PROMPT, chosen, rejected), trl("q", "a", "b")])


@pytest.mark.parametrize("chosen, rejected", [(SHORT, LONGER), (LONGER, SHORT)], ids=["rejected longer", "chosen longer"])
def test_too_long_truncate_cuts_the_start_of_both_prompts_alike(chosen, rejected, tmp_path, renderer, smol_tokenizer):
    p = long_pairs(tmp_path, chosen, rejected)
    (whole, _), _ = build_pairs(data_cfg(p, "data.max_len=2048"), renderer)
    (pair, short), stats = build_pairs(data_cfg(p, "data.max_len=40", "data.too_long=truncate"), renderer)
    assert stats.truncated == 1 and stats.dropped_too_long == 0 and "truncated the prompt of 1" in stats.summary()
    assert pair.longest == 40 and min(len(pair.chosen.input_ids), len(pair.rejected.input_ids)) < 40
    cut = whole.prompt_tokens - pair.prompt_tokens
    assert cut > 0 and np.array_equal(pair.chosen.input_ids[:pair.prompt_tokens],
                                      pair.rejected.input_ids[:pair.prompt_tokens])
    for got, full in ((pair.chosen, whole.chosen), (pair.rejected, whole.rejected)):
        end = int(np.flatnonzero(np.asarray(full.labels) != IGNORE)[-1]) + 1  # what follows the end-of-turn goes
        assert np.array_equal(got.input_ids, full.input_ids[cut:end]) and np.array_equal(got.labels, full.labels[cut:end])
    assert trained_text(smol_tokenizer, pair.chosen) == chosen + EOT
    assert trained_text(smol_tokenizer, pair.rejected) == rejected + EOT
    assert short.prompt_tokens == len(short.chosen.input_ids) - short.chosen.n_trained - 1  # untouched (ends "\n")


def test_too_long_truncate_drops_a_pair_whose_answer_alone_does_not_fit(tmp_path, renderer):
    p = write_jsonl(tmp_path / "long.jsonl", [trl("q", "fine", " ".join(["word"] * 60)), trl("q", "a", "b")])
    pairs, stats = build_pairs(data_cfg(p, "data.max_len=40", "data.too_long=truncate"), renderer,
                               skipped_path=tmp_path / "s.jsonl")
    assert [x.line for x in pairs] == [2] and stats.dropped_too_long == 1 and stats.answer_too_long == 1
    assert "dropped 1 longer than data.max_len, 1 of them because the answer alone does not fit" in stats.summary()
    row = json.loads((tmp_path / "s.jsonl").read_text(encoding="utf-8"))
    assert row["kind"] == "too long" and row["line"] == 1 and "its longer answer alone is" in row["reason"]


def test_too_long_drop_fail_and_split(tmp_path, renderer):
    p = long_pairs(tmp_path)
    pairs, stats = build_pairs(data_cfg(p, "data.max_len=40", "data.too_long=drop"), renderer,
                               skipped_path=tmp_path / "s.jsonl")
    assert [x.line for x in pairs] == [2] and stats.dropped_too_long == 1 and stats.answer_too_long == 0
    assert json.loads((tmp_path / "s.jsonl").read_text(encoding="utf-8"))["kind"] == "too long"
    with pytest.raises(DataError, match=rf"{p}:1: pair is \d+ tokens \(chosen\) and \d+ \(rejected\), \d+ of them the "
                       r"prompt: longer than data.max_len=40; raise data.max_len, or set data.too_long=truncate"):
        build_pairs(data_cfg(p, "data.max_len=40", "data.too_long=fail"), renderer)
    pairs, stats = build_pairs(data_cfg(p, "data.max_len=40", "data.on_error=skip"), renderer,
                               skipped_path=tmp_path / "s.jsonl")  # fail + skip: a problem, skipped as for SFT
    assert len(pairs) == 1 and stats.problems == {"too long": 1}
    with pytest.raises(ConfigError, match="data.too_long: split .* set data.too_long to truncate .*, drop or fail"):
        build_pairs(data_cfg(p, "data.too_long=split"), renderer)


def test_eval_ratio_split_is_seeded_and_complementary(tmp_path, renderer):
    p = write_jsonl(tmp_path / "d.jsonl", [trl(f"q{i}", f"a{i}", f"b{i}") for i in range(20)])
    cfg = data_cfg(p, "data.eval_ratio=0.25")
    train, stats = build_pairs(cfg, renderer, split="train", seed=7)
    evals, _ = build_pairs(cfg, renderer, split="eval", seed=7)
    assert len(train) == 15 and len(evals) == 5 and stats.held_out == 5 and "held out 5" in stats.summary()
    assert {x.line for x in train} | {x.line for x in evals} == set(range(1, 21))
    again, _ = build_pairs(cfg, renderer, split="eval", seed=7)
    assert [x.line for x in again] == [x.line for x in evals]
    other, _ = build_pairs(cfg, renderer, split="eval", seed=8)
    assert [x.line for x in other] != [x.line for x in evals]


def test_eval_datasets_and_weights(tmp_path, renderer):
    a = write_jsonl(tmp_path / "a.jsonl", [trl(f"q{i}", f"a{i}", f"b{i}") for i in range(4)])
    b = write_jsonl(tmp_path / "b.jsonl", [trl("held", "out", "in")])
    cfg = load_config(None, [f"data.datasets=[{{path: '{a}', weight: 2.5}}]", f"data.eval_datasets=[{{path: '{b}'}}]",
                             "data.cache=false"]).data
    train, stats = build_pairs(cfg, renderer)
    assert len(train) == 10 and stats.per_file == {str(a): 10} and all(isinstance(x, PairExample) for x in train)
    evals, _ = build_pairs(cfg, renderer, split="eval")
    assert [x.file for x in evals] == [str(b)]


PAIR_FILES = [trl("q", "a", "b"), FORMATS["sharegpt"][0], FORMATS["alpaca"][0]]


@pytest.mark.parametrize("record", PAIR_FILES, ids=["trl", "sharegpt", "alpaca"])
@pytest.mark.parametrize("on_error", ["fail", "skip"])
def test_a_pair_file_given_to_sft_says_to_set_the_objective(record, on_error, tmp_path, renderer):
    p = write_jsonl(tmp_path / "prefs.jsonl", [record, record])
    with pytest.raises(DataError) as e:
        build_examples(data_cfg(p, f"data.on_error={on_error}", "data.vars.name=Z"), renderer)
    assert str(e.value) == (f"{p}: holds preference pairs (chosen/rejected answers to a prompt), not conversations to "
                            "fine-tune on; to train on them set train.objective: dpo (or orpo, simpo)")


def test_sft_reads_what_it_read_before_beside_pair_keys(tmp_path, renderer):
    # A messages list beside chosen/rejected (UltraFeedback-style) and a columns mapping onto a pair's keys.
    both = {"messages": [msg("user", "q"), msg("assistant", "a")], "chosen": "a", "rejected": "b", "prompt": "q"}
    p = write_jsonl(tmp_path / "both.jsonl", [both])
    (ex,), _ = build_examples(data_cfg(p), renderer)
    assert ex.n_trained > 0
    q = write_jsonl(tmp_path / "trl.jsonl", [trl("q", "a", "b")])
    cfg = load_config(None, [f"data.datasets=[{{path: '{q}', columns: {{user: prompt, assistant: chosen}}}}]",
                             "data.cache=false"]).data
    (ex,), _ = build_examples(cfg, renderer)
    assert ex.n_trained > 0
    # One pair among conversations: a problem of that record, saying what it is.
    r = write_jsonl(tmp_path / "mixed.jsonl", [both, trl("q", "a", "b")])
    with pytest.raises(DataError, match=rf"{r}:2: a preference pair \(chosen/rejected\), not a conversation to "
                       "fine-tune on; train on pairs with train.objective: dpo"):
        build_examples(data_cfg(r), renderer)


def test_an_sft_file_given_to_pairs_names_the_keys_expected(tmp_path, renderer):
    expected = ("a pair record has 'prompt'+'chosen'+'rejected' (TRL), or 'conversations'+'chosen'+'rejected' "
                "(ShareGPT), or 'instruction'+'chosen'+'rejected' (Alpaca)")
    p = write_jsonl(tmp_path / "sft.jsonl", [{"conversations": [{"from": "human", "value": "q"},
                                                                {"from": "gpt", "value": "a"}]}])
    forced = load_config(None, [f"data.datasets=[{{path: '{p}', format: sharegpt}}]", "data.cache=false"]).data
    for cfg in (data_cfg(p, "data.on_error=skip"), forced):
        with pytest.raises(DataError) as e:
            build_pairs(cfg, renderer)
        assert str(e.value) == (f"{p}: holds conversations for supervised fine-tuning (sharegpt format), not "
                                f"preference pairs; {expected}")
    q = write_jsonl(tmp_path / "other.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError) as e:
        build_pairs(data_cfg(q), renderer)
    assert str(e.value) == f"{q}: no preference pairs in it (keys: ['answer', 'question']); {expected}"


def test_dataset_settings_that_do_not_apply_to_pairs(tmp_path, renderer):
    p = write_jsonl(tmp_path / "pairs.jsonl", [trl("q", "a", "b")])
    with pytest.raises(ConfigError, match=r"data.datasets\[0\].format: 'messages' is not a preference-pair format"):
        build_pairs(load_config(None, [f"data.datasets=[{{path: '{p}', format: messages}}]"]).data, renderer)
    with pytest.raises(ConfigError, match=r"data.datasets\[0\]: columns and prompt_template do not apply"):
        build_pairs(load_config(None, [f"data.datasets=[{{path: '{p}', columns: {{user: prompt, assistant: chosen}}}}]"]
                                ).data, renderer)


def test_no_pair_left_to_train_on_is_an_error_that_says_why(tmp_path, renderer):
    p = write_jsonl(tmp_path / "bad.jsonl", [trl("q", "same", "same"), trl("q", "a", "")])
    with pytest.raises(DataError, match=rf"data.datasets: no preference pairs to train on in {p}: 0 preference pairs "
                       r"from 2 records; .* skipped 2 bad record\(s\) \(identical answers: 1, empty content: 1\)"):
        build_pairs(data_cfg(p, "data.on_error=skip"), renderer, skipped_path=tmp_path / "s.jsonl")
