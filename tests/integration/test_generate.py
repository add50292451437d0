"""qflash generate: batched JSONL generation, resumable, equal to one-by-one greedy generation."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qflash.errors import DataError

REPO = Path(__file__).resolve().parents[2]

PROMPTS = [
    {"prompt": "Hi"},
    {"id": "long", "prompt": "Tell me, in as much detail as you can manage, how bread is baked at home, step by step."},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]},
    {"id": 17, "prompt": "请用中文介绍一下你自己。"},
    {"messages": [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "Blue."},
                  {"role": "user", "content": "Another one?"}]},
    {"prompt": "Why is the sky blue?"},
    {"id": "x", "prompt": "ok"},
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def engine(tiny_models):
    from qflash.infer.engine import Engine
    from qflash.infer.generate import load_target

    return Engine(load_target(str(tiny_models["qwen2"]), device="cpu", quant="none"))


class Loads:
    """load_engine for run_generate that counts how often the model is asked for."""

    def __init__(self, engine):
        self.engine, self.calls = engine, 0

    def __call__(self):
        self.calls += 1
        return self.engine


def test_batched_output_equals_one_by_one_greedy(engine, tmp_path):
    from qflash.infer.batch import read_requests, run_generate
    from qflash.infer.options import SamplingOptions

    src = write_jsonl(tmp_path / "in.jsonl", PROMPTS)
    out = tmp_path / "out.jsonl"
    opts = SamplingOptions(max_new_tokens=8)
    summary = run_generate(Loads(engine), src, out, opts, batch_size=3)
    rows = read_jsonl(out)
    assert summary.answered == len(PROMPTS) and summary.skipped == 0
    # ids: given ones kept as given (string or integer), the line number otherwise
    assert sorted(map(json.dumps, (r["id"] for r in rows))) == sorted(
        map(json.dumps, [1, "long", 3, 17, 5, 6, "x"]))
    by_id = {json.dumps(r["id"]): r for r in rows}
    # written longest prompt first: the batches hold prompts of similar length
    assert [r["prompt_tokens"] for r in rows] == sorted((r["prompt_tokens"] for r in rows), reverse=True)
    for req in read_requests(src):
        row = by_id[req.key]
        assert {k: row[k] for k in ("prompt", "messages") if k in row} == req.source
        ids = engine.prompt_ids(req.messages)
        single = engine.complete(ids, opts)  # unbatched, no padding
        assert row["response"] == single.text, req.id
        assert row["finish_reason"] == single.finish_reason
        assert row["prompt_tokens"] == len(ids) and row["completion_tokens"] == single.completion_tokens
        assert 1 <= row["completion_tokens"] <= 8
    assert summary.tokens == sum(r["completion_tokens"] for r in rows)
    assert summary.finish["stop"] + summary.finish["length"] == len(PROMPTS)


def test_resume_after_cut_off_line_skips_answered_ids(engine, tmp_path, caplog):
    from qflash.infer.batch import run_generate
    from qflash.infer.options import SamplingOptions

    src = write_jsonl(tmp_path / "in.jsonl", PROMPTS)
    out = tmp_path / "out.jsonl"
    opts = SamplingOptions(max_new_tokens=6)
    run_generate(Loads(engine), src, out, opts, batch_size=2)
    full = read_jsonl(out)
    lines = out.read_text(encoding="utf-8").splitlines(keepends=True)
    # What a run killed while writing its 4th line leaves behind: 3 lines, then half of one.
    out.write_text("".join(lines[:3]) + lines[3][: len(lines[3]) // 2], encoding="utf-8")

    loads = Loads(engine)
    with caplog.at_level(logging.WARNING, logger="qflash.infer.batch"):
        summary = run_generate(loads, src, out, opts, batch_size=2)
    assert "last line was cut off" in caplog.text
    assert (summary.skipped, summary.answered, loads.calls) == (3, len(PROMPTS) - 3, 1)
    rows = read_jsonl(out)
    assert out.read_text(encoding="utf-8").splitlines(keepends=True)[:3] == lines[:3]  # kept untouched
    assert len(rows) == len(PROMPTS)
    key = lambda r: json.dumps(r["id"])  # noqa: E731
    assert sorted(rows, key=key) == sorted(full, key=key)  # the same answers as the uninterrupted run

    again = Loads(engine)
    summary = run_generate(again, src, out, opts, batch_size=2)
    assert (summary.answered, summary.skipped, again.calls) == (0, len(PROMPTS), 0)  # nothing to do: no model load


def test_killed_process_resumes(tiny_models, tmp_path):
    """A real `qflash generate` killed with SIGKILL mid-run; running it again finishes the job."""
    n = 20
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"Count to {i}, please."} for i in range(n)])
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "qflash.cli", "generate", str(tiny_models["qwen2"]), "--device", "cpu",
           "--input", str(src), "--output", str(out), "--max-new-tokens", "16"]
    proc = subprocess.Popen([*cmd, "--batch-size", "1"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= 3:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be killed:\n" + proc.communicate()[0][-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    data = out.read_bytes()
    done = data.count(b"\n")
    assert 3 <= done < n

    p = subprocess.run([*cmd, "--batch-size", "8"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"resuming: {done} of {n} prompts already answered" in p.stderr
    assert f"answered {n - done} prompts ({done} skipped: already answered)" in p.stderr
    assert "tok/s" in p.stderr
    rows = read_jsonl(out)
    assert sorted(r["id"] for r in rows) == list(range(1, n + 1))  # each prompt exactly once
    assert out.read_bytes().startswith(data[: data.rfind(b"\n") + 1])


@pytest.mark.parametrize(("lines", "message"), [
    (['{"prompt": "a"}', '{"prompt": "b"'], "in.jsonl:2: not valid JSON"),
    (['{"prompt": "a"}', '["a"]'], "in.jsonl:2: expected a JSON object"),
    (['{"prompt": "a", "messages": []}'], 'in.jsonl:1: both "prompt" and "messages"'),
    (['{"text": "a"}'], 'in.jsonl:1: neither "prompt" and "messages"'),
    (['{"prompt": ""}'], "in.jsonl:1: prompt: expected a non-empty string"),
    (['{"prompt": "a"}', '', '{"messages": [{"role": "robot", "content": "x"}]}'],
     "in.jsonl:3: messages.0.role: expected one of system, user, assistant, got 'robot'"),
    (['{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}'],
     "in.jsonl:1: messages.1.role: the last message must be the user's"),
    (['{"messages": [{"role": "user", "content": 5}]}'], "in.jsonl:1: messages.0.content: expected a string"),
    (['{"id": "a", "prompt": "x"}', '{"id": "a", "prompt": "y"}'], 'in.jsonl:2: id: "a" is already the id of line 1'),
    (['{"id": 1.5, "prompt": "x"}'], "in.jsonl:1: id: expected a string or an integer"),
])
def test_bad_input_names_file_line_and_field(tmp_path, lines, message):
    from qflash.infer.batch import read_requests

    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as e:
        read_requests(src)
    assert str(e.value).startswith(str(tmp_path / message.split(":")[0]) + ":" + message.split(":", 1)[1]), str(e.value)


def test_output_answering_other_prompts_is_refused_not_mixed(engine, tmp_path):
    from qflash.infer.batch import run_generate
    from qflash.infer.options import SamplingOptions

    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "Hi"}, {"prompt": "Bye"}])
    out = write_jsonl(tmp_path / "out.jsonl", [{"id": 2, "prompt": "Something else", "response": "x"}])
    loads = Loads(engine)
    with pytest.raises(DataError, match=r"out.jsonl:1: id 2 was answered for another prompt than .*in.jsonl:2"):
        run_generate(loads, src, out, SamplingOptions(max_new_tokens=4))
    assert loads.calls == 0
    summary = run_generate(loads, src, out, SamplingOptions(max_new_tokens=4), overwrite=True)
    assert summary.answered == 2 and sorted(r["prompt"] for r in read_jsonl(out)) == ["Bye", "Hi"]


def test_cli_bad_input_is_one_line_exit_2(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "a"}\n{"messages": "hello"}\n', encoding="utf-8")
    p = subprocess.run([sys.executable, "-m", "qflash.cli", "generate", "--input", str(src), "--output",
                        str(tmp_path / "out.jsonl")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [
        f'qflash: error: {src}:2: messages: expected a non-empty list of {{"role": ..., "content": ...}} objects']
    assert not (tmp_path / "out.jsonl").exists()


class _Echo:
    """An engine that answers with separators JSONL must keep inside a line: the file's lines, not the model."""

    context_window = 100

    def prompt_ids(self, messages):
        return list(range(len(messages[-1]["content"])))

    def complete_batch(self, prompts, opts):
        from qflash.infer.engine import Completion

        return [Completion(f"a\u2028b\u2029c\u0085d {len(p)}", "stop", len(p), 4) for p in prompts]


