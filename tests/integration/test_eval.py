"""Replay + held-out loss during training, and `qflash eval` on a tiny trained run."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, tiny_config
from qflash.cli import main
from qflash.train.loop import build_setup, run_training


@pytest.fixture()
def files(tmp_path, identity_subset):
    heldout = json.loads((REPO / "data/demo/identity_heldout.json").read_text(encoding="utf-8"))[:4]
    (tmp_path / "heldout.json").write_text(json.dumps(heldout, ensure_ascii=False), encoding="utf-8")
    (tmp_path / "replay.json").write_text(json.dumps(["What is 2 + 2?", "Name a color.", "写一句话。"],
                                                     ensure_ascii=False), encoding="utf-8")
    (tmp_path / "control.json").write_text(json.dumps([{"prompt": "Say hi."}, {"prompt": "1 + 1?"}]), encoding="utf-8")
    return tmp_path


def _config(tiny_models, identity_subset, files, out, *extra):
    return tiny_config(
        tiny_models["qwen2"], identity_subset, out, "train.max_steps=4", "lora.dropout=0.1",
        f"data.eval_datasets=[{{path: '{files / 'heldout.json'}'}}]",
        f"data.replay.prompts={files / 'replay.json'}", "data.replay.max_new_tokens=6", "data.replay.ratio=0.5",
        f"eval.control_prompts={files / 'control.json'}", "eval.control_max_new_tokens=6", *extra,
    )


def _adapter(run):
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def test_replay_and_eval_every_train_reproducibly_and_resume_exactly(tiny_models, identity_subset, files, tmp_path):
    with_eval = _config(tiny_models, identity_subset, files, tmp_path / "a", "train.eval_every=2")
    setup = build_setup(with_eval, quiet=True)
    assert setup.replay is not None and setup.replay.samples == 8  # 16 identity samples x 0.5
    assert len(setup.examples) == 16 + 8 and len(setup.eval_examples) == 4
    assert setup.fingerprint["settings"]["replay"][-1] == setup.replay.digest
    result = run_training(setup, quiet=True)
    assert [s for s, _ in result.eval_losses] == [2, 4]
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval_loss" in r] == [2, 4]
    assert all(r["eval_loss"] > 0 for r in rows if "eval_loss" in r)

    # Held-out evaluation changes nothing in training (LoRA dropout draws random numbers here) ...
    no_eval = _config(tiny_models, identity_subset, files, tmp_path / "b")
    setup_b = build_setup(no_eval, quiet=True)
    assert setup_b.replay.from_cache, "the base model's answers were cached by the first run"
    run_training(setup_b, quiet=True)
    a, b = _adapter(tmp_path / "a"), _adapter(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)

    # ... and a run that died after its step-2 checkpoint resumes to the same adapter, with the same replay
    # samples (taken from the cache again).
    import shutil

    run_c = tmp_path / "c"
    crashed = _config(tiny_models, identity_subset, files, run_c, "train.eval_every=1", "train.save_every=1",
                      "train.keep=10")
    run_training(build_setup(crashed, quiet=True), quiet=True)
    for later in ("step-00000003", "step-00000004"):
        shutil.rmtree(run_c / "checkpoints" / later)
    shutil.rmtree(run_c / "adapter")
    resumed = run_training(build_setup(crashed, quiet=True), quiet=True)
    assert resumed.steps == 4 and resumed.losses and len(resumed.losses) == 2, "only steps 3 and 4 ran again"
    c = _adapter(run_c)
    assert all(torch.equal(a[k], c[k]) for k in a)
    rows = [json.loads(line) for line in (run_c / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4], "each step logged once"

    # A different replay mix is another run: resuming it is refused.
    from qflash.errors import ConfigError

    other = _config(tiny_models, identity_subset, files, run_c, "train.max_steps=6", "data.replay.ratio=1.0")
    with pytest.raises(ConfigError, match="data.replay.ratio"):
        run_training(build_setup(other, quiet=True), quiet=True)


def test_qflash_eval_writes_the_report(tiny_models, identity_subset, files, tmp_path, capsys):
    run = tmp_path / "run"
    cfg = _config(tiny_models, identity_subset, files, run, "train.eval_every=2")
    run_training(build_setup(cfg, quiet=True), quiet=True)

    assert main(["eval", str(run), "--max-new-tokens", "6"]) == 0
    report = json.loads((run / "eval" / "report.json").read_text(encoding="utf-8"))
    for side in (report, report["base"]):
        for key in ("eval_loss", "perplexity", "identity_accuracy", "stop_rate", "spill", "control_kl",
                    "control_agreement"):
            assert key in side
        assert side["eval_loss"] > 0 and side["perplexity"] == pytest.approx(math.exp(side["eval_loss"]))
        for key in ("identity_accuracy", "stop_rate", "spill", "control_agreement"):
            assert 0.0 <= side[key] <= 1.0
        assert side["control_kl"] >= 0
    assert report["base"]["control_kl"] == pytest.approx(0.0, abs=1e-6)
    assert report["base"]["control_agreement"] == 1.0
    assert report["control_kl"] > 0, "training moved the fine-tuned model away from the base"
    assert report["eval_loss"] < report["base"]["eval_loss"], "the fine-tune fits the held-out identity replies better"
    counts = report["counts"]
    assert counts["held_out_questions"] == counts["identity_questions"] == 4 and counts["control_prompts"] == 2
    assert report["settings"]["max_new_tokens"] == 6
    for name in ("report.md", "training.png", "answers.jsonl"):
        assert (run / "eval" / name).stat().st_size > 0
    assert len((run / "eval" / "answers.jsonl").read_text(encoding="utf-8").splitlines()) == 4 + 2
    out = capsys.readouterr().err
    assert "identity_accuracy" in out and "report.md" in out

    # The base model's answers are asked once; a second evaluation takes them from the cache.
    assert main(["eval", str(run), "--max-new-tokens", "6"]) == 0
    again = json.loads((run / "eval" / "report.json").read_text(encoding="utf-8"))
    assert again["settings"]["base_answers_cached"] == {"held_out": True, "control": True}
    assert again["base"] == report["base"]


def test_eval_errors_are_one_line(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("qflash: error: RUN_DIR:") and "no such directory" in err[0]
