"""`qflash eval` on a preference run: preference_accuracy, preference_margin and likelihood_accuracy equal the same
numbers computed independently from plain transformers + PEFT (the saved adapter loaded onto the fp32 base, one
unpacked forward per sequence), and report.json carries them."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from conftest import tiny_config

QUESTIONS = [f"Question {k}: what is {k} plus {k + 1}?" for k in range(12)]


def _pairs(path, questions):
    rows = [{"prompt": q, "chosen": f"Ahoy! It be {2 * k + 1}, matey.", "rejected": f"The sum is {2 * k + 1}."}
            for k, q in enumerate(questions)]
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


def _answer_logps(model, pairs) -> torch.Tensor:
    """(pairs, 2) summed log-probabilities of each answer's labelled tokens, one sequence at a time."""
    out = torch.zeros(len(pairs), 2, dtype=torch.float64)
    with torch.no_grad():
        for i, p in enumerate(pairs):
            for j, ex in enumerate((p.chosen, p.rejected)):
                ids = torch.as_tensor(np.asarray(ex.input_ids))[None]
                labels = torch.as_tensor(np.asarray(ex.labels))
                logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
                at = (labels[1:] != -100).nonzero().squeeze(1)
                out[i, j] = logp[at, labels[1:][at]].sum()
    return out


def test_eval_of_a_dpo_run_matches_plain_peft(tiny_models, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qflash.data.preference import build_pairs
    from qflash.eval.evaluate import evaluate_run
    from qflash.eval.report import write_report
    from qflash.train.loop import build_setup, run_training

    train = _pairs(tmp_path / "train.json", QUESTIONS[:8])
    held = _pairs(tmp_path / "held.json", QUESTIONS[8:])
    run = tmp_path / "run"
    cfg = tiny_config(tiny_models["qwen2"], train, run, "quant.mode=none", "train.objective=dpo", "train.max_steps=4",
                      "train.lr=2e-2", "lora.dropout=0.0")
    setup = build_setup(cfg, quiet=True)
    run_training(setup, quiet=True)

    result = evaluate_run(run, data=[str(held)])
    assert result.preference_pairs == 4 and result.preference_start == "the base model"
    pairs, _ = build_pairs(setup.cfg.data.__class__(eval_datasets=[type(cfg.data.datasets[0])(path=str(held))]),
                           setup.renderer, split="eval")
    base = AutoModelForCausalLM.from_pretrained(str(tiny_models["qwen2"]), dtype=torch.float32, use_kernels=False)
    model = PeftModel.from_pretrained(base, str(run / "adapter")).eval()
    tuned = _answer_logps(model, pairs)
    with model.disable_adapter():
        start = _answer_logps(model, pairs)
    gain = tuned - start
    assert gain.abs().max() > 1e-3  # the adapter moved the log-probabilities
    n = torch.tensor([[np.count_nonzero(np.asarray(e.labels) != -100) for e in (p.chosen, p.rejected)] for p in pairs])
    likes = lambda lp: float(((lp[:, 0] / n[:, 0]) > (lp[:, 1] / n[:, 1])).double().mean())  # noqa: E731
    assert result.tuned.preference_margin == pytest.approx(float((gain[:, 0] - gain[:, 1]).mean()), abs=1e-4)
    assert result.tuned.preference_accuracy == float((gain[:, 0] > gain[:, 1]).double().mean())
    assert result.tuned.likelihood_accuracy == likes(tuned)
    assert result.base.likelihood_accuracy == likes(start)

    report = json.loads((write_report(result, run) / "report.json").read_text(encoding="utf-8"))
    assert report["preference_accuracy"] == result.tuned.preference_accuracy
    assert report["preference_margin"] == result.tuned.preference_margin
    assert report["counts"]["preference_pairs"] == 4


@pytest.mark.parametrize("objective", ["dpo", "simpo"])
def test_held_out_pairs_during_training(objective, tiny_models, tmp_path):
    """train.eval_every under a preference objective: the held-out pairs' loss and reward metrics land in
    metrics.jsonl at the due steps; they change nothing training computes (same losses as without); and for dpo the
    last step's held-out reward accuracy and margin are `qflash eval`'s preference_accuracy and beta x
    preference_margin (a separate code path: the saved adapter loaded again, the base as the start)."""
    from qflash.eval.evaluate import evaluate_run
    from qflash.train.loop import build_setup, run_training
    from qflash.train.preference import EVAL_REFERENCE_FILE

    train = _pairs(tmp_path / "train.json", QUESTIONS[:8])
    held = _pairs(tmp_path / "held.json", QUESTIONS[8:])
    common = ("quant.mode=none", f"train.objective={objective}", "train.max_steps=4", "train.lr=2e-2",
              "train.micro_batch_size=3", f"data.eval_datasets=[{{path: '{held}'}}]")
    runs = {}
    for name, extra in (("plain", ()), ("evaluated", ("train.eval_every=2",))):
        setup = build_setup(tiny_config(tiny_models["qwen2"], train, tmp_path / name, *common, *extra), quiet=True)
        runs[name] = run_training(setup, quiet=True)
    assert runs["evaluated"].losses == runs["plain"].losses  # evaluating moved nothing (RNG, weights, mode)
    assert [s for s, _ in runs["evaluated"].eval_losses] == [2, 4]
    lines = [json.loads(x) for x in (tmp_path / "evaluated" / "metrics.jsonl").read_text().splitlines()]
    evals = [x for x in lines if "eval_loss" in x]
    assert [x["step"] for x in evals] == [2, 4]
    assert all(math.isfinite(x["eval_loss"]) and 0.0 <= x["eval_rewards/accuracy"] <= 1.0 for x in evals)
    assert evals[-1]["eval_rewards/margin"] > evals[0]["eval_rewards/margin"]  # the held-out pairs pull apart too
    if objective == "simpo":
        assert not (tmp_path / "evaluated" / EVAL_REFERENCE_FILE).exists()  # no reference: none scored
        return
    assert (tmp_path / "evaluated" / EVAL_REFERENCE_FILE).is_file()
    result = evaluate_run(tmp_path / "evaluated", data=[str(held)])
    assert evals[-1]["eval_rewards/accuracy"] == pytest.approx(result.tuned.preference_accuracy, abs=1e-9)
    assert evals[-1]["eval_rewards/margin"] == pytest.approx(0.1 * result.tuned.preference_margin, rel=1e-4, abs=1e-6)