def test_own_output_with_unicode_line_separators_resumes(tmp_path):
    from qflash.infer.batch import run_generate
    from qflash.infer.options import SamplingOptions

    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x" * n} for n in range(1, 5)] + [{"prompt": "p\u2028q"}])
    out = tmp_path / "out.jsonl"
    first = run_generate(_Echo, src, out, SamplingOptions(), batch_size=2)
    assert first.answered == 5
    again = run_generate(_Echo, src, out, SamplingOptions(), batch_size=2)
    assert again.answered == 0 and again.skipped == 5, "qflash reads back what it wrote"
    assert [json.loads(x)["response"][:7] for x in out.read_text(encoding="utf-8").split("\n") if x] == \
        ["a\u2028b\u2029c\u0085d"] * 5


@pytest.mark.parametrize("content", [b'{"results":[{"id":1,"response":"x"}]}', b'[{"id": 1}]',
                                     b'{"id": 1, "prompt": "Hi", "response": "x"}\n{"other": "file"}'])
def test_foreign_output_without_final_newline_is_refused_untouched(tmp_path, content):
    from qflash.infer.batch import run_generate
    from qflash.infer.options import SamplingOptions

    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "Hi"}])
    out = tmp_path / "results.json"
    out.write_bytes(content)
    with pytest.raises(DataError, match=r"results.json:\d+: not a line written by qflash generate"):
        run_generate(_Echo, src, out, SamplingOptions())
    assert out.read_bytes() == content, "validated before anything is cut"


