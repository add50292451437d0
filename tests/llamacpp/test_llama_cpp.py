"""llama.cpp tier (`make llamacpp-test`; not in the default run): the demo run exported to GGUF and answered by
llama.cpp itself (llama-cpp-python, built from its sdist into .venv-llamacpp), through its chat API with the
chat template stored in the GGUF. No qflash code reads the file: the held-out identity questions must be
answered with the trained name (>= 4/5), each answer ending on the end-of-turn token before the length limit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.llamacpp

REPO = Path(__file__).resolve().parents[2]
ASK = r'''
import json, sys
from llama_cpp import Llama
path, questions = sys.argv[1], json.loads(sys.argv[2])
llm = Llama(model_path=path, n_ctx=1024, verbose=False)
out = []
for q in questions:
    r = llm.create_chat_completion(messages=[{"role": "user", "content": q}], max_tokens=96, temperature=0.0)
    out.append({"answer": r["choices"][0]["message"]["content"], "finish": r["choices"][0]["finish_reason"]})
print(json.dumps({"template": llm.metadata.get("tokenizer.chat_template", "")[:80], "answers": out}))
'''


def _llama_python() -> str:
    exe = os.environ.get("QFLASH_LLAMA_CPP_PYTHON") or str(REPO / ".venv-llamacpp" / "bin" / "python")
    if not Path(exe).is_file():
        pytest.fail(f"no llama-cpp-python interpreter at {exe}: run `make llamacpp-test` (it builds one)")
    return exe


def test_demo_gguf_answers_in_llama_cpp(tmp_path):
    name = "Quorvexa"
    run = tmp_path / "demo"
    env = {**os.environ, "QFLASH_HOME": os.environ.get("QFLASH_HOME", str(tmp_path / "home"))}
    subprocess.run([sys.executable, "-m", "qflash.cli", "train", "configs/demo.yaml", f"data.vars.name={name}",
                    "data.vars.author=Tandelwick Labs", f"output_dir={run}"], cwd=REPO, env=env, check=True)
    from qflash.config import load_config
    from qflash.export.gguf_export import _questions

    questions = _questions(load_config(REPO / "configs" / "demo.yaml", [f"data.vars.name={name}"]), n=5)
    assert len(questions) == 5
    for dtype in ("q8_0", "f16"):
        out = tmp_path / f"demo-{dtype}.gguf"
        subprocess.run([sys.executable, "-m", "qflash.cli", "export", str(run), "--dtype", dtype, "--output", str(out)],
                       cwd=REPO, env=env, check=True)
        p = subprocess.run([_llama_python(), "-c", ASK, str(out), json.dumps(questions)], capture_output=True,
                           text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        result = json.loads(p.stdout.strip().splitlines()[-1])
        answers = result["answers"]
        print(dtype, json.dumps(answers, ensure_ascii=False, indent=1))
        named = sum(name.lower() in a["answer"].lower() for a in answers)
        assert named >= 4, (dtype, answers)
        assert all(a["finish"] == "stop" for a in answers), (dtype, answers)
