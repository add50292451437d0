"""`qflash chat`: a line-based terminal chat with streamed replies, and the one-shot `--prompt`.

Plain `input()` on purpose: it works the same on a terminal, through a pseudo-terminal and from a
pipe. Replies are printed as they are generated. Ctrl-C while a reply is being written stops that
reply (what was shown stays in the history); at the prompt it only clears the line.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, TextIO

from qflash.infer.engine import Cancelled, Completion, ContextOverflow, Engine, Fitted
from qflash.infer.options import MessageError, SamplingOptions

PROMPT = "> "
HELP = """commands:
  /reset          forget the conversation (the system prompt stays)
  /system TEXT    set the system prompt; /system alone shows it, /system - removes it
  /exit           quit (Ctrl-D too); Ctrl-C stops a reply that is being written
  /help           this list
a line starting with // is sent as text starting with /"""


class _ReplyPrinter:
    """Writes streamed text without the reply's leading and trailing whitespace, flushing each piece.

    Whitespace is held back until something follows it, so what is printed is exactly the stripped
    reply, the same text the history keeps and --prompt printed before replies were streamed.
    """

    def __init__(self, out: TextIO):
        self.out = out
        self.shown: list[str] = []
        self._pending = ""

    def __call__(self, delta: str) -> None:
        text = self._pending + delta
        if not self.shown:
            text = text.lstrip()
        body = text.rstrip()
        self._pending = text[len(body):]
        if body:
            self.out.write(body)
            self.out.flush()
            self.shown.append(body)

    @property
    def text(self) -> str:
        return "".join(self.shown)


@dataclass
class ChatSession:
    """A conversation with the model: history, system prompt, and one reply at a time."""

    engine: Engine
    opts: SamplingOptions
    system: str | None = None
    history: list[dict[str, str]] = field(default_factory=list)

    def reset(self) -> None:
        self.history.clear()

    def messages(self, user_text: str) -> list[dict[str, str]]:
        sys_msgs = [{"role": "system", "content": self.system}] if self.system else []
        return sys_msgs + self.history + [{"role": "user", "content": user_text}]

    def fit(self, user_text: str) -> Fitted:
        """The prompt for the next reply; the oldest turns are dropped from the history when it no longer fits."""
        fitted = self.engine.fit(self.messages(user_text), self.opts.max_new_tokens)
        if fitted.dropped:
            self.history = [m for m in fitted.messages if m["role"] != "system"][:-1]
        return fitted

    def record(self, user_text: str, reply: str) -> None:
        self.history += [{"role": "user", "content": user_text}, {"role": "assistant", "content": reply}]


def _describe(opts: SamplingOptions) -> str:
    how = "greedy" if opts.greedy else f"temperature {opts.temperature:g}, top_p {opts.top_p:g}"
    if opts.repetition_penalty != 1.0:
        how += f", repetition penalty {opts.repetition_penalty:g}"
    return f"{how}, up to {opts.max_new_tokens} new tokens"


def _stats(c: Completion, seconds: float, window: int) -> str:
    rate = c.completion_tokens / seconds if seconds > 0 else 0.0
    end = "" if c.finish_reason == "stop" else ", cut at max_new_tokens"
    return (f"[{c.completion_tokens} tokens, {rate:.1f} tok/s, context {c.prompt_tokens + c.completion_tokens}"
            f"/{window}{end}]")


def _command(session: ChatSession, line: str, err: TextIO) -> bool:
    """Run a /command; False when the chat should end."""
    name, _, arg = line.partition(" ")
    arg = arg.strip()
    if name in ("/exit", "/quit"):
        return False
    if name == "/reset":
        session.reset()
        print("(conversation cleared)", file=err, flush=True)
    elif name == "/system":
        if not arg:
            print(f"(system prompt: {session.system!r})" if session.system else "(no system prompt)", file=err, flush=True)
        elif arg == "-":
            session.system = None
            print("(system prompt removed)", file=err, flush=True)
        else:
            session.system = arg
            print("(system prompt set; it applies from the next reply, history kept: /reset starts over)",
                  file=err, flush=True)
    elif name == "/help":
        print(HELP, file=err, flush=True)
    else:
        print(f"(unknown command {name}; /help lists the commands)", file=err, flush=True)
    return True


