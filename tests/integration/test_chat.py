"""qflash chat: the REPL through a pseudo-terminal, streamed text, history fitting the context window."""

from __future__ import annotations

import fcntl
import io
import os
import re
import select
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
STATS = re.compile(r"\[(\d+) tokens, [\d.]+ tok/s, context (\d+)/(\d+)(, cut at max_new_tokens)?\]")
FRANCE = "What is the capital of France?"


class Pty:
    """A child process on a pseudo-terminal, as a user's terminal runs it (Ctrl-C included)."""

    def __init__(self, argv: list[str]):
        self.master, slave = os.openpty()
        attrs = termios.tcgetattr(slave)
        attrs[3] &= ~termios.ECHO  # what we type is not echoed back into the output we read
        termios.tcsetattr(slave, termios.TCSANOW, attrs)
        self.proc = subprocess.Popen(
            argv, stdin=slave, stdout=slave, stderr=slave, cwd=REPO, start_new_session=True,
            # the pty becomes the controlling terminal, so \x03 is delivered as SIGINT
            preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),
        )
        os.close(slave)
        self.seen = ""

    def read_until(self, pattern: str, timeout: float = 180) -> str:
        """Output up to and including the first match of pattern (a regex) since the last call."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self.seen)
            if m:
                out, self.seen = self.seen[: m.end()], self.seen[m.end():]
                return out
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None and not select.select([self.master], [], [], 0)[0]:
                raise AssertionError(f"no {pattern!r} in the output; got:\n{self.seen[-3000:]}")
            if select.select([self.master], [], [], min(left, 1.0))[0]:
                try:
                    data = os.read(self.master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    data = b""
                self.seen += data.decode("utf-8", errors="replace").replace("\r\n", "\n")

    def send(self, text: str) -> None:
        os.write(self.master, text.encode("utf-8"))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)


def ask(term: Pty, line: str) -> tuple[str, int, int]:
    """Send a line; (the streamed reply, tokens, context size) from what is printed up to the next prompt."""
    term.send(line + "\n")
    out = term.read_until(r"\n> ")
    m = STATS.search(out)
    assert m, out
    return out[: m.start()].strip(), int(m.group(1)), int(m.group(2))


@pytest.fixture(scope="module")
def smol_engine(smol_dir):
    from qflash.infer.engine import Engine
    from qflash.infer.generate import load_target

    return Engine(load_target(str(smol_dir), device="cpu"))


def test_chat_through_a_terminal_two_turns_ctrl_c_reset_exit(smol_dir, smol_engine):
    from qflash.infer.options import SamplingOptions

    term = Pty([sys.executable, "-m", "qflash.cli", "chat", str(smol_dir), "--device", "cpu",
                "--max-new-tokens", "40"])
    try:
        banner = term.read_until(r"Ctrl-D to quit\.\n")
        assert "(greedy, up to 40 new tokens; context 8192 tokens)" in banner
        term.read_until(r"> ")

        first, tokens1, context1 = ask(term, FRANCE)
        assert "Paris" in first
        # what was streamed is exactly the reply the engine gives for this prompt in one piece
        expected = smol_engine.complete(smol_engine.prompt_ids([{"role": "user", "content": FRANCE}]),
                                        SamplingOptions(max_new_tokens=40))
        assert first == expected.text.strip()
        assert (tokens1, context1) == (expected.completion_tokens, expected.prompt_tokens + expected.completion_tokens)

        second, tokens2, context2 = ask(term, "And the capital of Germany?")
        assert second and "Berlin" in second
        assert context2 - tokens2 > context1, "the second prompt holds the first exchange (history kept)"

        term.send("Write a very long poem about the sea, with many verses.\n")
        term.read_until(r"\S")  # the reply has started streaming
        term.send("\x03")  # Ctrl-C: stops this reply, not the program
        term.read_until(r"\[reply stopped\]\n")
        term.read_until(r"> ")

        term.send("/reset\n")
        term.read_until(r"\(conversation cleared\)\n> ")
        again, tokens3, context3 = ask(term, FRANCE)
        assert (again, tokens3, context3) == (first, tokens1, context1), "after /reset the history is empty"

        term.send("/exit\n")
        term.read_until(r"chat ended: 4 replies, \d+ tokens generated\n")
        assert term.proc.wait(timeout=30) == 0
    finally:
        term.close()


def test_one_shot_prompt_prints_the_reply(smol_dir, smol_engine):
    from qflash.infer.chat import run_one_shot
    from qflash.infer.options import SamplingOptions

    out, err = io.StringIO(), io.StringIO()
    assert run_one_shot(smol_engine, SamplingOptions(max_new_tokens=16), FRANCE, out=out, err=err) == 0
    assert out.getvalue() == "The capital of France is Paris.\n"
    assert STATS.search(err.getvalue())


def test_streamed_chinese_reply_is_whole_characters(smol_engine):
    from qflash.infer.options import SamplingOptions

    deltas: list[str] = []
    ids = smol_engine.prompt_ids([{"role": "user", "content": "请用中文介绍一下巴黎。"}])
    c = smol_engine.complete(ids, SamplingOptions(max_new_tokens=16), on_text=deltas.append)
    assert "".join(deltas) == c.text
    assert all("\ufffd" not in d for d in deltas)
    assert re.search(r"[\u4e00-\u9fff]", c.text)
    assert len(deltas) < c.completion_tokens, "some characters took several tokens and were sent once complete"


@pytest.fixture(scope="module")
def tiny_engine(tiny_models):
    from qflash.infer.engine import Engine
    from qflash.infer.generate import load_target

    return Engine(load_target(str(tiny_models["qwen2"]), device="cpu", quant="none"))


def test_streamer_holds_back_split_characters_and_stops_at_end_of_turn(tiny_engine, smol_tokenizer):
    from qflash.infer.engine import _DeltaStreamer

    text = "你好，世界！🙂 café"
    ids = smol_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text) - 4, "the text needs characters made of several byte-level tokens"
    deltas: list[str] = []
    s = _DeltaStreamer(tiny_engine, deltas.append)
    s.put(torch.tensor([[1, 2, 3]]))  # the prompt, pushed first by generate
    for t in [*ids, tiny_engine.stop_ids[0], *smol_tokenizer("ignored", add_special_tokens=False)["input_ids"]]:
        s.put(torch.tensor([t]))
    s.end()
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    assert "🙂" in deltas or any("🙂" in d for d in deltas)


def test_history_is_trimmed_oldest_first_keeping_the_system_prompt(tiny_engine):
    from qflash.infer.engine import ContextOverflow, Engine

    small = Engine(tiny_engine.loaded, context_window=120)
    system = {"role": "system", "content": "You are terse."}
    turns = []
    for i in range(6):
        turns += [{"role": "user", "content": f"question {i} " + "word " * 5},
                  {"role": "assistant", "content": f"answer {i} " + "word " * 5}]
    msgs = [system, *turns, {"role": "user", "content": "last question"}]
    fitted = small.fit(msgs, max_new_tokens=20)
    assert len(fitted.ids) <= 120 - 20
    assert fitted.dropped > 0 and fitted.dropped % 2 == 0
    assert fitted.messages[0] == system and fitted.messages[-1] == msgs[-1]
    assert fitted.messages[1:-1] == turns[fitted.dropped:], "the oldest turns go first; what stays is untouched"
    assert fitted.messages[1]["role"] == "user"
    assert len(small.prompt_ids([system, *turns[fitted.dropped - 2:], msgs[-1]])) > 100, "no more was dropped than needed"
    assert small.fit(msgs[-1:], max_new_tokens=20).dropped == 0
    with pytest.raises(ContextOverflow, match="context window is 120 tokens"):
        small.fit([system, {"role": "user", "content": "word " * 200}], max_new_tokens=20)


def test_repl_says_when_it_trims_and_handles_commands(tiny_engine):
    from qflash.infer.chat import run_repl
    from qflash.infer.engine import Engine
    from qflash.infer.options import SamplingOptions

    small = Engine(tiny_engine.loaded, context_window=90)
    lines = iter(["/system Be brief.", "/system", "hello " * 8, "again " * 8, "more " * 8, "/bogus", "//slash", "/help"])

    def read(prompt: str) -> str:
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    out, err = io.StringIO(), io.StringIO()
    assert run_repl(small, SamplingOptions(max_new_tokens=8), read=read, out=out, err=err) == 0
    log = err.getvalue()
    assert "(system prompt: 'Be brief.')" in log
    assert re.search(r"\(history trimmed: the \d+ oldest messages no longer fit the 90-token context window\)", log)
    assert "(unknown command /bogus; /help lists the commands)" in log
    assert "/reset          forget the conversation" in log
    assert "chat ended: 4 replies" in log
    assert len(STATS.findall(log)) == 4


def test_a_run_directory_loads_its_base_and_adapter_as_trained(tiny_models, identity_subset, tmp_path, capsys):
    from conftest import tiny_config
    from qflash.cli import main
    from qflash.errors import ConfigError
    from qflash.infer.engine import Engine
    from qflash.infer.generate import answer, load_target, split_target
    from qflash.infer.options import SamplingOptions
    from qflash.train.loop import build_setup, run_training

    base = str(tiny_models["qwen2"])
    run_training(build_setup(tiny_config(tiny_models["qwen2"], identity_subset, tmp_path / "run", "train.max_steps=1")),
                 quiet=True)
    run = str(tmp_path / "run")
    assert split_target(run, None, None) == (None, run)
    assert split_target(run + "/adapter", None, None) == (None, run + "/adapter")
    assert split_target(base, None, run) == (base, run)
    with pytest.raises(ConfigError, match="give one of them"):
        split_target(run, None, run)
    with pytest.raises(ConfigError, match="MODEL_OR_RUN /no/such/dir: no such file or directory"):
        split_target("/no/such/dir", None, None)

    loaded = load_target(run, device="cpu")
    assert loaded.has_adapter and loaded.cfg.quant.mode == "nf4" and loaded.name == "run"
    assert load_target(base, device="cpu").cfg.quant.mode == "none", "a plain model loads unquantized"

    # answer() (what the evals call) is the engine's greedy batch, stripped. (Few tokens: bitsandbytes'
    # NF4 matmuls are slow on the CPU.)
    engine = Engine(loaded)
    convs = [[{"role": "user", "content": q}] for q in ("Who are you?", "Who made you, and why?")]
    singles = [engine.complete(engine.prompt_ids(c), SamplingOptions(max_new_tokens=4)) for c in convs]
    assert answer(loaded, convs, max_new_tokens=4, batch_size=2) == [
        (c.text.strip(), c.finish_reason == "stop") for c in singles]

    # the positional run and the README's --adapter spelling give the same one-shot reply
    replies = []
    for argv in (["chat", run], ["chat", "--adapter", run]):
        assert main([*argv, "--device", "cpu", "--prompt", "Who are you?", "--max-new-tokens", "4"]) == 0
        captured = capsys.readouterr()
        assert STATS.search(captured.err)
        replies.append(captured.out)
    assert replies[0] == replies[1] == singles[0].text.strip() + "\n"
