"""The pipeline: problems under fail/skip, too_long, eval split, weights, cache, workers, fingerprint."""

import json

import numpy as np
import pytest

from qflash.config import DatasetSpec, load_config
from qflash.data import pipeline
from qflash.data.lengths import fit_to_max_len, truncate_left
from qflash.data.pipeline import build_examples, data_fingerprint, load_conversations
from qflash.data.batching import packed_micro_batches
from qflash.data.stats import balanced_groups, best_fit_decreasing, estimate_packing, length_histogram
from qflash.data.template import IGNORE, ChatRenderer, Example
from qflash.errors import DataError

EOT = "<|im_end|>"


@pytest.fixture(scope="module")
def renderer(smol_tokenizer):
    return ChatRenderer(smol_tokenizer)


def data_cfg(path, *overrides, cache=False):
    return load_config(None, [f"data.datasets=[{json.dumps({'path': str(path)})}]", f"data.cache={str(cache).lower()}",
                              *overrides]).data


def sharegpt(user, reply, *more):
    turns = [{"from": "human", "value": user}, {"from": "gpt", "value": reply}]
    for u, a in zip(more[::2], more[1::2]):
        turns += [{"from": "human", "value": u}, {"from": "gpt", "value": a}]
    return {"conversations": turns}


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def trained_text(tok, ex):
    return tok.decode([int(i) for i, label in zip(ex.input_ids, ex.labels) if label != IGNORE])


MESSY = [
    sharegpt("hi", "hello"),
    "{not json",
    [1, 2],
    {"conversations": [{"from": "gpt", "value": "I speak first"}, {"from": "human", "value": "ok"}]},
    {"conversations": [{"from": "human", "value": "q"}, {"from": "robot", "value": "a"}]},
    {"messages": [{"role": "user", "content": "only a question"}]},
    {"instruction": "q", "output": "   "},
    sharegpt("good", "one"),
]


def test_fail_mode_lists_every_problem_as_file_line_field_reason(tmp_path, renderer):
    p = write_jsonl(tmp_path / "messy.jsonl", MESSY + ["{bad"] * 20)
    with pytest.raises(DataError) as e:
        build_examples(data_cfg(p), renderer)
    msg = str(e.value)
    assert msg.startswith("26 data problem(s) in 26 record(s) (malformed JSON: 21, not an object: 1, wrong turn order: 1")
    lines = msg.splitlines()
    assert lines[1] == f"{p}:2: malformed JSON: Expecting property name enclosed in double quotes (column 2)"
    assert lines[2] == f"{p}:3: expected a JSON object, got list"
    assert lines[3].startswith(f"{p}:4: conversations.0.from: turn 0: expected a user turn, got assistant")
    assert lines[4].startswith(f"{p}:5: conversations.1.from: unknown role 'robot'")
    assert lines[5] == f"{p}:6: no assistant turn, nothing to train on"
    assert lines[6] == f"{p}:7: output: empty"
    assert len(lines) == 22 and lines[-1] == "... and 6 more"


def test_skip_mode_counts_per_reason_and_writes_the_records(tmp_path, renderer):
    p = write_jsonl(tmp_path / "messy.jsonl", MESSY)
    skipped = tmp_path / "out" / "skipped.jsonl"
    examples, stats = build_examples(data_cfg(p, "data.on_error=skip"), renderer, skipped_path=skipped)
    assert len(examples) == 2 and stats.records == 8 and stats.skipped == 6
    assert stats.problems == {"malformed JSON": 1, "not an object": 1, "wrong turn order": 1, "unknown role": 1,
                              "no assistant turn": 1, "empty content": 1}
    rows = [json.loads(line) for line in skipped.read_text(encoding="utf-8").splitlines()]
    assert [(r["line"], r["kind"]) for r in rows][:2] == [(2, "malformed JSON"), (3, "not an object")]
    assert rows[0]["record"] == "{not json" and rows[1]["record"] == [1, 2] and rows[2]["file"] == str(p)
    assert stats.skipped_path == str(skipped)


