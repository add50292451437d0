"""Rendering conversations with the tokenizer's chat template, and exact assistant-only labels.

Where a reply is: the conversation is rendered up to each assistant turn, once as the prompt
(turns before it + generation prompt) and once including it. The template must only append (the
prompt is a prefix of that, which is a prefix of the full text), so the reply is exactly the
characters [len(prompt), end of the end-of-turn token that closes it) of the full text: what a
model has to generate after the generation prompt, up to and including the token that stops it.
No marker strings are searched for in the content, so a reply that itself contains "assistant"
or "<|im_start|>" cannot shift the mask.

How the tokens get their labels: the full text is cut at the reply boundaries and each piece is
tokenized on its own, then the pieces are concatenated. A token can then never straddle a
boundary, so the trained tokens decode to exactly the replies and their end-of-turn tokens. It is
also what inference sees: the prompt ends where generation starts. This needs a tokenizer whose
pieces concatenate (byte-level BPE: Qwen, Llama 3, SmolLM, GPT-2); one that adds a prefix space to
every piece (old SentencePiece) gets the labels from character offsets instead, said once in the log.

Speed: rendering every assistant prefix through `apply_chat_template` costs 2k+1 renders per
conversation. Instead the template is compiled once, and for each sequence of roles the prefixes
are rendered once with placeholder contents (a "skeleton"). A conversation is then rendered once;
if that text equals the skeleton with the real contents put in, the template inserted the contents
verbatim and the reply boundaries follow by arithmetic. Otherwise (a template that trims or
rewrites content) that conversation takes the exact slow path above. The compiled template is
checked against `apply_chat_template` on probe conversations; if they ever differ, every render
goes through `apply_chat_template` (said once in the log).

Templates that are not prefix-stable. Some templates render an earlier turn differently once later turns
follow: Qwen3's drops the reasoning (`<think>...</think>`) of every reply before the last user message, and writes
an empty think block before the last reply. No single rendering then shows each reply as the model generates it.
Such a conversation (found when a turn rendered as the last one is not a prefix of the whole rendering) is
rendered once per trained turn instead: sequence i is the conversation up to and including assistant turn i,
exactly as the template renders it when that turn is the last one, and only that reply (with its end-of-turn)
carries loss; the earlier replies in it are context, as the template renders them (without their reasoning, for
Qwen3). A conversation with k trained turns thus becomes k sequences, and costs about k(k+1)/2 turns of tokens
instead of k; `data.train_on=last_assistant` (or `all`) keeps one sequence, the whole conversation. Templates
that only append (ChatML, Llama 3, SmolLM) keep the single rendering above. Uses that need one sequence per
conversation (preference pairs, replay) take `encode_many`, which refuses a conversation that needs several.

Reasoning and tools. Messages may carry `reasoning_content` (or `<think>...</think>` inline in content),
`tool_calls`, and `tool` role messages; they go to the template as they are, and a field the template does not
render at all is a problem, not a silent drop. With `train_reasoning=False`, a trained reply's reasoning (what
the template writes before the answer, found by rendering the turn again with the answer replaced by a
placeholder) is cut into its own piece and masked. Tool messages are never inside a reply, so never trained
(train_on=all, which would train every token, refuses a conversation with tool results).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from itertools import chain
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from qflash.config import CHAT_TEMPLATES, template_problem
from qflash.data.formats import Conversation
from qflash.data.problems import Problem, ProblemKind
from qflash.errors import DataError
from qflash.once import log_once

log = logging.getLogger(__name__)

IGNORE = -100

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TEMPLATE_TOKENS = {
    "chatml": ("<|im_start|>", "<|im_end|>"),
    "qwen": ("<|im_start|>", "<|im_end|>"),
    "llama3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "gemma": ("<start_of_turn>", "<end_of_turn>"),
    "mistral": ("[INST]", "[/INST]"),
}
"""The special tokens each built-in template writes (besides the tokenizer's own BOS/EOS)."""
END_OF_TURN = {"chatml": "<|im_end|>", "qwen": "<|im_end|>", "llama3": "<|eot_id|>", "gemma": "<end_of_turn>",
               "mistral": None}
"""The token each built-in template closes a reply with (None: the tokenizer's EOS)."""
assert set(TEMPLATE_TOKENS) == set(CHAT_TEMPLATES)


def template_source(name: str) -> str:
    """The text of data.template: a built-in template (qflash/data/templates/NAME.jinja) or a .jinja file."""
    if name == "chatml":
        return CHATML
    if name in CHAT_TEMPLATES:
        return (resources.files("qflash.data") / "templates" / f"{name}.jinja").read_text(encoding="utf-8")
    problem = template_problem(name)
    if problem:
        raise DataError(f"data.template {problem}")
    return Path(name).expanduser().read_text(encoding="utf-8")

_SENTINEL = "QFLASH_SENTINEL_REPLY"
# Private-use characters: no template transforms them, no real content contains them.
_PLACEHOLDER = "\ue000{}\ue001"
_PROBES: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "Hi there!"}, {"role": "assistant", "content": "Hello. 你好"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": " two\n\nlines "},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": "\n sure"},
    ],
]


