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
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime
from itertools import chain
from typing import Any, Sequence

import numpy as np

from qflash.data.formats import Conversation
from qflash.data.problems import Problem, ProblemKind
from qflash.errors import DataError

log = logging.getLogger(__name__)

IGNORE = -100

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TEMPLATES = {"chatml": CHATML}

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

    def __init__(self, tokenizer, template: str | None = None, train_on: str = "assistant"):
        if template is not None and template not in TEMPLATES:
            raise DataError(f"data.template: unknown template {template!r}; known: {', '.join(TEMPLATES)}")
        source = TEMPLATES[template] if template else getattr(tokenizer, "chat_template", None)
        if isinstance(source, dict):  # several named templates: the one apply_chat_template uses
            source = source.get("default")
        if not source:
            raise DataError(
                "the tokenizer has no chat template; set data.template=chatml (or use a model that ships one)"
            )
        self.tok = tokenizer
        self.template = template
        self.template_text: str = source
        self.train_on = train_on
        self._setup()

    # The compiled template does not pickle; worker processes rebuild it.
    def __getstate__(self) -> dict:
        return {"tok": self.tok, "template": self.template, "template_text": self.template_text,
                "train_on": self.train_on}

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

    def _apply_chat_template(self, messages, add_generation_prompt):
        return self.tok.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=self.template_text
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

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        if self._compiled is None:
            return self._apply_chat_template(messages, add_generation_prompt)
        return self._compiled.render(
            messages=messages, tools=None, documents=None, add_generation_prompt=add_generation_prompt, **self._kwargs
        )

    def _render_or_fail(self, messages, add_generation_prompt=False) -> str:
        import jinja2

        try:
            return self.render(messages, add_generation_prompt)
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

    def _reply_bounds(self, msgs: list[dict[str, str]], full: str, i: int) -> tuple[int, int]:
        """(start, end) of assistant turn i in `full`, by rendering its prompt and its prefix."""
        prompt = self._render_or_fail(msgs[:i], add_generation_prompt=True)
        upto = self._render_or_fail(msgs[: i + 1])
        if not upto.startswith(prompt) or not full.startswith(upto):
            raise RenderError(
                f"turn {i}: the chat template rewrites earlier turns when later ones are added, "
                "so the reply cannot be located exactly; set data.template=chatml"
            )
        end = upto.rfind(self.eot_text)
        if end < len(prompt):
            raise RenderError(f"turn {i}: no {self.eot_text} after the reply in the rendered template")
        return len(prompt), end + len(self.eot_text)

    def _skeleton(self, roles: tuple[str, ...]) -> _Skeleton | None:
        """The skeleton of a role sequence, None if the template does not show each content once."""
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
        """The rendered text and the character span of every assistant reply (with its end-of-turn)."""
        msgs = conv.messages
        full = self._render_or_fail(msgs)
        sk = self._skeleton(tuple(m["role"] for m in msgs))
        if sk is not None:
            contents = [msgs[i]["content"] for i in sk.order]
            if full == "".join(chain.from_iterable(zip(sk.pieces, contents + [""]))):
                shift = [0]
                for c, i in zip(contents, sk.order):
                    shift.append(shift[-1] + len(c) - len(_PLACEHOLDER.format(i)))
                pos = [b + shift[k] for b, k in sk.boundaries]
                return full, list(zip(pos[::2], pos[1::2]))
        # The template did not insert the contents verbatim: locate each reply by rendering prefixes.
        return full, [self._reply_bounds(msgs, full, i) for i, m in enumerate(msgs) if m["role"] == "assistant"]

    def assistant_spans(self, conv: Conversation, full: str | None = None) -> list[tuple[int, int]]:
        """Character spans that carry loss (per data.train_on)."""
        _, spans = self.reply_spans(conv)
        return spans[-1:] if self.train_on == "last_assistant" else spans

    # -----------------------------------------------------------------------------------------
    # Tokens and labels

    def encode_many(self, convs: Sequence[Conversation]) -> list[Example | Problem]:
        """Examples of the conversations, in order; a conversation that cannot be encoded gives a Problem."""
        out: list[Example | Problem | None] = [None] * len(convs)
        jobs: list[tuple[int, str, list[tuple[int, int]]]] = []  # (index, text, spans); spans None = text format
        for k, conv in enumerate(convs):
            if conv.text is not None:
                jobs.append((k, conv.text, None))
                continue
            try:
                full, spans = self.reply_spans(conv)
            except RenderError as e:
                out[k] = Problem(conv.file, conv.line, "", e.reason, e.kind)
                continue
            jobs.append((k, full, spans))
        encode = self._encode_by_pieces if self.split_exact else self._encode_by_offsets
        for (k, _, _), ex in zip(jobs, encode(jobs)):
            ex.file, ex.line = convs[k].file, convs[k].line
            out[k] = ex
        return out  # type: ignore[return-value]

    def _encode_by_pieces(self, jobs) -> list[Example]:
        pieces: list[str] = []
        layout: list[tuple[int, list[bool]]] = []  # (first piece, trained flag per piece)
        for _, text, spans in jobs:
            first = len(pieces)
            if spans is None:
                pieces.append(text)
                layout.append((first, [True]))
                continue
            # Every reply is cut out whatever train_on says, so the ids never depend on it; only labels do.
            cuts = [0] + [b for span in spans for b in span] + [len(text)]
            last_reply = 2 * len(spans) - 1
            trained = []
            for j in range(len(cuts) - 1):
                if cuts[j + 1] > cuts[j]:
                    pieces.append(text[cuts[j]:cuts[j + 1]])
                    trained.append(self._trains(j, last_reply))
            layout.append((first, trained))
        ids = self._ids(pieces)
        examples = []
        for (_, _, spans), (first, trained) in zip(jobs, layout):
            parts = ids[first:first + len(trained)]
            if spans is None:  # text format: BOS? + text + EOS, all trained
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

    def _trains(self, piece: int, last_reply: int) -> bool:
        """Does piece number `piece` of a conversation carry loss? Odd pieces are replies."""
        if self.train_on == "all":
            return True
        if self.train_on == "last_assistant":
            return piece == last_reply
        return piece % 2 == 1

    def _encode_by_offsets(self, jobs) -> list[Example]:
        texts = [text for _, text, _ in jobs]
        enc = self.tok(texts, add_special_tokens=False, return_offsets_mapping=True) if texts else {}
        examples = []
        for j, (_, _, spans) in enumerate(jobs):
            seq = np.asarray(enc["input_ids"][j], dtype=np.int64)
            if spans is None:
                seq = np.concatenate([np.asarray(self.text_prefix_ids, dtype=np.int64), seq, [self.eos_id]])
                examples.append(Example(seq, seq.copy()))
                continue
            if self.train_on == "all":
                examples.append(Example(seq, seq.copy()))
                continue
            starts = np.fromiter((s for s, _ in enc["offset_mapping"][j]), dtype=np.int64, count=len(seq))
            trained = np.zeros(len(seq), dtype=bool)
            for a, b in spans[-1:] if self.train_on == "last_assistant" else spans:
                trained |= (starts >= a) & (starts < b)
            examples.append(Example(seq, np.where(trained, seq, IGNORE)))
        return examples

    def encode(self, conv: Conversation) -> Example:
        """One conversation; a problem is raised as a DataError naming its file and line."""
        (result,) = self.encode_many([conv])
        if isinstance(result, Problem):
            raise DataError(result.message)
        return result

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a prompt ending with the generation prompt, for inference."""
        text = self.render(messages, add_generation_prompt=True)
        return self.tok(text, add_special_tokens=False)["input_ids"]