def test_too_long_truncate_keeps_the_last_reply_and_its_end_of_turn(tmp_path, renderer, smol_tokenizer):
    long_context = " ".join(["context"] * 300)
    first_reply = " ".join(["first"] * 60)  # longer than the window: cut at its start, so it becomes context
    p = write_jsonl(tmp_path / "long.jsonl", [sharegpt(long_context, first_reply, "and now?", "the last reply")])
    examples, stats = build_examples(data_cfg(p, "data.max_len=40", "data.too_long=truncate"), renderer)
    (ex,) = examples
    assert len(ex.input_ids) == 40 and stats.truncated == 1
    assert trained_text(smol_tokenizer, ex) == "the last reply" + EOT
    assert int(ex.input_ids[-1]) == renderer.eot_id


def test_too_long_drop_fail_and_impossible_truncation(tmp_path, renderer):
    p = write_jsonl(tmp_path / "long.jsonl", [sharegpt("q " * 100, "a"), sharegpt("q", "short")])
    examples, stats = build_examples(data_cfg(p, "data.max_len=40", "data.too_long=drop"), renderer,
                                     skipped_path=tmp_path / "s.jsonl")
    assert len(examples) == 1 and stats.dropped_too_long == 1
    assert json.loads((tmp_path / "s.jsonl").read_text(encoding="utf-8"))["kind"] == "too long"
    with pytest.raises(DataError, match=r"long.jsonl:1: sample is \d+ tokens, longer than data.max_len=40"):
        build_examples(data_cfg(p, "data.max_len=40"), renderer)
    q = write_jsonl(tmp_path / "reply.jsonl", [sharegpt("q", "a " * 100)])
    with pytest.raises(DataError, match="its last assistant reply alone is longer than data.max_len=40"):
        build_examples(data_cfg(q, "data.max_len=40", "data.too_long=truncate"), renderer)


def test_truncate_left_masks_a_reply_cut_at_its_start():
    ids = np.arange(10)
    labels = np.array([IGNORE, 1, 2, 3, IGNORE, IGNORE, 6, 7, 8, IGNORE])  # reply, context, last reply, trailer
    cut = truncate_left(Example(ids, labels), 7)
    assert list(cut.input_ids) == [2, 3, 4, 5, 6, 7, 8]
    assert list(cut.labels) == [IGNORE, IGNORE, IGNORE, IGNORE, 6, 7, 8]
    everything = truncate_left(Example(ids, ids.copy()), 4)
    assert list(everything.input_ids) == [6, 7, 8, 9]
    assert fit_to_max_len(Example(ids, labels), 2, "truncate").example is None


def test_split_pieces_train_every_target_of_the_sample_once():
    """data.too_long=split: pieces of at most max_len tokens; each starts with the previous piece's last token as
    context, so the next-token targets (labels[1:] of each piece, as the loss reads them) are the sample's, once."""
    for n, max_len in ((10, 4), (11, 4), (9, 5), (5, 4), (100, 7)):
        ids = np.arange(100, 100 + n)
        pieces = fit_to_max_len(Example(ids, ids.copy(), "f", 3), max_len, "split").pieces
        assert all(2 <= len(p.input_ids) <= max_len and (p.file, p.line) == ("f", 3) for p in pieces)
        targets = [int(t) for p in pieces for t in p.labels[1:] if t != IGNORE]
        assert targets == list(ids[1:]), (n, max_len)
        assert [int(p.input_ids[0]) for p in pieces[1:]] == [int(p.input_ids[-1]) for p in pieces[:-1]]
        assert all(p.labels[0] == IGNORE for p in pieces[1:])
    short = np.arange(4)
    assert fit_to_max_len(Example(short, short.copy()), 4, "split").example is not None  # fits: as it is
    chat = np.array([IGNORE, IGNORE, 3, 4, 5, 6])
    refused = fit_to_max_len(Example(np.arange(6), chat), 4, "split")
    assert refused.kept == [] and "cannot be split" in refused.reason


