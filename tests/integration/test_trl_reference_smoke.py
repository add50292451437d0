"""The TRL reference (tests/reference/trl_preference.py) runs every preference objective on a tiny random Qwen2, and
its first-step losses match the math of bench/trl-preference-math.md recomputed here by hand from the model's
log-probs (policy: base + LoRA, DPO's reference: the adapter disabled)."""

import math
import random

import pytest
import torch
import torch.nn.functional as F

from conftest import make_tiny_model
from reference.trl_preference import trl_available, trl_run

pytestmark = pytest.mark.skipif(not trl_available(), reason="trl is not installed (test extra; Python >= 3.11)")

R, ALPHA, TARGETS = 4, 8.0, ["q_proj", "v_proj", "down_proj"]
STEPS, BATCH, LR = 2, 2, 1e-2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smol_tokenizer):
    model_dir = make_tiny_model(tmp_path_factory.mktemp("trl-ref") / "qwen2", "qwen2", smol_tokenizer)
    rng = random.Random(0)
    eos, vocab = smol_tokenizer.eos_token_id, len(smol_tokenizer)

    def ids(lo, hi):
        return [rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))]

    # completions end with EOS, as a caller's would; lengths differ so the batches are padded
    pairs = [(ids(3, 7), ids(2, 6) + [eos], ids(2, 6) + [eos]) for _ in range(6)]
    gen = torch.Generator().manual_seed(1)
    init = {name: torch.randn(p.shape, generator=gen) * 0.05 for name, p in _lora_params(_peft(model_dir, None))}
    return str(model_dir), pairs, init


def _peft(model_dir, init):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS,
                                             task_type="CAUSAL_LM"))
    if init is not None:
        with torch.no_grad():
            for name, p in _lora_params(model):
                p.copy_(init[name])
    return model.eval()


def _lora_params(model):
    return [(n, p) for n, p in model.named_parameters() if "lora_" in n]


def _token_logps(model, ids):
    """log p(ids[t] | ids[:t]) for t = 1 .. len-1, one unpadded sequence."""
    x = torch.tensor([ids])
    logits = model(input_ids=x).logits[0, :-1].float()
    return torch.log_softmax(logits, -1).gather(-1, x[0, 1:, None])[:, 0]


def _hand_loss(objective, loss_type, beta, gamma, model_dir, init, batch):
    """Step 1's loss (the mean over the batch's pairs), written from the md, not from TRL's code."""
    peft = _peft(model_dir, init)
    with torch.no_grad():
        def completion(model, prompt, comp):  # the completion's token log-probs: prompt not scored, EOS is
            return _token_logps(model, prompt + comp)[len(prompt) - 1:]

        if objective == "dpo":
            losses = []
            for prompt, chosen, rejected in batch:
                pc, pr = completion(peft, prompt, chosen).sum(), completion(peft, prompt, rejected).sum()
                with peft.disable_adapter():  # DPO's reference under PEFT: the base model
                    rc, rr = completion(peft, prompt, chosen).sum(), completion(peft, prompt, rejected).sum()
                delta = (pc - rc) - (pr - rr)
                if loss_type == "sigmoid":
                    losses.append(-F.logsigmoid(beta * delta))
                elif loss_type == "hinge":
                    losses.append(torch.relu(1 - beta * delta))
                else:  # ipo: each log-ratio averaged over its completion tokens
                    d = (pc - rc) / len(chosen) - (pr - rr) / len(rejected)
                    losses.append((d - 1 / (2 * beta)) ** 2)
            return float(torch.stack(losses).mean())
        avg_c = torch.stack([completion(peft, p, c).mean() for p, c, _ in batch])
        avg_r = torch.stack([completion(peft, p, r).mean() for p, _, r in batch])
        if objective == "simpo":
            return float((-F.logsigmoid(beta * (avg_c - avg_r) - gamma)).mean())
        # orpo: NLL over every token of prompt + chosen after the first, token-weighted over the batch
        nll_tokens = torch.cat([-_token_logps(peft, p + c) for p, c, _ in batch])
        log_odds = (avg_c - avg_r) - (torch.log1p(-avg_c.exp()) - torch.log1p(-avg_r.exp()))
        return float(nll_tokens.mean() - beta * F.logsigmoid(log_odds).mean())


