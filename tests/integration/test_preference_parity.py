"""Preference tuning against TRL (issue 25): on a tiny Qwen2 in fp32 on the CPU, `qflash train` with
train.objective dpo (sigmoid, ipo, hinge, and sigmoid + the chosen answers' NLL: rpo), orpo and simpo gives the per-step losses and LoRA gradients of TRL's
DPOTrainer / ORPOTrainer / CPOTrainer(simpo) with PEFT (tests/reference/trl_preference.py) within 1e-4 over 3
steps: the same pairs as qflash tokenized them, in qflash's order, from the same initial LoRA weights.

qflash packs each micro-batch's chosen and rejected sequences into one row (varlen attention is CUDA-only, so
here bins stacked under SDPA's block-diagonal mask); TRL pads them. The sequences' trailing template tokens
after the answer (unlabelled in qflash) are left out of TRL's completions: they cannot change an earlier
token's log-probability."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import tiny_config
from reference.trl_preference import trl_available, trl_run

pytestmark = pytest.mark.skipif(not trl_available(), reason="trl is not installed (test extra; Python >= 3.11)")

STEPS, MICRO = 3, 3
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QUESTIONS = ["What is rain?", "Name a prime number.", "How do bees talk?", "Why is the sea salty?",
             "What is a verb?", "How far is the moon?", "What do plants need?", "Who wrote Hamlet?",
             "What is two plus five?", "Why do we sleep?"]


def _pairs_file(path):
    rows = [{"prompt": q, "chosen": f"Ahoy! {q[:-1].split()[-1]} be a fine thing, matey.",
             "rejected": f"That is a good question about {q[:-1].split()[-1]}."} for q in QUESTIONS[:STEPS * MICRO]]
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


def _norm(name: str) -> str:
    return name.replace(".default.", ".")


def _qflash(model_dir, data, out, objective, extra, monkeypatch):
    from qflash.data.batching import SampleStream
    from qflash.train import distributed
    from qflash.train.loop import build_setup, run_training

    cfg = tiny_config(model_dir, data, out, "quant.mode=none", "lora.r=8", "lora.alpha=16", "lora.dropout=0.0",
                      f"train.micro_batch_size={MICRO}", f"train.max_steps={STEPS}", "train.schedule=constant",
                      "train.warmup_ratio=0", "train.max_grad_norm=0", "train.lr=2e-3", f"train.objective={objective}",
                      *extra)
    setup = build_setup(cfg, quiet=True)
    init = {n: p.detach().clone() for n, p in setup.model.named_parameters() if p.requires_grad}
    grads = []
    step = distributed.Parallel.step

    def capture(self, finite):
        grads.append({_norm(n): p.grad.detach().clone() for n, p in setup.model.named_parameters()
                      if p.requires_grad})
        return step(self, finite)

    monkeypatch.setattr(distributed.Parallel, "step", capture)
    result = run_training(setup, overwrite=True, quiet=True)
    stream = SampleStream(len(setup.examples), cfg.train.seed, MICRO)
    order = [i for s in range(STEPS) for i in stream.ids(s)]
    return setup, init, result.losses, grads, order


def _as_trl(pair):
    """(prompt, chosen answer, rejected answer) ids: the answer through its last labelled token."""
    p = pair.prompt_tokens

    def answer(ex):
        labelled = np.flatnonzero(np.asarray(ex.labels) != -100)
        assert labelled[0] == p  # the answer starts where the shared prompt ends
        return [int(t) for t in np.asarray(ex.input_ids)[p:labelled[-1] + 1]]

    return [int(t) for t in np.asarray(pair.chosen.input_ids)[:p]], answer(pair.chosen), answer(pair.rejected)


CASES = [("dpo", "sigmoid", 0.1), ("dpo", "ipo", 0.1), ("dpo", "hinge", 0.1), ("dpo", "sigmoid+sft", 0.1),
         ("orpo", None, 0.1), ("simpo", None, 2.0)]


@pytest.mark.parametrize("objective, loss_type, beta", CASES, ids=["dpo", "ipo", "hinge", "rpo", "orpo", "simpo"])
def test_losses_and_lora_gradients_match_trl(objective, loss_type, beta, tiny_models, tmp_path, monkeypatch):
    """rpo: pref.rpo_alpha=1 against TRL's loss_type [sigmoid, sft] (weights 1, 1)."""
    extra = [f"pref.loss_type={loss_type.split('+')[0]}"] if loss_type else []
    extra += ["pref.rpo_alpha=1.0"] if loss_type == "sigmoid+sft" else []
    extra += [f"pref.orpo_lambda={beta}"] if objective == "orpo" else [f"pref.beta={beta}"]
    data = _pairs_file(tmp_path / "pairs.json")
    setup, init, losses, grads, order = _qflash(tiny_models["qwen2"], data, tmp_path / "run", objective, extra,
                                                monkeypatch)
    trl = trl_run(str(tiny_models["qwen2"]), [_as_trl(setup.examples[i]) for i in order], objective, beta=beta,
                  loss_type=loss_type or "sigmoid", simpo_gamma=0.5, lora_r=8, lora_alpha=16,
                  target_modules=TARGETS, init_lora={_norm(n): t for n, t in init.items()}, steps=STEPS,
                  batch_size=MICRO, lr=2e-3)
    print(f"{objective} {loss_type or ''}: qflash {losses}\n   trl {trl['losses']}")
    assert len(losses) == len(trl["losses"]) == STEPS
    for ours, theirs in zip(losses, trl["losses"]):
        assert abs(ours - theirs) <= 1e-4 * max(1.0, abs(theirs)), (losses, trl["losses"])
    assert losses[-1] != pytest.approx(losses[0], rel=1e-3)  # the steps really train
    live = 0
    for step, (ours, theirs) in enumerate(zip(grads, trl["grads"])):
        theirs = {_norm(n): g for n, g in theirs.items()}
        assert ours.keys() == theirs.keys() and len(ours) == 2 * 7 * 2
        for name, g in theirs.items():
            norm = float(g.norm())
            if norm == 0.0:  # LoRA A at step 1: B starts at zero
                assert float(ours[name].norm()) == 0.0, (step, name)
                continue
            live += 1
            err = float((ours[name] - g).norm()) / norm
            assert err <= 1e-4, (step, name, err)
    assert live >= len(grads[0]) * (STEPS - 1)  # B from step 1, A from step 2 on