@dataclass
class Example:
    """One tokenized sample. input_ids/labels: 1-D int64 numpy arrays (lists work too)."""

    input_ids: Any
    labels: Any
    file: str = ""
    line: int = 0

    @property
    def n_trained(self) -> int:
        return int(np.count_nonzero(np.asarray(self.labels) != IGNORE))


class RenderError(Exception):
    """A conversation the template cannot render or whose replies cannot be located."""

    def __init__(self, reason: str, kind: ProblemKind = "template mismatch"):
        super().__init__(reason)
        self.reason, self.kind = reason, kind


class NotPrefixStable(RenderError):
    """The template renders an earlier turn differently once later turns follow (Qwen3 drops the reasoning of
    earlier replies): the conversation is then rendered once per trained turn (see Rendering)."""


@dataclass
class Rendering:
    """One sequence to tokenize: its text, where it is cut into pieces, and the character ranges that carry loss.

    Each trained range starts and ends at a cut (or an end of the text), so that pieces are either wholly
    trained or wholly masked. `plain` marks a text-format sample: BOS? + text + EOS, every token trained.
    """

    text: str
    cuts: list[int]
    trained: list[tuple[int, int]]
    plain: bool = False

    def piece_trained(self, start: int) -> bool:
        return any(a <= start < b for a, b in self.trained)


def compile_template(source: str):
    """The template compiled as transformers compiles chat templates (sandboxed, trim/lstrip blocks)."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        """{% generation %}...{% endgeneration %} (the assistant-mask tag of some templates): its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


@dataclass
class _Skeleton:
    """A role sequence rendered with placeholder contents.

    The full text is pieces[0] + content[order[0]] + pieces[1] + ... + pieces[-1]; each reply
    boundary is a position in that text plus the number of contents before it.
    """

    pieces: list[str]
    order: list[int]
    boundaries: list[tuple[int, int]]  # (position in the skeleton text, contents before it)