CASES = [("dpo", "sigmoid", 0.1), ("dpo", "ipo", 0.1), ("dpo", "hinge", 0.1), ("orpo", None, 0.1), ("simpo", None, 2.0)]


@pytest.mark.parametrize("objective, loss_type, beta", CASES, ids=[c[1] and f"{c[0]}-{c[1]}" or c[0] for c in CASES])
def test_trl_reference_runs_and_matches_hand_math(tiny, objective, loss_type, beta):
    model_dir, pairs, init = tiny
    gamma = 0.5
    r = trl_run(model_dir, pairs, objective, beta=beta, loss_type=loss_type or "sigmoid", simpo_gamma=gamma,
                lora_r=R, lora_alpha=ALPHA, target_modules=TARGETS, init_lora=init, steps=STEPS, batch_size=BATCH,
                lr=LR)

    assert len(r["losses"]) == STEPS and all(math.isfinite(x) for x in r["losses"])
    assert sorted(r["lora_names"]) == sorted(init) and len(init) == 2 * 3 * 2  # A and B, 3 targets, 2 layers
    assert all(torch.equal(r["init_lora"][n], init[n]) for n in init)
    assert len(r["grads"]) == STEPS
    for step, grads in enumerate(r["grads"]):
        assert sorted(grads) == sorted(init)
        for name, g in grads.items():
            assert g.dtype == torch.float32 and torch.isfinite(g).all(), (step, name)
            assert g.abs().sum() > 0, f"step {step + 1}: zero gradient for {name}"
    assert len(r["metrics"]) == STEPS
    for loss, m in zip(r["losses"], r["metrics"]):
        assert m["loss"] == pytest.approx(loss, rel=1e-6)
        assert m["rewards/margins"] == pytest.approx(m["rewards/chosen"] - m["rewards/rejected"], abs=1e-5)
    assert r["losses"][1] != r["losses"][0]  # the optimizer step moved the adapter

    expected = _hand_loss(objective, loss_type, beta, gamma, model_dir, init, pairs[:BATCH])
    # 1e-5, relative where the loss is large (IPO with beta 0.1 starts near (1 / (2 beta))^2 = 25: fp32 rounding)
    assert abs(r["losses"][0] - expected) < 1e-5 * max(1.0, abs(expected)), (r["losses"][0], expected)


def test_dpo_sigmoid_with_zero_b_starts_at_log2(tiny):
    """PEFT's default init (B = 0): the policy is the reference, so every pair's loss is -log sigmoid(0) = log 2,
    and only the B matrices get a gradient at step 1. With the non-zero B of the test above it is not log 2."""
    model_dir, pairs, init = tiny
    r = trl_run(model_dir, pairs, "dpo", beta=0.1, lora_r=R, lora_alpha=ALPHA, target_modules=TARGETS,
                init_lora=None, steps=1, batch_size=BATCH, lr=LR)
    assert abs(r["losses"][0] - math.log(2)) < 1e-6
    assert all(not r["init_lora"][n].any() for n in r["init_lora"] if "lora_B" in n)
    grads = r["grads"][0]
    assert all(not g.any() for n, g in grads.items() if "lora_A" in n)
    assert all(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)
    assert r["metrics"][0]["rewards/margins"] == 0.0

    with_b = _hand_loss("dpo", "sigmoid", 0.1, None, model_dir, init, pairs[:BATCH])
    assert abs(with_b - math.log(2)) > 1e-3


def test_label_smoothing_is_refused_where_trl_ignores_it(tiny):
    model_dir, pairs, _ = tiny
    with pytest.raises(ValueError, match="ignores label_smoothing"):
        trl_run(model_dir, pairs, "dpo", beta=0.1, label_smoothing=0.1, lora_r=R, lora_alpha=ALPHA,
                target_modules=TARGETS, init_lora=None, steps=1, batch_size=BATCH, lr=LR)
