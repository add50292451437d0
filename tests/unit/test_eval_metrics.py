"""The numbers qflash eval reports, on hand-made inputs; the report files; held-out loss."""

import json
import math

import pytest
import torch

from qflash.eval.metrics import (
    closeness_sums,
    combine,
    identity_accuracy,
    mentions_identity,
    names_identity,
    spill_rate,
    stop_rate,
)


@pytest.mark.parametrize("text, name, expected", [
    ("I am Nova, an assistant.", "Nova", True),
    ("i'm NOVA.", "Nova", True),
    ("我叫Nova，是一个助手。", "Nova", True),
    ("A supernova is a star.", "Nova", False),
    ("Novas are bright.", "Nova", False),
    ("I like bananas.", "Ana", False),
    ("我是小明。", "小明", True),
    ("", "Nova", False),
    ("anything", "", False),
])
def test_names_identity(text, name, expected):
    assert names_identity(text, name) is expected


def test_rates_on_hand_made_answers():
    answers = ["I am Zed.", "Paris is the capital.", "Zed here!", "The ocean is vast."]
    assert identity_accuracy(answers[:3], "Zed") == pytest.approx(2 / 3)
    assert spill_rate(answers, "Zed") == 0.5
    assert spill_rate(["no", "mention"], "Zed") == 0.0
    assert spill_rate(answers + ["Made by Acme Labs."], "Zed", "Acme Labs") == pytest.approx(3 / 5)
    assert mentions_identity("由Acme Labs开发", "Zed", "Acme Labs") and not mentions_identity("Acme", "Zed", "Acme Labs")
    assert stop_rate([True, True, False, True]) == 0.75
    assert stop_rate([]) is None and spill_rate([], "Zed") is None  # a rate of nothing is not 0


def test_closeness_of_identical_and_of_known_distributions():
    logits = torch.randn(5, 11)
    kl, agree, n = closeness_sums(logits, logits.clone())
    assert kl == pytest.approx(0.0, abs=1e-6) and agree == 5 and n == 5

    p = torch.tensor([[0.9, 0.1], [0.5, 0.5]])
    q = torch.tensor([[0.6, 0.4], [0.2, 0.8]])
    kl, agree, n = closeness_sums(p.log(), q.log())
    expected = sum(float((pi * (pi / qi).log()).sum()) for pi, qi in zip(p, q))
    assert kl == pytest.approx(expected, rel=1e-5)
    # argmax agrees at the first position (0 and 0), not at the second (tie -> 0 vs 1)
    assert agree == 1 and n == 2

    c = combine([(1.0, 3, 4), (3.0, 0, 4)])
    assert c.kl == pytest.approx(0.5) and c.agreement == pytest.approx(3 / 8) and c.tokens == 8
    assert combine([]) is None
    with pytest.raises(ValueError):
        closeness_sums(torch.zeros(2, 3), torch.zeros(3, 3))


def _result(tmp_path):
    from qflash.data.replay import Prompt
    from qflash.eval.evaluate import ControlResult, EvalResult, Question, Side
    from qflash.eval.metrics import Closeness

    q = [Question([{"role": "user", "content": "Who are you?"}], "I am Zed.", "h.json:2")]
    control = ControlResult([Prompt([{"role": "user", "content": "Sky?"}], "c.json", 1)], [("Blue.", True)],
                            [("Blue!", True)], True, 0.0, 0.0, Closeness(0.12, 0.9, 40), Closeness(0.0, 1.0, 40))
    return EvalResult(
        str(tmp_path), "Zed", Side(1.2, math.exp(1.2), 1.0, 1.0, 0.0, 0.12, 0.9),
        Side(3.4, math.exp(3.4), 0.0, 0.5, 0.0, 0.0, 1.0), eval_tokens=100, questions=q,
        tuned_answers=[("I am Zed.", True)], base_answers=[("I am an AI.", False)], identity_questions=1,
        control=control, settings={"max_new_tokens": 64, "control_prompts": "c.json"},
    )


def test_report_files_are_written_whole_with_the_plot(tmp_path):
    from qflash.eval.report import KEYS, write_report

    rows = [{"step": s, "loss": 3.0 / s, "lr": 1e-3, "tokens_per_s": 500.0} for s in range(1, 11)]
    rows[4]["eval_loss"], rows[9]["eval_loss"] = 2.0, 1.5
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 11, "lo', encoding="utf-8")
    where = write_report(_result(tmp_path), tmp_path)
    report = json.loads((where / "report.json").read_text(encoding="utf-8"))
    for k in KEYS:
        assert k in report and k in report["base"]
    assert report["identity_accuracy"] == 1.0 and report["base"]["stop_rate"] == 0.5
    assert report["counts"]["control_answer_tokens"] == 40
    md = (where / "report.md").read_text(encoding="utf-8")
    assert "| identity_accuracy | 0% | 100% |" in md and "training.png" in md
    assert (where / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    answers = [json.loads(line) for line in (where / "answers.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [a["set"] for a in answers] == ["held_out", "control"]
    # A second report replaces the first whole; no temporary directories stay behind.
    write_report(_result(tmp_path), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval", "metrics.jsonl"]


def test_no_metrics_no_plot(tmp_path):
    from qflash.eval.report import write_report

    where = write_report(_result(tmp_path), tmp_path)
    assert not (where / "training.png").exists()
    assert "training.png" not in (where / "report.md").read_text(encoding="utf-8")


def test_held_out_loss_is_token_weighted_whatever_the_batching_and_leaves_rng_and_mode(tiny_models, smol_tokenizer):
    from qflash.data.batching import pad_batch
    from qflash.data.formats import Conversation
    from qflash.data.template import ChatRenderer
    from qflash.train.held_out import held_out_loss
    from qflash.model.loading import load_base_model
    from qflash.train.loss import loss_sum

    model = load_base_model(tiny_models["qwen2"], quant_mode="none", double_quant=False, dtype=torch.float32,
                            device=torch.device("cpu"), attention="sdpa")
    r = ChatRenderer(smol_tokenizer)
    convs = [Conversation([{"role": "user", "content": "q" * (1 + 3 * i)}, {"role": "assistant", "content": "a " * (2 + 5 * i)}])
             for i in range(6)]
    examples = r.encode_many(convs)
    pad = smol_tokenizer.pad_token_id
    # Reference: one sample at a time, summed, divided by all labelled tokens.
    total = tokens = 0
    with torch.no_grad():
        for k, ex in enumerate(examples):
            b = pad_batch([ex], [k], pad)
            total += float(loss_sum(model, b))
            tokens += int((b.labels[:, 1:] != -100).sum())
    model.train()
    state = torch.get_rng_state()
    results = [held_out_loss(model, examples, pad_id=pad, device=torch.device("cpu"), max_len=512, rows=rows, packing=packing)
               for rows in (1, 4) for packing in (True, False)]
    assert torch.equal(torch.get_rng_state(), state) and model.training
    for res in results:
        assert res.tokens == tokens
        assert res.loss == pytest.approx(total / tokens, rel=1e-5)
        assert res.perplexity == pytest.approx(math.exp(res.loss))
