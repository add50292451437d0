"""Replay of the base model's answers: prompts, the answer cache, examples, mixing, fingerprints."""

import json
from collections import Counter

import numpy as np
import pytest

from conftest import REPO
from qflash.config import DataConfig, ReplayConfig, load_config
from qflash.data.replay import (
    answers_key,
    build_replay,
    cached_answers,
    choose_replay,
    load_prompts,
    mix_count,
    replay_examples,
)
from qflash.data.template import IGNORE, ChatRenderer
from qflash.errors import DataError


@pytest.fixture(scope="module")
def renderer(smol_tokenizer):
    return ChatRenderer(smol_tokenizer)


def _write(path, obj):
    path.write_text(json.dumps(obj, ensure_ascii=False), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# Prompts


def test_prompts_in_every_shape_with_placeholders_and_system(tmp_path):
    f = _write(tmp_path / "p.json", [
        "Plain string prompt",
        {"prompt": "Tell {{name}} a joke."},
        {"prompt": "With its own system", "system": "Be terse."},
        {"instruction": "An alpaca record", "input": "", "output": "its reply is ignored"},
    ])
    prompts = load_prompts(f, {"name": "Zed"}, system="Default system.")
    msgs = [p.messages for p in prompts]
    assert msgs[0] == [{"role": "system", "content": "Default system."}, {"role": "user", "content": "Plain string prompt"}]
    assert msgs[1][-1] == {"role": "user", "content": "Tell Zed a joke."}
    assert msgs[2] == [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "With its own system"}]
    assert msgs[3][-1] == {"role": "user", "content": "An alpaca record"} and len(msgs[3]) == 2
    assert all(p.file == str(f) for p in prompts)


def test_shipped_prompt_files_are_english_and_chinese_and_do_not_overlap():
    general = [p.messages[-1]["content"] for p in load_prompts(REPO / "data/demo/general_prompts.json")]
    control = [p.messages[-1]["content"] for p in load_prompts(REPO / "data/demo/control_prompts.json")]
    for prompts in (general, control):
        assert any(p.isascii() for p in prompts) and any(not p.isascii() for p in prompts)
        assert len(set(prompts)) == len(prompts)
    assert not set(general) & set(control)


@pytest.mark.parametrize("records, message", [
    ([{"prompt": "ok"}, {"prompt": "x", "extra": 1}], "unknown key(s) ['extra']"),
    ([{"prompt": ""}], "'prompt' must be a non-empty string"),
    ([{"prompt": "Hi {{name}}"}], "placeholder {{name}} has no value"),
    ([], "no prompts in the file"),
])
def test_bad_prompts_name_the_file_and_what_to_do(tmp_path, records, message):
    f = _write(tmp_path / "bad.json", records)
    with pytest.raises(DataError) as e:
        load_prompts(f, {})
    assert message in str(e.value) and str(f) in str(e.value)


# ---------------------------------------------------------------------------------------------
# Answers -> examples


def _prompts(tmp_path, n=3):
    return load_prompts(_write(tmp_path / "p.json", [f"Question {i}?" for i in range(n)]))


def test_finished_answers_train_the_end_of_turn_unfinished_ones_do_not(tmp_path, renderer):
    prompts = _prompts(tmp_path)
    answers = [("A complete answer.", True), ("An answer cut at the limit", False), ("", True)]
    examples, stats = replay_examples(prompts, answers, renderer, max_len=256, unfinished="keep")
    assert (stats.stopped, stats.unfinished_kept, stats.empty) == (1, 1, 1)
    done, cut = examples
    trained = lambda ex: [int(t) for t, y in zip(ex.input_ids, ex.labels) if y != IGNORE]  # noqa: E731
    assert trained(done)[-1] == renderer.eot_id
    assert renderer.tok.decode(trained(done)[:-1]) == "A complete answer."
    assert renderer.eot_id not in trained(cut)
    assert renderer.tok.decode(trained(cut)) == "An answer cut at the limit"
    # The prompt never carries loss.
    assert renderer.tok.decode(trained(cut)).find("Question") == -1


