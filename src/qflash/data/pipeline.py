"""From the config's datasets to tokenized examples, with statistics and a fingerprint."""

from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

from qflash.config import DataConfig, DatasetSpec
from qflash.data.formats import Conversation, to_conversation
from qflash.data.readers import read_file
from qflash.data.template import ChatRenderer, Example
from qflash.errors import DataError


@dataclass
class DataStats:
    records: int = 0
    examples: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    longest: int = 0
    per_file: dict[str, int] = field(default_factory=dict)

    def add(self, ex: Example) -> None:
        self.examples += 1
        self.tokens += len(ex.input_ids)
        self.trained_tokens += ex.n_trained
        self.longest = max(self.longest, len(ex.input_ids))


def load_conversations(spec: DatasetSpec, variables: dict[str, str]) -> list[Conversation]:
    return [to_conversation(rec, spec.format, variables) for rec in read_file(spec.path)]


def encode_all(convs: list[Conversation], renderer: ChatRenderer, max_len: int) -> list[Example]:
    out = []
    for conv in convs:
        ex = renderer.encode(conv)
        if len(ex.input_ids) > max_len:
            raise DataError(
                f"{conv.where}: sample is {len(ex.input_ids)} tokens, longer than data.max_len={max_len}; "
                "raise data.max_len or shorten the sample"
            )
        if ex.n_trained == 0:
            raise DataError(f"{conv.where}: no trained tokens after rendering; check the roles of its turns")
        out.append(ex)
    return out


def _apply_weight(examples: list[Example], weight: float, seed: int) -> list[Example]:
    """weight 2 = every example twice per epoch; 0.5 = a fixed random half."""
    whole = math.floor(weight)
    out = examples * whole
    frac = weight - whole
    if frac > 0:
        rng = random.Random(seed)
        out += rng.sample(examples, round(frac * len(examples)))
    return out


def build_examples(
    cfg: DataConfig, renderer: ChatRenderer, *, split: str = "train", seed: int = 0
) -> tuple[list[Example], DataStats]:
    specs = cfg.datasets if split == "train" else cfg.eval_datasets
    stats = DataStats()
    examples: list[Example] = []
    for i, spec in enumerate(specs):
        convs = load_conversations(spec, cfg.vars)
        stats.records += len(convs)
        exs = encode_all(convs, renderer, cfg.max_len)
        exs = _apply_weight(exs, spec.weight, seed + i)
        stats.per_file[spec.path] = len(exs)
        examples += exs
    for ex in examples:
        stats.add(ex)
    return examples, stats


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tokenizer_fingerprint(tok) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(sorted(tok.get_vocab().items())).encode())
    h.update((tok.chat_template or "").encode())
    return h.hexdigest()[:16]


def data_fingerprint(cfg: DataConfig, tok) -> dict:
    """What the tokenized data depends on: file contents, tokenizer, template and settings."""
    files = {
        spec.path: _sha256_file(Path(spec.path)) for spec in cfg.datasets + cfg.eval_datasets if Path(spec.path).is_file()
    }
    settings = {
        "datasets": [[s.path, s.format, s.weight] for s in cfg.datasets],
        "eval_datasets": [[s.path, s.format, s.weight] for s in cfg.eval_datasets],
        "vars": cfg.vars,
        "max_len": cfg.max_len,
        "template": cfg.template,
        "train_on": cfg.train_on,
    }
    tok_fp = tokenizer_fingerprint(tok)
    digest = hashlib.sha256(json.dumps([files, settings, tok_fp], sort_keys=True).encode()).hexdigest()
    return {"fingerprint": digest[:16], "files": files, "tokenizer": tok_fp, "settings": settings}