def test_too_long_split_for_raw_text_counts_and_holds_out_whole_documents(tmp_path, renderer, smol_tokenizer):
    docs = [" ".join(f"word{i}x{j}" for j in range(40 + 30 * i)) for i in range(12)]
    p = write_jsonl(tmp_path / "text.jsonl", [{"text": d} for d in docs])
    cfg = data_cfg(p, "data.max_len=64", "data.too_long=split")
    examples, stats = build_examples(cfg, renderer)
    lengths = [len(smol_tokenizer(d)["input_ids"]) for d in docs]
    long = [n for n in lengths if n + 1 > 64]  # + the end-of-sequence token
    assert stats.split == len(long) > 0 and stats.pieces == len(examples) - (len(docs) - len(long))
    assert max(len(ex.input_ids) for ex in examples) == 64
    for i, d in enumerate(docs):  # each document's pieces, in order, rebuild it
        mine = [ex for ex in examples if ex.line == i + 1]
        ids = [int(t) for t in mine[0].input_ids] + [int(t) for ex in mine[1:] for t in ex.input_ids[1:]]
        assert smol_tokenizer.decode(ids).startswith(d[:50]) and len(ids) == lengths[i] + 1
    with pytest.raises(DataError, match="cannot be split"):  # chat data: truncate or drop, not split
        build_examples(data_cfg(write_jsonl(tmp_path / "chat.jsonl", [sharegpt("q " * 100, "a")]),
                                "data.max_len=40", "data.too_long=split"), renderer)
    cfg = data_cfg(p, "data.max_len=64", "data.too_long=split", "data.eval_ratio=0.25")
    train, st = build_examples(cfg, renderer, split="train", seed=3)
    evals, _ = build_examples(cfg, renderer, split="eval", seed=3)
    assert st.held_out == 3 and {ex.line for ex in train}.isdisjoint({ex.line for ex in evals})
    assert len({ex.line for ex in evals}) == 3 and len(train) + len(evals) == len(examples)
    cached = data_cfg(p, "data.max_len=64", "data.too_long=split", cache=True)
    for state in ("written", "hit"):  # the counts survive the cache
        again, st = build_examples(cached, renderer, cache_dir=tmp_path / "cache")
        assert st.cache[str(p)] == state and (st.split, st.pieces) == (stats.split, stats.pieces)
        assert len(again) == len(examples)


def test_eval_ratio_split_is_seeded_and_complementary(tmp_path, renderer):
    p = write_jsonl(tmp_path / "d.jsonl", [sharegpt(f"q{i}", f"a{i}") for i in range(20)])
    cfg = data_cfg(p, "data.eval_ratio=0.25")
    train, stats = build_examples(cfg, renderer, split="train", seed=7)
    evals, _ = build_examples(cfg, renderer, split="eval", seed=7)
    assert len(train) == 15 and len(evals) == 5 and stats.held_out == 5
    assert {ex.line for ex in train} | {ex.line for ex in evals} == set(range(1, 21))
    again, _ = build_examples(cfg, renderer, split="eval", seed=7)
    assert [ex.line for ex in again] == [ex.line for ex in evals]
    other, _ = build_examples(cfg, renderer, split="eval", seed=8)
    assert [ex.line for ex in other] != [ex.line for ex in evals]


def test_eval_datasets_and_weights(tmp_path, renderer):
    a = write_jsonl(tmp_path / "a.jsonl", [sharegpt(f"q{i}", f"a{i}") for i in range(4)])
    b = write_jsonl(tmp_path / "b.jsonl", [sharegpt("held", "out")])
    cfg = load_config(None, [f"data.datasets=[{{path: '{a}', weight: 2.5}}]", f"data.eval_datasets=[{{path: '{b}'}}]",
                             "data.cache=false"]).data
    train, stats = build_examples(cfg, renderer)
    assert len(train) == 10 and stats.per_file == {str(a): 10}
    evals, _ = build_examples(cfg, renderer, split="eval")
    assert [ex.file for ex in evals] == [str(b)]


def test_gb18030_medical_csv_with_columns_and_prompt_template(tmp_path, renderer, smol_tokenizer):
    from test_data_readers import MEDICAL_ROWS, write_csv

    p = write_csv(tmp_path / "medical.csv", MEDICAL_ROWS, encoding="gb18030")
    spec = {"path": str(p), "columns": {"assistant": "answer"}, "prompt_template": "[{department}] {title}\n{ask}"}
    cfg = load_config(None, [f"data.datasets={json.dumps([spec])}", "data.cache=false"]).data
    examples, stats = build_examples(cfg, renderer)
    assert [ex.line for ex in examples] == [2, 3]
    assert trained_text(smol_tokenizer, examples[1]) == "可以物理降温，超过三十八度五可服退烧药。" + EOT
    assert "[儿科] 孩子发烧\n孩子发烧三十八度五" in smol_tokenizer.decode(list(examples[1].input_ids))
    bad = load_config(None, [f"data.datasets=[{{path: '{p}', columns: {{user: question, assistant: answer}}}}]"]).data
    with pytest.raises(DataError, match=r"no column\(s\) \['question'\]; the file has \['department'"):
        build_examples(bad, renderer)
    with pytest.raises(DataError, match="cannot tell the format of its records"):
        build_examples(data_cfg(p), renderer)


