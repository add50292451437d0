"""`qflash data check` / `qflash data preview` as library calls and through the CLI."""

import io
import json

import pytest
from rich.console import Console

from qflash.data import commands
from qflash.data.commands import parse_columns, run_check, run_preview, sample_text
from qflash.data.template import ChatRenderer
from qflash.errors import ConfigError

from test_data_pipeline import MESSY, sharegpt, write_jsonl


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch, smol_dir):
    monkeypatch.setattr(commands, "default_cache_dir", lambda: tmp_path / "data-cache")


def captured():
    return Console(file=io.StringIO(), width=200, highlight=False, soft_wrap=True)


def output(console):
    return console.file.getvalue()


def test_check_clean_file_prints_statistics_and_exits_0(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [sharegpt(f"q{i}", f"answer {i}") for i in range(12)])
    c = captured()
    assert run_check(str(p), ["data.max_len=128"], console=c) == 0
    text = output(c)
    for expected in ("12 records -> 12 samples", "tokens", "trained", "median", "packing", "bins of 128 tokens",
                     "ok: 12 samples ready"):
        assert expected in text, text


def test_check_fail_lists_problems_and_exits_2(tmp_path):
    p = write_jsonl(tmp_path / "messy.jsonl", MESSY)
    c = captured()
    assert run_check(str(p), [], console=c) == 2
    text = output(c)
    assert f"{p}:4: conversations.0.from: turn 0: expected a user turn, got assistant" in text
    assert "problems 6 (" in text and "not usable" in text and "--on-error skip" in text


def test_check_skip_writes_skipped_records_and_exits_0(tmp_path):
    p = write_jsonl(tmp_path / "messy.jsonl", MESSY)
    skipped = tmp_path / "skipped.jsonl"
    c = captured()
    assert run_check(str(p), [], on_error="skip", skipped=str(skipped), console=c) == 0
    assert "skipped 6 records (" in output(c) and str(skipped) in output(c)
    assert len(skipped.read_text(encoding="utf-8").splitlines()) == 6


def test_check_columns_and_format_flags_and_config_source(tmp_path):
    p = tmp_path / "qa.csv"
    p.write_text("ask,answer\nq1,a1\nq2,a2\n", encoding="utf-8")
    c = captured()
    assert run_check(str(p), [], columns="user=ask,assistant=answer", console=c) == 0
    assert "2 records -> 2 samples" in output(c)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"data:\n  datasets:\n    - path: {p}\n      columns: {{user: ask, assistant: answer}}\n"
                   "  max_len: 64\n", encoding="utf-8")
    c = captured()
    assert run_check(str(cfg), ["data.train_on=last_assistant"], console=c) == 0
    assert "train_on last_assistant" in output(c) and "bins of 64 tokens" in output(c)
    with pytest.raises(ConfigError, match="--format: unknown format 'csv'"):
        run_check(str(p), [], fmt="csv")
    with pytest.raises(ConfigError, match="--columns: 'user' is not role=column"):
        parse_columns("user,assistant=answer")


def test_preview_highlights_trained_tokens(tmp_path, smol_tokenizer):
    p = write_jsonl(tmp_path / "d.jsonl", ["{bad", sharegpt("Who are you?", "I am Zyxo."), sharegpt("x", "y")])
    c = captured()
    assert run_preview(str(p), [], n=1, console=c) == 0
    text = output(c)
    assert "sample 1" in text and "I am Zyxo.<|im_end|>" in text and "Who are you?" in text
    assert "1 had problems (malformed JSON: 1)" in text
    r = ChatRenderer(smol_tokenizer)
    from qflash.data.formats import Conversation

    rendered = sample_text(smol_tokenizer, r.encode(Conversation(
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": "reply"}])))
    trained = [rendered.plain[s.start:s.end] for s in rendered.spans if s.style == "bold green"]
    assert trained == ["reply<|im_end|>"]


def test_cli_exit_codes(tmp_path, capsys):
    from qflash.cli import main

    good = write_jsonl(tmp_path / "good.jsonl", [sharegpt("q", "a")])
    bad = write_jsonl(tmp_path / "bad.jsonl", MESSY)
    assert main(["data", "check", str(good)]) == 0
    assert main(["data", "check", str(bad)]) == 2
    assert main(["data", "check", str(bad), "--on-error", "skip", "--skipped", str(tmp_path / "s.jsonl")]) == 0
    assert main(["data", "preview", str(good), "-n", "1"]) == 0
    assert main(["data", "check", str(tmp_path / "missing.jsonl")]) == 2
    assert "no such data file" in capsys.readouterr().err
    assert json.loads((tmp_path / "s.jsonl").read_text(encoding="utf-8").splitlines()[0])["line"] == 2


def test_training_reuses_what_check_cached(tmp_path, smol_tokenizer):
    from qflash.config import load_config
    from qflash.data.pipeline import build_examples

    p = write_jsonl(tmp_path / "d.jsonl", [sharegpt(f"q{i}", f"a{i}") for i in range(5)])
    assert run_check(str(p), [], console=captured()) == 0
    cfg = load_config(None, [f"data.datasets=[{{path: '{p}'}}]"])
    _, stats = build_examples(cfg.data, ChatRenderer(smol_tokenizer), cache_dir=tmp_path / "data-cache")
    assert stats.cache == {str(p): "hit"}


def test_check_with_every_record_skipped_is_not_usable(tmp_path):
    p = write_jsonl(tmp_path / "questions.jsonl", [{"messages": [{"role": "user", "content": "only a question"}]}] * 2)
    c = captured()
    assert run_check(str(p), [], on_error="skip", skipped=str(tmp_path / "s.jsonl"), console=c) == 2
    assert "not usable: no samples" in output(c) and "no usable samples" in output(c)


def test_check_shows_the_encoding_of_each_file(tmp_path):
    from test_data_encodings import ZH_HANT, rows, write_csv

    (tmp_path / "d").mkdir()
    write_csv(tmp_path / "d" / "zh.csv", rows(ZH_HANT), "big5")
    (tmp_path / "d" / "en.csv").write_text("id,question,answer\n1,hi,hello\n", encoding="utf-8")
    c = captured()
    assert run_check(str(tmp_path / "d"), [], columns="user=question,assistant=answer", console=c) == 0
    assert f"{tmp_path / 'd' / 'zh.csv'}: encoding big5 (cp950)" in output(c)
    assert f"{tmp_path / 'd' / 'en.csv'}: encoding utf-8" in output(c)


def test_preview_shows_each_turn_of_a_template_that_is_not_prefix_stable(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"conversations": [
        {"from": "human", "value": "q1"}, {"from": "gpt", "value": "first answer"},
        {"from": "human", "value": "q2"}, {"from": "gpt", "value": "second answer"}]}])
    c = captured()
    assert run_preview(str(p), ["data.template=qwen"], n=5, console=c) == 0
    text = output(c)
    assert "turn 1 of 2" in text and "turn 2 of 2" in text and "shown 2 of the first 1 records" in text
