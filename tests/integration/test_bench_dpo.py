"""The CPU twin of `qflash bench --workload dpo --against trl`: both sides run their DPO steps on a tiny model in fp32
(the GPU bench runs the same functions on a random-weight 7B in NF4/bf16). What it holds: both start from the same
policy == reference (loss ln 2, the adapter's B at zero), both train every pair once per step (their first-step
losses agree), the reference is scored once by both with `trl` and never by TRL's per-step recipe, and the numbers the
bench reports are filled."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import make_tiny_model
from qflash.bench import preference as bp
from reference.trl_preference import trl_available


@pytest.fixture(scope="module")
def tiny_pairs(tmp_path_factory, smol_tokenizer):
    model_dir = make_tiny_model(tmp_path_factory.mktemp("bench-dpo") / "qwen2", "qwen2", smol_tokenizer)
    rng = np.random.default_rng(0)
    vocab = len(smol_tokenizer)
    triples = [(rng.integers(3, vocab, int(rng.integers(3, 9))), rng.integers(3, vocab, int(rng.integers(2, 7))),
                rng.integers(3, vocab, int(rng.integers(2, 7)))) for _ in range(8)]
    return model_dir, triples


def test_workload_pairs_fit_the_bench_capacity():
    triples = bp.workload_pairs(152064)
    assert len(triples) == bp.PAIRS_PER_STEP
    assert all(len(p) + max(len(c), len(r)) <= bp.CAPACITY for p, c, r in triples)
    assert bp.sequence_tokens(triples) == sum(2 * len(p) + len(c) + len(r) for p, c, r in triples)
    ex = bp.pair_examples(triples[:1])[0]
    assert ex.prompt_tokens == len(triples[0][0]) and ex.chosen.n_trained == len(triples[0][1])


def test_qflash_dpo_steps_on_cpu(tiny_pairs):
    from qflash.bench.common import QFLASH_OVERRIDES

    model_dir, triples = tiny_pairs
    QFLASH_OVERRIDES[:] = ["lora.fused=false"]
    try:
        m = bp.qflash_dpo(model_dir, triples, warmup=1, steps=2, device=torch.device("cpu"), lr=1e-2)
        assert QFLASH_OVERRIDES == ["lora.fused=false"]  # dpo's objective does not leak into later workloads
    finally:
        QFLASH_OVERRIDES[:] = []
    assert len(m.losses) == 3 and len(m.warmup_s) == 1
    assert m.losses[0] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference at the start
    assert m.losses[-1] < m.losses[0]  # the same pairs each step: DPO pulls them apart
    assert m.reference_s is not None and m.reference_s > 0
    assert m.pairs_per_s == pytest.approx(len(triples) / m.step_s)
    assert m.epoch_pairs_per_s == pytest.approx(len(triples) / (m.step_s + m.reference_s))


@pytest.mark.skipif(not trl_available(), reason="trl is not installed (test extra; Python >= 3.11)")
@pytest.mark.parametrize("recipe", bp.TRL_RECIPES)
def test_trl_dpo_steps_on_cpu(tiny_pairs, recipe):
    model_dir, triples = tiny_pairs
    m = bp.trl_dpo(model_dir, triples, warmup=1, steps=2, recipe=recipe, device=torch.device("cpu"), lr=1e-2)
    assert len(m.losses) == 3 and len(m.warmup_s) == 1 and m.step_s > 0
    assert m.losses[0] == pytest.approx(math.log(2), abs=1e-5)  # all 8 pairs in the step, each weighted 1/8
    assert m.losses[-1] < m.losses[0]
    assert (m.reference_s is not None) == (recipe == "trl")  # precomputed once, or a forward in every step
    assert (m.epoch_pairs_per_s is not None) == (recipe == "trl")


def test_unknown_recipe_or_workload_names_the_choices(tmp_path):
    from qflash.bench.runner import run_bench

    kw = dict(steps=1, warmup=0, dropout=0.0, attention="auto", out_dir=tmp_path, parity_steps=0, cache=tmp_path)
    with pytest.raises(SystemExit, match="trl-per-step"):
        run_bench("qwen2.5-0.5b", ["dpo"], against="trl,unsloth-dpo", **kw)
    with pytest.raises(SystemExit, match="fixed, varlen, maxlen, dpo"):
        run_bench("qwen2.5-0.5b", ["orpo"], against=None, **kw)