def test_unfinished_drop_and_too_long_are_counted(tmp_path, renderer):
    prompts = _prompts(tmp_path)
    answers = [("short.", True), ("cut", False), ("word " * 300, True)]
    examples, stats = replay_examples(prompts, answers, renderer, max_len=64, unfinished="drop")
    assert len(examples) == 1
    assert (stats.stopped, stats.unfinished_dropped, stats.too_long) == (1, 1, 1)


# ---------------------------------------------------------------------------------------------
# Mixing


def test_ratio_gives_the_count_whole_repetitions_plus_a_seeded_subset():
    replay = list(range(7))  # stands for 7 examples
    assert mix_count(116, 1.0) == 116 and mix_count(116, 0.5) == 58 and mix_count(10, 0.01) == 1
    chosen = choose_replay(replay, 17, seed=3)
    counts = Counter(chosen)
    assert len(chosen) == 17
    assert all(counts[r] in (2, 3) for r in replay) and sum(c == 3 for c in counts.values()) == 3
    assert choose_replay(replay, 17, seed=3) == chosen
    subsets = {tuple(sorted(choose_replay(replay, 3, seed=s))) for s in range(10)}
    assert len(subsets) > 1, "the remainder depends on the seed"
    assert choose_replay(replay, 0, seed=1) == [] and choose_replay([], 5, seed=1) == []


# ---------------------------------------------------------------------------------------------
# The cache


def test_cache_miss_generates_in_batches_and_a_hit_generates_nothing(tmp_path):
    prompts = [[{"role": "user", "content": f"q{i}"}] for i in range(5)]
    calls = []

    def generate(batch):
        calls.append(len(batch))
        return [(f"answer to {m[-1]['content']}", i % 2 == 0) for i, m in enumerate(batch)]

    seen = []
    answers, hit = cached_answers("k1", prompts, generate, cache_dir=tmp_path, batch_size=2,
                                  progress=lambda d, t: seen.append((d, t)))
    assert not hit and calls == [2, 2, 1] and seen == [(0, 5), (2, 5), (4, 5), (5, 5)]
    assert answers[3] == ("answer to q3", False)
    again, hit = cached_answers("k1", prompts, generate, cache_dir=tmp_path, batch_size=2)
    assert hit and again == answers and calls == [2, 2, 1]
    assert [p.name for p in tmp_path.iterdir()] == ["k1.json"]


