"""Rendering conversations with the tokenizer's chat template, and exact assistant-only labels.

How the labels are found: the conversation is rendered once in full, and once up to each
assistant turn (prompt = turns before it + generation prompt; upto = turns including it). The
template must only append (upto starts with prompt, the full text starts with upto), so the
assistant's reply occupies exactly the characters [len(prompt), end of its end-of-turn token) of
the full text. Tokens whose first character falls in such a span are trained; the newline a
template may put after the end-of-turn token is not. No marker strings are searched for in the
content, so a reply that itself contains "assistant" or "<|im_start|>" cannot shift the mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qflash.data.formats import Conversation
from qflash.errors import DataError

IGNORE = -100

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TEMPLATES = {"chatml": CHATML}

_SENTINEL = "QFLASH_SENTINEL_REPLY"


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    file: str = ""
    line: int = 0

    @property
    def n_trained(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


class ChatRenderer:
    """Renders conversations for one tokenizer and computes their labels."""

    def __init__(self, tokenizer, template: str | None = None, train_on: str = "assistant"):
        if template:
            tokenizer.chat_template = TEMPLATES[template]
        if not getattr(tokenizer, "chat_template", None):
            raise DataError(
                "the tokenizer has no chat template; set data.template=chatml (or use a model that ships one)"
            )
        self.tok = tokenizer
        self.train_on = train_on
        self.eot_text = self._find_end_of_turn()
        self.eot_id = tokenizer.convert_tokens_to_ids(self.eot_text)

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

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

    def assistant_spans(self, conv: Conversation, full: str) -> list[tuple[int, int]]:
        msgs = conv.messages
        spans = []
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            prompt = self.render(msgs[:i], add_generation_prompt=True)
            upto = self.render(msgs[: i + 1])
            if not upto.startswith(prompt) or not full.startswith(upto):
                raise DataError(
                    f"{conv.where}: turn {i}: the chat template rewrites earlier turns when later ones are added, "
                    "so the reply cannot be located exactly; set data.template=chatml"
                )
            reply = upto[len(prompt):]
            start = reply.find(m["content"].strip()[:32]) if m["content"].strip() else 0
            if start < 0:
                raise DataError(f"{conv.where}: turn {i}: the chat template changed the reply text; cannot mask it")
            end = reply.rfind(self.eot_text)
            if end < start:
                raise DataError(f"{conv.where}: turn {i}: no {self.eot_text} after the reply in the rendered template")
            spans.append((len(prompt) + start, len(prompt) + end + len(self.eot_text)))
        if self.train_on == "last_assistant":
            spans = spans[-1:]
        return spans

    def encode(self, conv: Conversation) -> Example:
        full = self.render(conv.messages)
        enc = self.tok(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        if self.train_on == "all":
            return Example(list(ids), list(ids), conv.file, conv.line)
        starts = np.fromiter((s for s, _ in enc["offset_mapping"]), dtype=np.int64, count=len(ids))
        trained = np.zeros(len(ids), dtype=bool)
        for a, b in self.assistant_spans(conv, full):
            trained |= (starts >= a) & (starts < b)
        ids_arr = np.asarray(ids, dtype=np.int64)
        labels = np.where(trained, ids_arr, IGNORE)
        return Example(ids_arr.tolist(), labels.tolist(), conv.file, conv.line)

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a prompt ending with the generation prompt, for inference."""
        text = self.render(messages, add_generation_prompt=True)
        return self.tok(text, add_special_tokens=False)["input_ids"]