class ChatRenderer:
    """Renders conversations for one tokenizer and computes their labels."""

    def __init__(self, tokenizer, template: str | None = None, train_on: str = "assistant",
                 train_reasoning: bool = True):
        source = template_source(template) if template else getattr(tokenizer, "chat_template", None)
        if isinstance(source, dict):  # several named templates: the one apply_chat_template uses
            source = source.get("default")
        if not source:
            raise DataError(
                "the tokenizer has no chat template; set data.template=chatml (or llama3, qwen, gemma, mistral: one whose "
                "turn markers its vocabulary has, or the path of a .jinja file; or use a model that ships one)"
            )
        self.tok = tokenizer
        self.template = template
        self.template_text: str = source
        self.train_on = train_on
        self.train_reasoning = train_reasoning
        if template:
            _check_template_tokens(tokenizer, template, base=not getattr(tokenizer, "chat_template", None))
        self._setup()

    # The compiled template does not pickle; worker processes rebuild it.
    def __getstate__(self) -> dict:
        return {"tok": self.tok, "template": self.template, "template_text": self.template_text,
                "train_on": self.train_on, "train_reasoning": self.train_reasoning}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._setup()

    def with_train_on(self, train_on: str) -> "ChatRenderer":
        """This renderer labelling per another data.train_on. It shares the compiled template and the rendered
        skeletons (they do not depend on train_on), so nothing is compiled or probed again; copy.copy would be
        no cheaper: it goes through __setstate__, which compiles."""
        if train_on == self.train_on:
            return self
        twin = object.__new__(ChatRenderer)
        twin.__dict__.update(self.__dict__)
        twin.train_on = train_on
        return twin

    def _setup(self) -> None:
        self._kwargs = dict(self.tok.special_tokens_map)
        self._compiled = self._checked_compile()
        self._skeletons: dict[tuple[str, ...], _Skeleton | RenderError | None] = {}
        self.eot_text = self._find_end_of_turn()
        self.eot_id = self.tok.convert_tokens_to_ids(self.eot_text)
        self.eos_id = self.tok.eos_token_id
        self.text_prefix_ids = self._text_prefix_ids()
        self.renders = self._probe_fields()
        self.split_exact = self._pieces_concatenate()
        if not self.split_exact:
            if not getattr(self.tok, "is_fast", False):
                raise DataError("the tokenizer is neither a fast tokenizer nor one whose pieces concatenate; "
                                "qflash needs one of the two to place the labels exactly")
            log.warning("tokenizer %s adds a prefix to every piece of text it tokenizes; labels come from "
                        "character offsets (a token that straddles a reply boundary is trained when it starts "
                        "inside the reply)", getattr(self.tok, "name_or_path", ""))

    # -----------------------------------------------------------------------------------------
    # Rendering

    def _apply_chat_template(self, messages, add_generation_prompt, tools=None):
        return self.tok.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=self.template_text,
            tools=tools,
        )

    def _checked_compile(self):
        """The compiled template when it renders the probes exactly as apply_chat_template does, else None."""
        import jinja2

        try:
            compiled = compile_template(self.template_text)
        except jinja2.TemplateError as e:
            log.warning("the chat template does not compile outside transformers (%s); rendering through "
                        "apply_chat_template, which is slower", e)
            return None

        def outcome(fn, msgs, gen):
            try:
                return fn(msgs, gen)
            except Exception as e:  # noqa: BLE001 - any failure must fail the same way on both sides
                return f"error: {type(e).__name__}: {e}"

        def ours(msgs, gen):
            return compiled.render(messages=msgs, tools=None, documents=None, add_generation_prompt=gen, **self._kwargs)

        for msgs in _PROBES:
            for gen in (False, True):
                if outcome(ours, msgs, gen) != outcome(self._apply_chat_template, msgs, gen):
                    log.warning("the compiled chat template renders differently from apply_chat_template; "
                                "rendering through apply_chat_template, which is slower")
                    return None
        return compiled

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False,
               tools: list[dict] | None = None) -> str:
        if self._compiled is None:
            return self._apply_chat_template(messages, add_generation_prompt, tools)
        return self._compiled.render(
            messages=messages, tools=tools, documents=None, add_generation_prompt=add_generation_prompt, **self._kwargs
        )

    def _render_or_fail(self, messages, add_generation_prompt=False, tools=None) -> str:
        import jinja2

        try:
            return self.render(messages, add_generation_prompt, tools)
        except jinja2.TemplateError as e:
            raise RenderError(f"the chat template refuses this conversation: {e}") from None

    def _find_end_of_turn(self) -> str:
        """The special token the template closes an assistant turn with (<|im_end|>, <|eot_id|>, ...)."""
        text = self.render([{"role": "user", "content": "hi"}, {"role": "assistant", "content": _SENTINEL}])
        after = text[text.index(_SENTINEL) + len(_SENTINEL):]
        specials = {t for t in self.tok.all_special_tokens if t}
        specials |= {t.content for t in getattr(self.tok, "added_tokens_decoder", {}).values() if t.special}
        found = [(after.find(s), s) for s in specials if s in after]
        if not found:
            raise DataError(
                "the chat template ends assistant turns with no special token, so a fine-tuned model would "
                "never learn to stop; set data.template=chatml"
            )
        return min(found, key=lambda x: (x[0], -len(x[1])))[1]

    def _ids(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, no special tokens added (the chat template already wrote them)."""
        if not texts:
            return []
        backend = getattr(self.tok, "backend_tokenizer", None) if getattr(self.tok, "is_fast", False) else None
        if backend is None:
            return self.tok(texts, add_special_tokens=False)["input_ids"]
        # The Rust tokenizer directly: the same ids as tok(texts), without building a BatchEncoding
        # (which costs as much again as the tokenization itself); no offsets computed.
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
        return [e.ids for e in encode(texts, add_special_tokens=False)]

    def _pieces_concatenate(self) -> bool:
        """Does tokenizing text in pieces give the same ids as tokenizing it whole, at line breaks?"""
        for a, b in (("Hello\n", "World, again"), ("你好\n", "世界"), ("x:\n", " y")):
            ia, ib, iab = self._ids([a, b, a + b])
            if ia + ib != iab or self.tok.decode(ib, clean_up_tokenization_spaces=False) != b:
                return False
        return True

    def _text_prefix_ids(self) -> list[int]:
        """What the tokenizer puts before plain text (a BOS for Llama-style ones, nothing for Qwen/SmolLM)."""
        bare = self.tok("a", add_special_tokens=False)["input_ids"]
        full = self.tok("a", add_special_tokens=True)["input_ids"]
        n = len(full) - len(bare)
        return list(full[:n]) if n > 0 and full[n:n + len(bare)] == bare else []

    # -----------------------------------------------------------------------------------------
    # Where the replies are

    def _last_reply(self, msgs: list[dict[str, Any]], tools: list[dict] | None = None) -> tuple[str, int, int]:
        """(text, start, end) of the conversation rendered up to its last message, an assistant reply: the reply
        is what follows the generation prompt, up to and including the end-of-turn token that closes it."""
        i = len(msgs) - 1
        prompt = self._render_or_fail(msgs[:i], add_generation_prompt=True, tools=tools)
        upto = self._render_or_fail(msgs, tools=tools)
        if not upto.startswith(prompt):
            at = next(k for k, (a, b) in enumerate(zip(prompt, upto + "\0")) if a != b)
            raise RenderError(f"turn {i}: the chat template's generation prompt ends {prompt[at:][:40]!r} where the reply "
                              f"starts {upto[at:][:40]!r}, so the reply cannot be located exactly (a template that "
                              "turns thinking off, given a reply with reasoning?); use a template that renders "
                              "this reply as it generates it (data.template=qwen for reasoning data)")
        end = upto.rfind(self.eot_text)
        if end < len(prompt):
            raise RenderError(f"turn {i}: no {self.eot_text} after the reply in the rendered template")
        return upto, len(prompt), end + len(self.eot_text)

    def _reply_bounds(self, msgs: list[dict[str, Any]], full: str, i: int,
                      tools: list[dict] | None = None) -> tuple[int, int]:
        """(start, end) of assistant turn i in `full`, by rendering its prompt and its prefix."""
        upto, start, end = self._last_reply(msgs[: i + 1], tools)
        if not full.startswith(upto):
            raise NotPrefixStable(f"turn {i}: the chat template rewrites earlier turns when later ones are added")
        return start, end

    def _skeleton(self, roles: tuple[str, ...]) -> _Skeleton | None:
        """The skeleton of a role sequence, None if the template does not show each content once; raises
        NotPrefixStable for a template that renders these roles differently as later turns follow."""
        if roles in self._skeletons:
            cached = self._skeletons[roles]
            if isinstance(cached, RenderError):
                raise cached
            return cached
        try:
            sk = self._build_skeleton(roles)
        except RenderError as e:
            self._skeletons[roles] = e
            raise
        self._skeletons[roles] = sk
        return sk

    def _build_skeleton(self, roles: tuple[str, ...]) -> _Skeleton | None:
        holders = [_PLACEHOLDER.format(i) for i in range(len(roles))]
        msgs = [{"role": r, "content": h} for r, h in zip(roles, holders)]
        full = self._render_or_fail(msgs)
        if any(full.count(h) != 1 for h in holders):
            return None
        slots = sorted((full.index(h), i) for i, h in enumerate(holders))
        pieces, prev = [], 0
        for pos, i in slots:
            pieces.append(full[prev:pos])
            prev = pos + len(holders[i])
        pieces.append(full[prev:])
        starts = [pos for pos, _ in slots]
        ends = [pos + len(holders[i]) for pos, i in slots]
        boundaries = []
        for i, role in enumerate(roles):
            if role != "assistant":
                continue
            for b in self._reply_bounds(msgs, full, i):
                before = sum(1 for e in ends if e <= b)
                if any(s < b < e for s, e in zip(starts, ends)):
                    return None  # a boundary inside a content: no arithmetic for this template
                boundaries.append((b, before))
        return _Skeleton(pieces, [i for _, i in slots], boundaries)

    def reply_spans(self, conv: Conversation) -> tuple[str, list[tuple[int, int]]]:
        """The rendered text and the character span of every assistant reply (with its end-of-turn).
        Raises NotPrefixStable when the template renders an earlier reply differently in the whole conversation."""
        msgs = conv.messages
        full = self._render_or_fail(msgs, tools=conv.tools)
        try:  # skeletons are rendered without tool definitions
            sk = self._skeleton(tuple(m["role"] for m in msgs)) if conv.tools is None else None
        except RenderError:
            # Placeholders the template refuses (a tool message without a call), or renders differently as turns
            # follow (Qwen3: replies without reasoning); the real contents may still render prefix-stably (replies
            # that keep their reasoning): no arithmetic, the slow path below tells.
            sk = None
        if sk is not None:
            contents = [msgs[i]["content"] for i in sk.order]
            if full == "".join(chain.from_iterable(zip(sk.pieces, contents + [""]))):
                shift = [0]
                for c, i in zip(contents, sk.order):
                    shift.append(shift[-1] + len(c) - len(_PLACEHOLDER.format(i)))
                pos = [b + shift[k] for b, k in sk.boundaries]
                return full, list(zip(pos[::2], pos[1::2]))
        # The template did not insert the contents verbatim: locate each reply by rendering prefixes.
        return full, [self._reply_bounds(msgs, full, i, conv.tools) for i, m in enumerate(msgs)
                      if m["role"] == "assistant"]

    def assistant_spans(self, conv: Conversation, full: str | None = None) -> list[tuple[int, int]]:
        """Character spans that carry loss (per data.train_on) when the template is prefix-stable."""
        _, spans = self.reply_spans(conv)
        return spans[-1:] if self.train_on == "last_assistant" else spans

    # -----------------------------------------------------------------------------------------
    # Conversations -> sequences to tokenize

    def renderings(self, conv: Conversation) -> list[Rendering]:
        """The sequences a conversation trains as: one, or one per trained turn when the template is not
        prefix-stable (see the module docstring). Raises RenderError."""
        if conv.text is not None:
            return [Rendering(conv.text, [], [(0, len(conv.text))], plain=True)]
        self._check_fields(conv.messages, conv.tools)
        try:
            full, spans = self.reply_spans(conv)
        except NotPrefixStable:
            return self._per_turn(conv.messages, conv.tools)
        turns = [i for i, m in enumerate(conv.messages) if m["role"] == "assistant"]
        trained = turns[-1:] if self.train_on == "last_assistant" else turns
        return [self._rendering(conv.messages, full, dict(zip(turns, spans)), trained, conv.tools)]

    def _per_turn(self, msgs: list[dict[str, Any]], tools: list[dict] | None) -> list[Rendering]:
        """One rendering per trained turn, each ending with that turn; only its last reply carries loss."""
        turns = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
        if self.train_on != "assistant":  # the last turn only, or every token: the whole conversation once
            turns = turns[-1:]
        out = []
        for i in turns:
            text, start, end = self._last_reply(msgs[: i + 1], tools)
            out.append(self._rendering(msgs[: i + 1], text, {i: (start, end)}, [i], tools))
        return out

    def _rendering(self, msgs: list[dict[str, Any]], text: str, spans: dict[int, tuple[int, int]],
                   trained_turns: list[int], tools: list[dict] | None) -> Rendering:
        """`text` cut at every reply boundary (whatever train_on says, so the ids never depend on it), with the
        replies of `trained_turns` trained; their reasoning is cut off and left untrained when train_reasoning
        is off. train_on=all trains every token."""
        cuts = sorted({b for span in spans.values() for b in span})
        trained = []
        for i in trained_turns:
            start, end = spans[i]
            if not self.train_reasoning:
                start += self._reasoning_length(msgs, i, text[start:end], tools)
                cuts.append(start)
            trained.append((start, end))
        if self.train_on == "all":
            trained = [(0, len(text))]
        return Rendering(text, sorted(set(cuts)), trained)

    def _reasoning_length(self, msgs: list[dict[str, Any]], i: int, reply: str, tools: list[dict] | None) -> int:
        """How many characters of `reply` (assistant turn i as rendered) come before its answer: the reasoning as
        the template writes it (`<think>...</think>` and what follows it; the empty think block Qwen3 writes before
        a reply without reasoning too), 0 when the template writes the answer first. Found by rendering the turn
        once more with the answer replaced by a placeholder."""
        m = msgs[i]
        content = m.get("content") or ""
        head = content[:_answer_start(content)]
        probe = msgs[:i] + [dict(m, content=head + _ANSWER)]
        text, start, end = self._last_reply(probe, tools)
        rendered = text[start:end]
        if rendered.count(_ANSWER) != 1 or not reply.startswith(rendered[:rendered.index(_ANSWER)]):
            raise RenderError(f"turn {i}: the reasoning cannot be told apart from the answer in the rendered reply; "
                              "set data.train_reasoning=true")
        return rendered.index(_ANSWER)

    def _check_fields(self, msgs: list[dict[str, Any]], tools: list[dict] | None) -> None:
        """A field the template would not render (reasoning, tool calls, tool results, tool definitions) is an error,
        not a silent drop."""
        if tools and not self.renders["tools"]:
            raise RenderError("tools: the chat template does not render tool definitions; use a template that does "
                              "(data.template=qwen, llama3, gemma, mistral)")
        for i, m in enumerate(msgs):
            if m.get("reasoning_content") and not self.renders["reasoning_content"]:
                raise RenderError(f"messages.{i}.reasoning_content: the chat template does not render it, so the "
                                  "reasoning would be lost; use a template that does (data.template=qwen) or write it "
                                  "inline in content as <think>...</think>")
            if m.get("tool_calls") and not self.renders["tool_calls"]:
                raise RenderError(f"messages.{i}.tool_calls: the chat template does not render tool calls; use a "
                                  "template that does (data.template=qwen, llama3, mistral)")
            if m["role"] == "tool" and not self.renders["tool"]:
                raise RenderError(f"messages.{i}: the chat template does not render tool messages; use a template "
                                  "that does (data.template=qwen, llama3, mistral)")
            if m["role"] == "tool" and self.train_on == "all":
                raise RenderError(f"messages.{i}: a tool result, which is never trained, but data.train_on=all trains "
                                  "every token; set data.train_on=assistant")

    def _probe_fields(self) -> dict[str, bool]:
        """Which of the optional message fields the template renders at all."""
        call = {"type": "function", "function": {"name": _PROBE, "arguments": {}}}
        q = {"role": "user", "content": "q"}
        probes = {
            "reasoning_content": [q, {"role": "assistant", "content": "a", "reasoning_content": _PROBE}],
            "tool_calls": [q, {"role": "assistant", "content": "", "tool_calls": [call]}],
            "tool": [q, {"role": "assistant", "content": "", "tool_calls": [dict(call, function={"name": "f",
                     "arguments": {}})]}, {"role": "tool", "content": _PROBE}, {"role": "assistant", "content": "a"}],
        }
        found = {}
        for name, msgs in probes.items():
            try:
                found[name] = _PROBE in self.render(msgs)
            except Exception:  # noqa: BLE001 - a template that refuses the field does not render it
                found[name] = False
        try:
            found["tools"] = _PROBE in self.render(probes["reasoning_content"][:1], tools=[dict(call, function={
                "name": _PROBE, "description": "d", "parameters": {"type": "object", "properties": {}}})])
        except Exception:  # noqa: BLE001
            found["tools"] = False
        return found

    # -----------------------------------------------------------------------------------------
    # Tokens and labels

    def encode_sequences(self, convs: Sequence[Conversation]) -> list[list[Example] | Problem]:
        """The sequences of each conversation (one, or one per trained turn), in order; a conversation that
        cannot be encoded gives a Problem."""
        out: list[list[Example] | Problem] = []
        jobs: list[Rendering] = []
        counts: list[int] = []
        for conv in convs:
            try:
                rs = self.renderings(conv)
            except RenderError as e:
                out.append(Problem(conv.file, conv.line, "", e.reason, e.kind))
                counts.append(0)
                continue
            out.append([])
            jobs += rs
            counts.append(len(rs))
        encode = self._encode_by_pieces if self.split_exact else self._encode_by_offsets
        examples = iter(encode(jobs))
        for conv, group, n in zip(convs, out, counts):
            for _ in range(n):
                ex = next(examples)
                ex.file, ex.line = conv.file, conv.line
                group.append(ex)  # type: ignore[union-attr]
        return out

    def encode_many(self, convs: Sequence[Conversation]) -> list[Example | Problem]:
        """One example per conversation, in order, for uses that need exactly one (preference pairs, replay,
        preview); a conversation that cannot be encoded, or that trains as several sequences, gives a Problem."""
        out: list[Example | Problem] = []
        for conv, res in zip(convs, self.encode_sequences(convs)):
            if isinstance(res, Problem) or len(res) == 1:
                out.append(res if isinstance(res, Problem) else res[0])
                continue
            out.append(Problem(conv.file, conv.line, "", f"the chat template renders earlier turns differently, so "
                               f"this conversation trains as {len(res)} sequences (one per assistant turn); here one "
                               "sequence per conversation is needed: set data.train_on=last_assistant",
                               "template mismatch"))
        return out

    def _encode_by_pieces(self, jobs: list[Rendering]) -> list[Example]:
        pieces: list[str] = []
        layout: list[tuple[int, list[bool]]] = []  # (first piece, trained flag per piece)
        for r in jobs:
            first = len(pieces)
            cuts = [0] + r.cuts + [len(r.text)]
            trained = []
            for j in range(len(cuts) - 1):
                if cuts[j + 1] > cuts[j]:
                    pieces.append(r.text[cuts[j]:cuts[j + 1]])
                    trained.append(r.piece_trained(cuts[j]))
            layout.append((first, trained))
        ids = self._ids(pieces)
        examples = []
        for r, (first, trained) in zip(jobs, layout):
            parts = ids[first:first + len(trained)]
            if r.plain:  # text format: BOS? + text + EOS, all trained
                seq = np.asarray(self.text_prefix_ids + parts[0] + [self.eos_id], dtype=np.int64)
                examples.append(Example(seq, seq.copy()))
                continue
            seq = np.fromiter(chain.from_iterable(parts), dtype=np.int64, count=sum(map(len, parts)))
            labels = np.full(len(seq), IGNORE, dtype=np.int64)
            at = 0
            for part, train in zip(parts, trained):
                if train:
                    labels[at:at + len(part)] = seq[at:at + len(part)]
                at += len(part)
            examples.append(Example(seq, labels))
        return examples

    def _encode_by_offsets(self, jobs: list[Rendering]) -> list[Example]:
        texts = [r.text for r in jobs]
        enc = self.tok(texts, add_special_tokens=False, return_offsets_mapping=True) if texts else {}
        examples = []
        for j, r in enumerate(jobs):
            seq = np.asarray(enc["input_ids"][j], dtype=np.int64)
            if r.plain:
                seq = np.concatenate([np.asarray(self.text_prefix_ids, dtype=np.int64), seq, [self.eos_id]])
                examples.append(Example(seq, seq.copy()))
                continue
            starts = np.fromiter((s for s, _ in enc["offset_mapping"][j]), dtype=np.int64, count=len(seq))
            trained = np.zeros(len(seq), dtype=bool)
            for a, b in r.trained:
                trained |= (starts >= a) & (starts < b)
            examples.append(Example(seq, np.where(trained, seq, IGNORE)))
        return examples

    def encode(self, conv: Conversation) -> Example:
        """One conversation as one sequence; a problem is raised as a DataError naming its file and line."""
        (result,) = self.encode_many([conv])
        if isinstance(result, Problem):
            raise DataError(result.message)
        return result

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a prompt ending with the generation prompt, for inference."""
        text = self.render(messages, add_generation_prompt=True)
        return self.tok(text, add_special_tokens=False)["input_ids"]


_ANSWER = "\ue000answer\ue001"
_PROBE = "\ue000probe\ue001"


def _answer_start(content: str) -> int:
    """Where the answer starts in a content with inline reasoning (`<think>...</think>` and the line breaks after
    it, which Qwen3's template strips too)."""
    k = content.rfind("</think>")
    if k < 0:
        return 0
    k += len("</think>")
    return k + (len(content[k:]) - len(content[k:].lstrip("\n")))


def _check_template_tokens(tok, template: str, base: bool) -> None:
    """A built-in template's turn markers against the vocabulary: the token that ends a reply must be one (else a
    fine-tuned model could not learn to stop); other markers that are not are written as plain text, and a base
    model (its tokenizer has no chat template) has most likely never seen the ones that are in pre-training, and
    LoRA does not train their embeddings: both said once."""
    markers = TEMPLATE_TOKENS.get(template)
    if markers is None:
        return
    vocab = tok.get_vocab()
    eot = END_OF_TURN[template]
    if eot is not None and eot not in vocab:
        fits = ", ".join(name for name, e in END_OF_TURN.items() if e is None or e in vocab)
        raise DataError(f"data.template={template} ends a reply with {eot}, which is not a token of this tokenizer, so "
                        f"a fine-tuned model could not learn to stop; use a template whose end-of-turn token it has "
                        f"({fits}) or a .jinja file")
    missing = [t for t in markers if t not in vocab]
    known = [t for t in markers if t in vocab]
    said = [f"{', '.join(missing)} are not tokens of its vocabulary (written as plain text)"] if missing else []
    if base and known:
        said.append(f"{', '.join(known)} are in its vocabulary, but it has most likely never seen them in "
                    "pre-training, and LoRA does not train their embeddings")
    if said:
        who = "the model has no chat template of its own (a base model); " if base else ""
        log_once(log, f"{who}data.template={template} marks turns with {', '.join(markers)}: {'; '.join(said)}; "
                      "expect more steps before replies stop cleanly")