def test_a_broken_cache_entry_is_regenerated_and_a_failed_generation_leaves_nothing(tmp_path):
    prompts = [[{"role": "user", "content": "q"}]]
    (tmp_path / "k2.json").write_text("{not json", encoding="utf-8")
    answers, hit = cached_answers("k2", prompts, lambda b: [("fresh", True)] * len(b), cache_dir=tmp_path)
    assert not hit and answers == [("fresh", True)]

    def boom(batch):
        raise RuntimeError("killed mid-generation")

    with pytest.raises(RuntimeError):
        cached_answers("k3", prompts, boom, cache_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k2.json"]


def test_the_key_changes_with_everything_the_answers_depend_on():
    base = dict(model={"path": "/m", "config": "c", "weights": [["w.safetensors", 1, 2]]},
                quant=["nf4", True, "torch.float32", "fp32"], tokenizer="t", device="cpu",
                prompts=[[{"role": "user", "content": "q"}]], max_new_tokens=64)
    key = answers_key(**base)
    assert answers_key(**base) == key
    changes = {
        "model": {**base["model"], "weights": [["w.safetensors", 1, 3]]},
        "quant": ["none", True, "torch.float32", "fp32"],
        "tokenizer": "t2",
        "device": "cuda",
        "prompts": [[{"role": "user", "content": "q?"}]],
        "max_new_tokens": 65,
    }
    for field, value in changes.items():
        assert answers_key(**{**base, field: value}) != key, field


def test_build_replay_reports_cache_use_and_mixes_to_the_ratio(tmp_path, renderer):
    f = _write(tmp_path / "p.json", ["one?", "two?", "three?"])
    rp = ReplayConfig(prompts=str(f), ratio=2.0, max_new_tokens=8)
    gen_calls = []

    def generate(batch):
        gen_calls.append(len(batch))
        return [("Sure.", True) for _ in batch]

    kw = dict(n_train=4, seed=1, max_len=128, variables={}, renderer=renderer, key=lambda p: "kk",
              generate=generate, cache_dir=tmp_path / "cache")
    examples, stats = build_replay(rp, **kw)
    assert len(examples) == stats.samples == 8 and not stats.from_cache and gen_calls == [3]
    again, stats2 = build_replay(rp, **kw)
    assert stats2.from_cache and gen_calls == [3] and stats2.digest == stats.digest
    assert [np.asarray(e.input_ids).tolist() for e in again] == [np.asarray(e.input_ids).tolist() for e in examples]
    assert "from the cache" in stats2.summary(rp) and "mixed in as 8 samples" in stats2.summary(rp)


def test_nothing_usable_is_an_error_that_says_what_to_change(tmp_path, renderer):
    f = _write(tmp_path / "p.json", ["one?"])
    rp = ReplayConfig(prompts=str(f), unfinished="drop")
    with pytest.raises(DataError, match="raise data.replay.max_new_tokens"):
        build_replay(rp, n_train=4, seed=1, max_len=128, variables={}, renderer=renderer, key=lambda p: "kz",
                     generate=lambda b: [("never stops", False)] * len(b), cache_dir=tmp_path)


# ---------------------------------------------------------------------------------------------
# Fingerprint and resume identity


def test_fingerprint_and_resume_identity_change_with_replay(tmp_path, smol_tokenizer):
    from qflash.data.pipeline import data_fingerprint
    from qflash.train.resume import differences, run_identity

    prompts = _write(tmp_path / "p.json", ["one?"])
    data = [f"data.datasets=[{{path: '{REPO / 'data/demo/identity.json'}'}}]", "data.vars.name=A",
            "data.vars.author=B"]
    plain = load_config(None, data)
    with_replay = load_config(None, data + [f"data.replay.prompts={prompts}"])
    other_ratio = load_config(None, data + [f"data.replay.prompts={prompts}", "data.replay.ratio=0.25"])

    fp = lambda cfg, digest=None: data_fingerprint(cfg.data, smol_tokenizer, digest)["fingerprint"]  # noqa: E731
    assert "replay" not in data_fingerprint(plain.data, smol_tokenizer)["settings"]
    assert len({fp(plain), fp(with_replay, "d1"), fp(with_replay, "d2"), fp(other_ratio, "d1")}) == 4
    before = fp(with_replay, "d1")
    prompts.write_text(json.dumps(["one, changed?"]), encoding="utf-8")
    assert fp(with_replay, "d1") != before, "the prompts file's contents are part of it"

    ident = lambda cfg, digest: run_identity(cfg.to_dict(), data_fingerprint(cfg.data, smol_tokenizer, digest), {})  # noqa: E731
    diffs = differences(ident(with_replay, "d1"), ident(other_ratio, "d1"))
    assert any("data.replay.ratio" in d for d in diffs)
    assert any("data fingerprint" in d for d in differences(ident(with_replay, "d1"), ident(with_replay, "d2")))
    # How often the held-out loss is computed does not make it another run.
    evals = load_config(None, data + [f"data.replay.prompts={prompts}", "train.eval_every=5"])
    assert differences(ident(with_replay, "d1"), ident(evals, "d1")) == []


def test_replay_config_errors_name_the_key(tmp_path):
    from qflash.config import check_paths
    from qflash.errors import ConfigError

    with pytest.raises(ConfigError, match="data.replay.ratio must be > 0"):
        load_config(None, ["data.replay.ratio=0"])
    with pytest.raises(ConfigError, match="unknown key 'data.replay.prompt'"):
        load_config(None, ["data.replay.prompt=x"])
    cfg = load_config(None, [f"data.datasets=[{{path: '{REPO / 'data/demo/identity.json'}'}}]",
                             f"data.replay.prompts={tmp_path / 'missing.json'}"])
    with pytest.raises(ConfigError, match="data.replay.prompts: .*missing.json: file not found"):
        check_paths(cfg)
    assert DataConfig().replay.prompts == ""  # off unless asked for
