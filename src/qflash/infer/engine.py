"""The generation layer chat, generate, serve and the evals share.

Decoding is transformers' `generate` (KV cache, logits processors); this module decides what goes in
(sampling options, the stop tokens of the chat template, left-padded batches, a history that fits the
context window) and what comes out (text, finish reason, token counts, streamed text deltas).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Callable, Literal

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from qflash.errors import QflashError
from qflash.infer.options import MessageError, SamplingOptions

log = logging.getLogger(__name__)

FALLBACK_CONTEXT = 2048  # for a model config that names no context length


@dataclass
class Completion:
    text: str
    finish_reason: Literal["stop", "length"]
    """stop: the model ended its turn (end-of-turn or eos token); length: max_new_tokens ran out."""
    prompt_tokens: int
    completion_tokens: int
    """Generated tokens, the end-of-turn token included."""


class ContextOverflow(QflashError):
    """A prompt that leaves no room for a reply in the context window."""


class Cancelled(QflashError):
    """Generation stopped early because its cancel event was set (the server is shutting down, the client left)."""

    generated: int = 0
    """Tokens generated before the stop (what the cancelled work cost)."""


class _CancelCriterion(StoppingCriteria):
    """Ends generation at the next token once the event is set (checked once per generated token)."""

    def __init__(self, event: threading.Event):
        self.event, self.fired, self.steps = event, False, 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        self.steps += 1  # called once per generated token
        self.fired = self.fired or self.event.is_set()
        return torch.full((input_ids.shape[0],), self.fired, dtype=torch.bool, device=input_ids.device)


@dataclass
class Fitted:
    """A conversation cut to fit the context window, and its prompt token ids."""

    messages: list[dict[str, str]]
    ids: list[int]
    dropped: int
    """How many of the oldest messages were left out."""


class _DeltaStreamer:
    """Receives generated token ids from `generate` and hands complete text to `on_text`.

    Text is decoded from all reply tokens so far and only the new suffix is emitted, and only once it
    no longer ends in U+FFFD: a character split across tokens (Chinese, emoji) is held back until its
    last byte arrives, so no delta ever carries half a character.
    """

    def __init__(self, engine: "Engine", on_text: Callable[[str], None]):
        self.engine, self.on_text = engine, on_text
        self.ids: list[int] = []
        self.sent = ""
        self.prompt_seen = False
        self.stopped = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate pushes the prompt first
            self.prompt_seen = True
            return
        for t in value.reshape(-1).tolist():
            if self.stopped:
                break
            if t in self.engine.stop_ids:
                self.stopped = True
            else:
                self.ids.append(t)
        self._emit(final=False)

    def end(self) -> None:
        self._emit(final=True)

    def _emit(self, final: bool) -> None:
        text = self.engine.decode(self.ids)
        if text.endswith("\ufffd"):
            if not final:
                return
            text = text.rstrip("\ufffd")  # a character whose last bytes were never generated
        if not text.startswith(self.sent):
            # Decoding more tokens changed text already shown (not seen with byte-level BPE); the
            # remainder cannot be expressed as a delta, so it is held back rather than sent garbled.
            log.warning("streamed text was revised by later tokens; the rest of this reply is not streamed")
            return
        delta = text[len(self.sent):]
        if delta:
            self.sent = text
            self.on_text(delta)


class Engine:
    """Generation for one loaded model (qflash.infer.generate.LoadedModel)."""

    def __init__(self, loaded, context_window: int | None = None):
        self.loaded = loaded
        self.model, self.tok, self.renderer = loaded.model, loaded.tokenizer, loaded.renderer
        self.stop_ids = sorted({self.renderer.eot_id, self.tok.eos_token_id} - {None})
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.stop_ids[0]
        self.context_window = context_window or model_context_window(self.model)

    # ------------------------------------------------------------------------------------------
    # Prompts

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def reply_text(self, ids: list[int]) -> str:
        """The text of reply tokens, less a trailing partial character (cut off by max_new_tokens)."""
        return self.decode(ids).rstrip("\ufffd")

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        import jinja2

        try:
            return self.renderer.prompt_ids(messages)
        except jinja2.TemplateError as e:
            raise MessageError("messages", f"the chat template refuses this conversation: {e}") from None

    def fit(self, messages: list[dict[str, str]], max_new_tokens: int) -> Fitted:
        """The conversation with its oldest turns dropped until prompt + max_new_tokens fits the window.

        System messages are never dropped, nor the last message. Dropping stops at a user message so the
        remaining history still alternates user/assistant as chat templates expect.
        """
        budget = self.context_window - max_new_tokens
        ids = self.prompt_ids(messages)
        kept = list(messages)
        dropped = 0
        while len(ids) > budget:
            history = [i for i, m in enumerate(kept[:-1]) if m["role"] != "system"]
            if not history:
                raise ContextOverflow(
                    f"the message is {len(ids)} tokens with what must be kept (system prompt + last message); "
                    f"the context window is {self.context_window} tokens and {max_new_tokens} are reserved for "
                    "the reply: shorten it or ask for fewer new tokens"
                )
            kept.pop(history[0])
            dropped += 1
            while True:  # keep dropping up to the next user turn
                rest = [i for i, m in enumerate(kept[:-1]) if m["role"] != "system"]
                if not rest or kept[rest[0]]["role"] == "user":
                    break
                kept.pop(rest[0])
                dropped += 1
            ids = self.prompt_ids(kept)
        return Fitted(kept, ids, dropped)

    def _reply_budget(self, prompt_len: int, max_new_tokens: int) -> int:
        room = self.context_window - prompt_len
        if room < 1:
            raise ContextOverflow(
                f"the prompt is {prompt_len} tokens; the context window is {self.context_window}: no room for a reply"
            )
        return min(max_new_tokens, room)

    # ------------------------------------------------------------------------------------------
    # Generation

    def _generate_kwargs(self, opts: SamplingOptions, max_new_tokens: int) -> dict:
        kw: dict = {
            "max_new_tokens": max_new_tokens,
            "eos_token_id": self.stop_ids,
            "pad_token_id": self.pad_id,
            "repetition_penalty": opts.repetition_penalty,
            "do_sample": not opts.greedy,
        }
        if not opts.greedy:
            # top_k=0 explicitly: otherwise transformers' default top_k=50 (or the model's
            # generation_config.json) would cut the distribution too. Greedy decoding applies no warpers.
            kw.update(temperature=opts.temperature, top_p=opts.top_p, top_k=0)
        return kw

    # no_grad, not inference_mode: the model that generates may be trained next (replay answers come from the
    # model about to be trained), and a tensor that a layer creates or caches under inference mode can never
    # be saved for backward. Generation must leave nothing behind that depends on whether it ran first.
    @torch.no_grad()
    def complete(
        self, prompt_ids: list[int], opts: SamplingOptions, on_text: Callable[[str], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> Completion:
        """One reply; with on_text, its text is handed over in pieces as it is generated.

        An exception raised by on_text (a closed connection, Ctrl-C) stops generation and propagates.
        cancel: once set, generation stops within a token and Cancelled is raised instead of a reply.
        """
        max_new = self._reply_budget(len(prompt_ids), opts.max_new_tokens)
        streamer = _DeltaStreamer(self, on_text) if on_text is not None else None
        stop = _CancelCriterion(cancel) if cancel is not None else None
        if opts.seed is not None:
            torch.manual_seed(opts.seed)
        ids = torch.tensor([prompt_ids], dtype=torch.long, device=self.loaded.device)
        with self.loaded.compute():
            out = self.model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), streamer=streamer,
                stopping_criteria=StoppingCriteriaList([stop]) if stop is not None else None,
                **self._generate_kwargs(opts, max_new),
            )
        if stop is not None and stop.fired:
            cancelled = Cancelled("generation cancelled")
            cancelled.generated = stop.steps
            raise cancelled
        return self._completion(out[0, len(prompt_ids):].tolist(), len(prompt_ids))

    @torch.no_grad()
    def complete_batch(self, prompts: list[list[int]], opts: SamplingOptions) -> list[Completion]:
        """Replies to several prompts in one left-padded batch (generation starts at the same column)."""
        if not prompts:
            return []
        width = max(len(p) for p in prompts)
        max_new = self._reply_budget(width, opts.max_new_tokens)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, p in enumerate(prompts):
            ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[row, width - len(p):] = 1
        if opts.seed is not None:
            torch.manual_seed(opts.seed)
        with self.loaded.compute():
            out = self.model.generate(
                input_ids=ids.to(self.loaded.device), attention_mask=mask.to(self.loaded.device),
                **self._generate_kwargs(opts, max_new),
            )
        return [self._completion(row, len(p)) for row, p in zip(out[:, width:].tolist(), prompts)]

    def _completion(self, generated: list[int], prompt_len: int) -> Completion:
        """Cut a generated row at its first stop token (what follows is padding of a finished row)."""
        cut = next((k for k, t in enumerate(generated) if t in self.stop_ids), None)
        if cut is None:
            return Completion(self.reply_text(generated), "length", prompt_len, len(generated))
        return Completion(self.reply_text(generated[:cut]), "stop", prompt_len, cut + 1)


def model_context_window(model) -> int:
    """The context length the model was built for (max_position_embeddings), else FALLBACK_CONTEXT."""
    cfg = model.config
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    n = getattr(cfg, "max_position_embeddings", None)
    if isinstance(n, int) and n > 0:
        return n
    log.warning("the model config names no max_position_embeddings; assuming a context window of %d tokens",
                FALLBACK_CONTEXT)
    return FALLBACK_CONTEXT