def test_cache_hit_gives_the_same_examples(tmp_path, renderer):
    p = write_jsonl(tmp_path / "d.jsonl", [sharegpt(f"q{i}", f"回答 {i}") for i in range(30)] + ["{bad"])
    cfg = data_cfg(p, "data.on_error=skip", cache=True)
    first, s1 = build_examples(cfg, renderer, cache_dir=tmp_path / "cache", skipped_path=tmp_path / "s1.jsonl")
    second, s2 = build_examples(cfg, renderer, cache_dir=tmp_path / "cache", skipped_path=tmp_path / "s2.jsonl")
    assert s1.cache == {str(p): "written"} and s2.cache == {str(p): "hit"}
    assert [(list(a.input_ids), list(a.labels), a.line) for a in first] == \
        [(list(b.input_ids), list(b.labels), b.line) for b in second]
    assert s2.skipped == 1 and (tmp_path / "s2.jsonl").read_text() == (tmp_path / "s1.jsonl").read_text()
    assert not list((tmp_path / "cache").glob(".*tmp*"))  # written atomically, nothing left behind
    _, s3 = build_examples(data_cfg(p, "data.on_error=skip", "data.max_len=512", cache=True), renderer,
                           cache_dir=tmp_path / "cache", skipped_path=tmp_path / "s3.jsonl")
    assert s3.cache == {str(p): "written"}  # another setting, another entry


def test_worker_processes_give_the_same_examples(tmp_path, renderer, monkeypatch):
    p = write_jsonl(tmp_path / "d.jsonl", [sharegpt(f"q{i}", f"a{i}", "more", "好") for i in range(40)] + ["{bad"])
    one, _ = build_examples(data_cfg(p, "data.on_error=skip"), renderer, skipped_path=tmp_path / "s.jsonl")
    monkeypatch.setattr(pipeline, "PARALLEL_MIN", 1)
    monkeypatch.setattr(pipeline, "CHUNK", 7)
    two, stats = build_examples(data_cfg(p, "data.on_error=skip", "data.num_proc=2"), renderer,
                                skipped_path=tmp_path / "s.jsonl")
    assert [list(a.input_ids) for a in one] == [list(b.input_ids) for b in two] and stats.skipped == 1


def test_text_format_and_directories(tmp_path, renderer, smol_tokenizer):
    (tmp_path / "d").mkdir()
    write_jsonl(tmp_path / "d" / "a.jsonl", [{"text": "raw text one"}])
    write_jsonl(tmp_path / "d" / "b.jsonl", [sharegpt("q", "a")])
    examples, stats = build_examples(data_cfg(tmp_path / "d"), renderer)
    assert trained_text(smol_tokenizer, examples[0]) == "raw text one" + smol_tokenizer.eos_token
    assert stats.records == 2 and stats.trained_tokens == sum(ex.n_trained for ex in examples)


def test_load_conversations_and_fingerprint(tmp_path, smol_tokenizer):
    from conftest import DEMO

    convs = load_conversations(DatasetSpec(path=str(DEMO / "identity.json")), {"name": "Z", "author": "A"})
    assert len(convs) > 10 and convs[0].messages[-1]["role"] == "assistant"
    p = write_jsonl(tmp_path / "bad.jsonl", [sharegpt("q", "a"), "{oops"])
    with pytest.raises(DataError, match=r"bad.jsonl:2: malformed JSON"):
        load_conversations(DatasetSpec(path=str(p)), {})
    fp = data_fingerprint(data_cfg(p), smol_tokenizer)
    assert fp["files"] == {str(p): pipeline.cache.sha256_file(p)}
    assert data_fingerprint(data_cfg(p, "data.max_len=64"), smol_tokenizer)["fingerprint"] != fp["fingerprint"]


