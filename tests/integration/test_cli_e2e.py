"""The real console entry point, as a user runs it."""

import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def qflash(*args: str, timeout: int = 900, home: Path | None = None) -> subprocess.CompletedProcess:
    """`home`: the command's $QFLASH_HOME (default: the test session's, which shares converted models)."""
    env = None if home is None else {**os.environ, "QFLASH_HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-m", "qflash.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
        env=env,
    )


def test_bad_config_is_one_line_without_traceback(tmp_path):
    p = qflash("train", "configs/demo.yaml", "lora.rank=8", f"output_dir={tmp_path}")
    assert p.returncode == 2
    assert "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert lines == ["qflash: error: command line 'lora.rank=8': unknown key 'lora.rank': did you mean 'lora.r'?"]


def _fresh_name(seed: int) -> str:
    """A pronounceable name made at run time, so it is written nowhere in the repository."""
    rng = random.Random(seed)
    syll = ["ka", "zu", "mer", "vol", "tri", "an", "quo", "bel", "dra", "nix", "oth", "ul"]
    return "".join(rng.choice(syll) for _ in range(3)).capitalize() + rng.choice(["a", "on", "is", "ek"])


@pytest.mark.slow
def test_demo_teaches_a_new_name_and_chat_uses_it(tmp_path):
    """From an empty $QFLASH_HOME, as every new user starts: the embedded model is converted, the replay answers
    generated, then the same model trains (a warm cache once hid a crash that every fresh machine hit)."""
    name, author = _fresh_name(7), _fresh_name(8) + " Labs"
    out, home = tmp_path / "demo", tmp_path / "empty-home"
    t0 = time.perf_counter()
    p = qflash("demo", f"data.vars.name={name}", f"data.vars.author={author}", f"output_dir={out}", home=home)
    elapsed = time.perf_counter() - t0
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "converting SmolLM2" in p.stdout + p.stderr and "generated in" in p.stdout + p.stderr, "a cold cache"
    m = re.search(r"answers naming '(.+?)': base model (\d)/5, fine-tuned (\d)/5", p.stdout + p.stderr)
    assert m and m.group(1) == name
    base, tuned = int(m.group(2)), int(m.group(3))
    assert tuned >= 4 and base == 0, (base, tuned)
    # Spill: the identity must stay out of answers to general questions outside the training data.
    spill = re.search(r"control prompts mentioning '(.+?)' or '(.+?)': base model (\d+)/(\d+), fine-tuned (\d+)/(\d+)",
                      p.stdout + p.stderr)
    assert spill and spill.groups()[:2] == (name, author)
    n, tuned_spill = int(spill.group(6)), int(spill.group(5))
    assert n >= 12 and tuned_spill <= n / 6, (tuned_spill, n)
    assert re.search(r"KL\(base\|\|fine-tuned\) [\d.]+ nats/token, top-1 agreement \d+%", p.stdout + p.stderr)
    assert elapsed < 12 * 60
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert len(evals) >= 2 and evals[-1] < evals[0], "held-out loss is logged and goes down"

    # qflash eval on the demo run (issue 7's acceptance): every held-out identity question, stop rate,
    # control prompts; the base model side by side.
    ev = qflash("eval", str(out), home=home)
    assert ev.returncode == 0, ev.stderr[-3000:]
    report = json.loads((out / "eval" / "report.json").read_text(encoding="utf-8"))
    assert report["identity_accuracy"] >= 0.8 and report["base"]["identity_accuracy"] <= 0.2, report
    assert report["stop_rate"] >= 0.95, report
    assert report["spill"] <= 1 / 6, report
    assert (out / "eval" / "report.md").is_file() and (out / "eval" / "training.png").is_file()

    chat = qflash("chat", "--adapter", str(out), "--prompt", "What is your name?", "--max-new-tokens", "40",
                  home=home)
    assert chat.returncode == 0, chat.stderr[-2000:]
    assert name.lower() in chat.stdout.lower()