def test_a_second_writer_of_the_same_output_is_refused(tmp_path):
    """Two runs on one --output would interleave their lines: the second is refused while the first writes."""
    from qflash.infer.batch import run_generate
    from qflash.infer.options import SamplingOptions

    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x" * n} for n in range(1, 5)])
    out = tmp_path / "out.jsonl"
    first = (  # a run_generate whose model is slow: it holds the output while the second one starts
        "import sys, time\n"
        "from qflash.infer.batch import run_generate\n"
        "from qflash.infer.options import SamplingOptions\n"
        "class Slow:\n"
        "    context_window = 100\n"
        "    def prompt_ids(self, m):\n"
        "        return [1, 2]\n"
        "    def complete_batch(self, prompts, opts):\n"
        "        print('generating', flush=True)\n"
        "        time.sleep(60)\n"
        "run_generate(Slow, sys.argv[1], sys.argv[2], SamplingOptions())\n")
    holder = subprocess.Popen([sys.executable, "-c", first, str(src), str(out)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert holder.stdout.readline().strip() == "generating"
        with pytest.raises(DataError, match="another qflash generate is writing it"):
            run_generate(_Echo, src, out, SamplingOptions(), overwrite=True)
    finally:
        holder.kill()
        holder.wait()
    assert out.read_bytes() == b""
    assert run_generate(_Echo, src, out, SamplingOptions()).answered == 4


@pytest.fixture(scope="module")
def gemma3_window8(tmp_path_factory, smol_tokenizer):
    """The tiny Gemma 3 with an 8-token sliding window: every prompt is longer (the cache keeps 8 keys there)."""
    from conftest import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("g3w") / "gemma3", "gemma3", smol_tokenizer, sliding_window=8)


@pytest.mark.parametrize("arch", ["qwen3", "mistral", "gemma3", "gemma3-window8"])
def test_greedy_generation_equals_argmax_without_cache(arch, tiny_models, request):
    """Qwen3, Mistral and Gemma 3 (soft-capped logits, a sliding and a global layer; and with a window shorter than
    the prompts) through the engine (KV cache, left-padded batch): each reply is the argmax of a plain fp32 forward
    over the whole sequence so far, token by token."""
    import torch
    from transformers import AutoModelForCausalLM

    from qflash.infer.engine import Engine
    from qflash.infer.generate import load_target
    from qflash.infer.options import SamplingOptions

    model_dir = request.getfixturevalue("gemma3_window8") if arch == "gemma3-window8" else tiny_models[arch]
    engine = Engine(load_target(str(model_dir), device="cpu", quant="none"))
    plain = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    opts = SamplingOptions(max_new_tokens=8)
    prompts = [engine.prompt_ids([{"role": "user", "content": p["prompt"]}]) for p in PROMPTS[:2]]
    batched = engine.complete_batch(prompts, opts)
    for ids, row in zip(prompts, batched):
        seq = list(ids)
        with torch.no_grad():
            while len(seq) - len(ids) < opts.max_new_tokens:
                seq.append(int(plain(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1].argmax()))
                if seq[-1] in engine.stop_ids:
                    break
        want = engine._completion(seq[len(ids):], len(ids))
        assert engine.complete(ids, opts) == want == row
        assert want.completion_tokens >= 1
