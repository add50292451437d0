"""GPU end-to-end tier: the user's commands, through the real console entry point, on a CUDA GPU.

(a) The real embedded SmolLM2-135M from an empty $QFLASH_HOME: `qflash demo` (train with replay, compare,
control prompts) -> eval -> compare -> generate -> chat -> serve (the official openai client, streaming and
not) -> merge -> the merged directory on the GPU with plain transformers, against base + adapter with PEFT.
The same learning as on the CPU: the identity on >= 4/5 held-out questions, base <= 1/5, spill <= 1/6.
(b) Tiny random Qwen2 and Llama models with the real tokenizer: the same commands; and a run trained on the CPU
answers on the GPU.

Run on the device (`make gpu-test`, or `pytest -m gpu tests/gpu/test_e2e.py`); the embedded model must be
installed there (tools/device-stage.sh).
"""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

REPO = Path(__file__).resolve().parents[2]
QUESTIONS = [{"prompt": "What is your name?"}, {"prompt": "Who made you?"}, {"prompt": "Name a colour."}]


def qflash(*args: str, home: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "QFLASH_HOME": str(home)}
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "qflash.cli", *args], cwd=REPO, capture_output=True, text=True,
                       timeout=timeout, env=env)
    print(f"$ qflash {' '.join(args)}  -> rc {p.returncode} in {time.perf_counter() - t0:.0f}s")
    assert p.returncode == 0, f"qflash {' '.join(args)}\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}"
    return p