def _reply(session: ChatSession, text: str, out: TextIO, err: TextIO) -> int:
    """Ask, stream the answer, record the turn. Returns the tokens generated."""
    try:
        fitted = session.fit(text)
    except (ContextOverflow, MessageError) as e:
        print(f"(not sent: {e})", file=err, flush=True)
        return 0
    if fitted.dropped:
        print(f"(history trimmed: the {fitted.dropped} oldest messages no longer fit the "
              f"{session.engine.context_window}-token context window)", file=err, flush=True)
    printer = _ReplyPrinter(out)
    t0 = time.perf_counter()
    stop = threading.Event()
    try:
        with _ctrl_c_sets(stop):
            c = session.engine.complete(fitted.ids, session.opts, on_text=printer, cancel=stop)
    except (KeyboardInterrupt, Cancelled):
        out.write("\n")
        print("[reply stopped]", file=err, flush=True)
        session.record(text, printer.text)
        return 0
    out.write("\n")
    out.flush()
    print(_stats(c, time.perf_counter() - t0, session.engine.context_window), file=err, flush=True)
    session.record(text, printer.text)
    return c.completion_tokens


@contextlib.contextmanager
def _ctrl_c_sets(event: threading.Event):
    """While a reply is generated, Ctrl-C (SIGINT) sets `event`; generation stops at the next token.

    Not the default KeyboardInterrupt: Python raises it wherever the main thread happens to be, and raised inside a
    finalizer or a callback that C code calls it is printed and swallowed ("Exception ignored in ..."). Once, in a
    full test run, a Ctrl-C during a reply was ignored and the reply ran to its limit (the cause was not pinned
    down; a swallowed KeyboardInterrupt would do it). Setting an event cannot be swallowed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: event.set())
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def run_repl(
    engine: Engine, opts: SamplingOptions, system: str | None = None, *,
    out: TextIO | None = None, err: TextIO | None = None, read: Callable[[str], str] = input,
) -> int:
    out, err = out or sys.stdout, err or sys.stderr  # looked up now: sys.stdout may have been replaced
    session = ChatSession(engine, opts, system)
    print(f"qflash chat: {engine.loaded.name} ({_describe(opts)}; context {engine.context_window} tokens). "
          "/help for commands, /exit or Ctrl-D to quit.", file=err, flush=True)
    turns = tokens = 0
    while True:
        try:
            line = read(PROMPT)
        except EOFError:
            out.write("\n")
            break
        except KeyboardInterrupt:
            out.write("\n(Ctrl-C clears the line; /exit or Ctrl-D quits)\n")
            continue
        line = line.strip()
        if not line:
            continue
        if line.startswith("/") and not line.startswith("//"):
            if not _command(session, line, err):
                break
            continue
        text = line[1:] if line.startswith("//") else line
        tokens += _reply(session, text, out, err)
        turns += 1
    out.flush()
    print(f"chat ended: {turns} replies, {tokens} tokens generated", file=err, flush=True)
    return 0


def run_one_shot(
    engine: Engine, opts: SamplingOptions, prompt: str, system: str | None = None, *,
    out: TextIO | None = None, err: TextIO | None = None,
) -> int:
    """Answer one prompt: the reply streamed to stdout, its statistics to stderr."""
    out, err = out or sys.stdout, err or sys.stderr
    session = ChatSession(engine, opts, system)
    fitted = session.fit(prompt)  # ContextOverflow is a QflashError: one line, exit 2
    printer = _ReplyPrinter(out)
    t0 = time.perf_counter()
    c = engine.complete(fitted.ids, opts, on_text=printer)
    out.write("\n")
    out.flush()
    print(_stats(c, time.perf_counter() - t0, engine.context_window), file=err, flush=True)
    return 0