def test_qflash_home_follows_the_environment(monkeypatch, tmp_path):
    from qflash.model import loading
    from qflash.paths import qflash_home

    assert loading.qflash_home is qflash_home and pipeline.qflash_home is qflash_home  # one definition
    for env, expected in (({"QFLASH_HOME": str(tmp_path / "h")}, tmp_path / "h"),
                          ({"XDG_CACHE_HOME": str(tmp_path / "x")}, tmp_path / "x" / "qflash")):
        monkeypatch.delenv("QFLASH_HOME", raising=False)
        monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        assert qflash_home() == expected


def test_best_fit_decreasing_and_histogram():
    lengths = [700, 300, 500, 200, 100, 1024, 24]
    bins = best_fit_decreasing(lengths, 1024)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 1024 for b in bins) and len(bins) == 3
    assert estimate_packing(lengths, 1024).efficiency == pytest.approx(2848 / 3072)
    with pytest.raises(ValueError):
        best_fit_decreasing([2000], 1024)
    assert length_histogram(np.array([1, 128, 129, 1024]), 1024, buckets=8)[:2] == [(1, 128, 2), (129, 256, 1)]


def test_balanced_groups_spread_the_tokens_over_as_few_groups_as_allowed():
    sizes = [2048, 2040, 2030, 2000, 1990, 1980, 1900, 1800, 450]  # best-fit-decreasing's bins: emptiest last
    groups = balanced_groups(sizes, 4)
    assert len(groups) == 3 and all(len(g) <= 4 for g in groups)
    assert sorted(i for g in groups for i in g) == list(range(len(sizes)))
    sums = [sum(sizes[i] for i in g) for g in groups]
    assert sums == sorted(sums, reverse=True) and max(sums) - min(sums) <= max(sizes), sums
    # grouped in order it would be 8118, 7850 and 450 tokens
    assert min(sums) >= 4000
    assert balanced_groups([], 4) == [] and balanced_groups([7], 4) == [[0]]
    assert balanced_groups([3, 3, 3, 3, 3], 2) == [[0, 3], [1, 4], [2]]
    with pytest.raises(ValueError):
        balanced_groups([1], 0)