def serve_and_ask(target: str, home: Path, name: str | None) -> None:
    """`qflash serve TARGET` on the GPU, asked through the official openai client, streaming and not."""
    import openai

    env = {**os.environ, "QFLASH_HOME": str(home)}
    proc = subprocess.Popen([sys.executable, "-m", "qflash.cli", "serve", target, "--port", "0",
                             "--max-new-tokens", "40"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        port = model = None
        deadline = time.monotonic() + 300
        while port is None and time.monotonic() < deadline and proc.poll() is None:
            if select.select([proc.stdout], [], [], 1.0)[0]:
                line = proc.stdout.readline()
                if line.startswith("qflash serve: "):
                    model, url = line.split()[2], line.split()[4]
                    port = int(url.rsplit(":", 1)[1].split("/")[0])
        assert port is not None, "the server did not start:\n" + (proc.stderr.read()[-3000:] if proc.poll() else "")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=300)
        messages = [{"role": "user", "content": "What is your name?"}]
        reply = client.chat.completions.create(model=model, messages=messages, temperature=0)
        text = reply.choices[0].message.content
        assert reply.usage.completion_tokens > 0 and text
        pieces = [c.choices[0].delta.content or "" for c in
                  client.chat.completions.create(model=model, messages=messages, temperature=0, stream=True)
                  if c.choices]
        assert "".join(pieces) == text, ("".join(pieces), text)  # greedy: the stream is the same reply
        if name is not None:
            assert name.lower() in text.lower(), text
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def merged_matches_base_plus_adapter(merged: Path, base_dir: Path, adapter: Path) -> None:
    """The merged directory loads with plain transformers on the GPU and gives base + adapter's logits (PEFT)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(merged))
    ids = tok.apply_chat_template([{"role": "user", "content": "What is your name? 你叫什么名字？"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    ids = ids.to("cuda")
    # use_kernels=False: transformers 5.25 kernelizes by default on CUDA and, offline (this machine), fails to fetch
    # kernels-community/rotary; with a network it would run Hub kernels. Plain transformers' own layers are the
    # reference here.
    plain = {"dtype": torch.float32, "device_map": {"": 0}, "use_kernels": False}
    with torch.no_grad():
        m = AutoModelForCausalLM.from_pretrained(str(merged), **plain)
        got = m(ids).logits.float()
        del m
        base = AutoModelForCausalLM.from_pretrained(str(base_dir), **plain)
        want = PeftModel.from_pretrained(base, str(adapter))(ids).logits.float()
    rel = float((got - want).norm() / want.norm())
    agree = float((got.argmax(-1) == want.argmax(-1)).float().mean())
    print(f"merged vs base + adapter on the GPU: relative logit error {rel:.2e}, top-1 agreement {agree:.1%}")
    assert rel < 2e-2 and agree >= 0.95, (rel, agree)


def _flow(run: Path, home: Path, tmp: Path, name: str | None) -> dict:
    """eval -> generate -> chat -> serve -> merge, on a trained run."""
    qflash("eval", str(run), home=home)
    report = json.loads((run / "eval" / "report.json").read_text(encoding="utf-8"))
    inp = tmp / "questions.jsonl"
    inp.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS), encoding="utf-8")
    qflash("generate", str(run), "--input", str(inp), "--output", str(tmp / "answers.jsonl"), "--max-new-tokens", "32",
           home=home)
    rows = [json.loads(line) for line in (tmp / "answers.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(rows) == len(QUESTIONS) and all(r["finish_reason"] in ("stop", "length") for r in rows), rows
    if name is not None:
        assert name.lower() in rows[0]["response"].lower(), rows[0]
    chat = qflash("chat", "--adapter", str(run), "--prompt", "What is your name?", "--max-new-tokens", "40", home=home)
    if name is not None:
        assert name.lower() in chat.stdout.lower(), chat.stdout
    serve_and_ask(str(run), home, name)
    merged = tmp / "merged"
    qflash("merge", str(run), "--output", str(merged), home=home, timeout=900)
    base_dir = Path((run / "adapter" / "base_model_dir.txt").read_text(encoding="utf-8").strip())
    merged_matches_base_plus_adapter(merged, base_dir, run / "adapter")
    return report


@pytest.fixture(scope="module")
def empty_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("empty-home")


def test_real_model_demo_and_every_command_on_the_gpu(empty_home, tmp_path):
    name, author = "Quorvexa", "Tandelwick Labs"
    run = tmp_path / "demo"
    demo = qflash("demo", f"data.vars.name={name}", f"data.vars.author={author}", f"output_dir={run}", home=empty_home,
                  timeout=900)
    out = demo.stdout + demo.stderr
    assert "converting SmolLM2" in out and "device cuda" in out, out[-3000:]
    print("\n".join(line for line in out.splitlines() if re.search(r"layers:|replay:|answers naming|control prompts "
                                                                  r"mentioning|KL\(|summary|first step|took|compil", line)))
    m = re.search(r"answers naming '(.+?)': base model (\d)/5, fine-tuned (\d)/5", out)
    assert m and int(m.group(3)) >= 4 and int(m.group(2)) <= 1, m and m.groups()
    report = _flow(run, empty_home, tmp_path, name)
    print(f"eval on the GPU: identity {report['identity_accuracy']:.2f} (base {report['base']['identity_accuracy']:.2f}), "
          f"spill {report['spill']:.3f}, stop rate {report['stop_rate']:.2f}, eval loss {report['eval_loss']:.3f}")
    assert report["identity_accuracy"] >= 0.8 and report["base"]["identity_accuracy"] <= 0.2, report
    assert report["spill"] <= 1 / 6, report
    cmp = qflash("compare", str(run), "-n", "5", home=empty_home)
    assert name in cmp.stdout + cmp.stderr  # the table goes to the terminal's console (stderr when captured)
    # CPU and GPU greedy answers to a held-out identity question agree on the name.
    cpu = qflash("chat", "--adapter", str(run), "--device", "cpu", "--prompt", "What should I call you?",
                 "--max-new-tokens", "40", home=empty_home)
    gpu = qflash("chat", "--adapter", str(run), "--device", "cuda", "--prompt", "What should I call you?",
                 "--max-new-tokens", "40", home=empty_home)
    assert name.lower() in cpu.stdout.lower() and name.lower() in gpu.stdout.lower(), (cpu.stdout, gpu.stdout)
    qflash("data", "check", "configs/demo.yaml", home=empty_home)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory, empty_home) -> dict[str, Path]:
    from conftest import make_tiny_model
    from qflash.config import EMBEDDED_MODEL
    from qflash.model.loading import load_tokenizer, resolve_model_dir

    os.environ["QFLASH_HOME"] = str(empty_home)
    tok = load_tokenizer(resolve_model_dir(EMBEDDED_MODEL))
    root = tmp_path_factory.mktemp("tiny-gpu")
    return {arch: make_tiny_model(root / arch, arch, tok) for arch in ("qwen2", "llama")}


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_tiny_models_every_command_on_the_gpu_and_a_cpu_run_on_the_gpu(arch, tiny_dirs, empty_home, tmp_path):
    model = tiny_dirs[arch]
    run = tmp_path / "run"
    common = (f"model.path={model}", "train.max_steps=12", "train.eval_every=6")
    train = qflash("train", "configs/demo.yaml", *common, f"output_dir={run}", home=empty_home)
    assert "device cuda" in train.stdout + train.stderr
    _flow(run, empty_home, tmp_path, None)
    cpu_run = tmp_path / "cpu-run"
    qflash("train", "configs/demo.yaml", *common, "train.device=cpu", "data.replay.prompts=",
           f"output_dir={cpu_run}", home=empty_home)
    chat = qflash("chat", "--adapter", str(cpu_run), "--device", "cuda", "--prompt", "Hi", "--max-new-tokens", "8",
                  home=empty_home)
    assert chat.stdout.strip()