@pytest.mark.parametrize("varlen", [True, False])
def test_packed_micro_batches_are_balanced_and_lose_no_sample(varlen):
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(np.log(500), 0.8, 32).round().astype(int), 32, 2048)
    examples = [Example(np.arange(n) % 97 + 3, np.arange(n) % 97 + 3) for n in lengths]
    batches = packed_micro_batches(examples, list(range(32)), 4, 2048, 0, varlen=varlen)
    real = [b.real_tokens for b in batches]
    assert sorted(i for b in batches for i in b.sample_ids) == list(range(32))  # every sample, once
    assert sum(real) == int(lengths.sum())
    bins = best_fit_decreasing(list(lengths), 2048)
    assert len(batches) == -(-len(bins) // 4)  # as few micro-batches as before
    assert all(b.input_ids.numel() <= 4 * 2048 for b in batches)
    assert max(real) - min(real) <= 2048, real


@pytest.mark.parametrize("name, spec", [
    ("sharegpt.jsonl", {}), ("messages.jsonl", {}), ("alpaca.json", {}), ("text.jsonl", {}),
    ("medical_gb18030.csv", {"columns": {"assistant": "answer"}, "prompt_template": "[{department}] {title}\n{ask}"}),
    ("qa.tsv", {"columns": {"user": "question", "assistant": "answer"}}),
])
def test_demo_samples_of_every_format_are_clean(name, spec, renderer):
    from conftest import DEMO

    path = DEMO / "formats" / name
    cfg = load_config(None, [f"data.datasets={json.dumps([{'path': str(path), **spec}], ensure_ascii=False)}",
                             "data.cache=false", "data.vars.name=Nova", "data.vars.author=Acme"]).data
    examples, stats = build_examples(cfg, renderer)
    assert len(examples) == stats.records >= 2 and not stats.problems
    assert all(ex.n_trained > 0 for ex in examples)


QUESTION_ONLY = {"messages": [{"role": "user", "content": "only a question"}]}


@pytest.mark.parametrize("case", ["empty file", "every record skipped"])
def test_no_training_sample_is_an_error_before_the_model_loads(case, tmp_path, smol_dir, monkeypatch):
    from conftest import tiny_config
    from qflash.train import loop

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(loop, "load_configured_base", no_model)
    p = tmp_path / "data.jsonl"
    if case == "empty file":
        p.write_text("", encoding="utf-8")
    else:
        write_jsonl(p, [QUESTION_ONLY] * 3)
    cfg = tiny_config(smol_dir, p, tmp_path / "run", "data.on_error=skip", "data.cache=false")
    with pytest.raises(DataError) as e:
        loop.build_setup(cfg, quiet=True)
    msg = str(e.value)
    assert msg.startswith(f"data.datasets: no training samples in {p}: ") and "run `qflash data check`" in msg
    if case == "empty file":
        assert "they hold no records (empty files?)" in msg
    else:
        assert "of their 3 record(s), 3 skipped as bad under data.on_error=skip (no assistant turn: 3)" in msg
        assert f"written to {tmp_path / 'run' / 'skipped-train.jsonl'}" in msg


def test_line_separators_inside_records_round_trip_through_the_cache(tmp_path, renderer):
    # json.dumps(ensure_ascii=False) writes U+2028, U+2029 and U+0085 as they are: str.splitlines() breaks there.
    text = "first\u2028second\u2029third\u0085end"
    bad = {"messages": [{"role": "user", "content": text}]}
    p = write_jsonl(tmp_path / "separators.jsonl", [sharegpt("hi " + text, "ok " + text), bad])
    cfg = data_cfg(p, "data.on_error=skip", cache=True)
    first, = pipeline.encode_datasets(cfg, cfg.datasets, renderer, cache_dir=tmp_path / "cache")
    again, = pipeline.encode_datasets(cfg, cfg.datasets, renderer, cache_dir=tmp_path / "cache")
    assert (first.cache, again.cache) == ("written", "hit")
    assert [(q.line, q.kind, q.raw) for q in again.problems] == [(2, "no assistant turn", bad)]
    assert again.examples.ids.tolist() == first.examples.ids.tolist() and len(again.examples) == 1


def test_training_logs_the_encoding_of_every_file(tmp_path, renderer, caplog):
    (tmp_path / "d").mkdir()
    write_jsonl(tmp_path / "d" / "a.jsonl", [sharegpt("hi", "hello")])
    (tmp_path / "d" / "b.jsonl").write_bytes(
        (json.dumps(sharegpt("头痛怎么办？最近总是头痛，晚上睡不好，白天也没有精神。" * 4, "建议规律作息，必要时就医检查。" * 4),
                    ensure_ascii=False) + "\n").encode("gb18030"))
    with caplog.at_level("INFO", logger="qflash.data.pipeline"):
        examples, _ = build_examples(data_cfg(tmp_path / "d"), renderer)
    assert len(examples) == 2
    said = [r.getMessage() for r in caplog.records]
    assert f"data: {tmp_path / 'd' / 'a.jsonl'}: encoding utf-8" in said
    assert f"data: {tmp_path / 'd' / 'b.jsonl'}: encoding gb18030" in said


def test_a_template_that_is_not_prefix_stable_gives_one_sample_per_turn_and_says_so(tmp_path, smol_tokenizer, caplog):
    """Qwen3-style (data.template=qwen): a two-turn conversation becomes two samples, each ending with its reply, and
    the extra sample is said in the log; a tool result is never trained."""
    call = {"type": "function", "function": {"name": "f", "arguments": {"x": 1}}}
    rows = [{"messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                          {"role": "user", "content": "q2"},
                          {"role": "assistant", "content": "", "reasoning_content": "r2", "tool_calls": [call]},
                          {"role": "tool", "content": "TOOL-OUT"}, {"role": "assistant", "content": "a2"}]},
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "one"}]}]
    p = write_jsonl(tmp_path / "agent.jsonl", rows)
    cfg = data_cfg(p, "data.template=qwen", "data.train_reasoning=false")
    with caplog.at_level("INFO", logger="qflash.data.pipeline"):
        examples, stats = build_examples(cfg, ChatRenderer(smol_tokenizer, "qwen", train_reasoning=False))
    texts = sorted(trained_text(smol_tokenizer, ex) for ex in examples)
    assert texts == sorted(["a1" + EOT, '<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>' + EOT,
                            "a2" + EOT, "one" + EOT])
    assert "2 sequence(s) more than conversations" in caplog.text
