"""The tokenized-data cache: one Arrow file per dataset under $QFLASH_HOME/data-cache/<key>/.

The key hashes everything the tokens depend on: the bytes of every data file, the tokenizer files
and the chat template in use, the dataset's format settings, the data settings that change tokens
(vars, max_len, too_long, train_on, template, encoding), the versions of transformers and tokenizers, and
CACHE_VERSION (raise it whenever this package changes how data becomes tokens). It can be computed
from the model directory without loading the tokenizer, so a cache hit costs no tokenizer load.

An entry is written into a temporary directory and renamed into place, so a reader never sees a
half-written entry and two writers cannot mix their files. The Arrow file is an IPC stream, the
format `datasets` uses: `datasets.Dataset.from_file(path)` opens it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np

from qflash.paths import sha256_file
from qflash.config import DataConfig, DatasetSpec
from qflash.data.problems import Problem
from qflash.data.table import ExampleTable
from qflash.data.template import template_source

CACHE_VERSION = 5  # 5: conversations of templates that are not prefix-stable train as one sequence per turn
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json",
)
ARROW_FILE = "examples.arrow"
META_FILE = "meta.json"
PROBLEMS_FILE = "problems.jsonl"


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("transformers", "tokenizers"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "none"
    return out


def file_chat_template(model_dir: Path) -> str | None:
    """The chat template a tokenizer loaded from model_dir carries: chat_template.jinja, else tokenizer_config's."""
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config = model_dir / "tokenizer_config.json"
    if config.is_file():
        value = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
        if isinstance(value, list):  # [{"name": ..., "template": ...}]
            value = next((t.get("template") for t in value if t.get("name") == "default"), None)
        return value if isinstance(value, str) else None
    return None


def tokenizer_identity(model_dir: Path, template_text: str | None) -> str:
    """Hash of the tokenizer files of a model directory and of the chat template in use."""
    h = hashlib.sha256()
    for name in TOKENIZER_FILES:
        p = model_dir / name
        if p.is_file():
            h.update(f"{name}:{sha256_file(p)}\n".encode())
    h.update((template_text or "").encode())
    return h.hexdigest()[:20]


def tokenizer_identity_for_dir(model_dir: Path, template: str | None) -> str:
    """The identity a ChatRenderer built from this directory would have (data.template = `template`)."""
    text = template_source(template) if template else file_chat_template(model_dir)
    return tokenizer_identity(model_dir, text)


def renderer_identity(renderer) -> str:
    """The identity of a live renderer: its tokenizer's files when it came from a directory, else its vocab."""
    source = Path(str(getattr(renderer.tok, "name_or_path", "") or ""))
    if source.is_dir() and (source / "tokenizer_config.json").is_file():
        return tokenizer_identity(source, renderer.template_text)
    h = hashlib.sha256(json.dumps(sorted(renderer.tok.get_vocab().items())).encode())
    h.update(renderer.template_text.encode())
    return h.hexdigest()[:20]


def dataset_key(spec: DatasetSpec, cfg: DataConfig, files: list[Path], tok_identity: str) -> str:
    """The cache key of one dataset (see the module docstring for what goes in)."""
    what = {
        "version": CACHE_VERSION,
        "libraries": _versions(),
        "tokenizer": tok_identity,
        "files": [[str(f), sha256_file(f)] for f in files],
        "format": [spec.format, spec.columns, spec.prompt_template],
        "data": [cfg.vars, cfg.max_len, cfg.too_long, cfg.train_on, cfg.template, cfg.encoding],
    }
    if not cfg.train_reasoning:  # only then, so the keys of the default setting stay as they were
        what["train_reasoning"] = False
    return hashlib.sha256(json.dumps(what, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:24]


@dataclass
class CachedDataset:
    """What the cache holds for one dataset: everything but the settings applied afterwards."""

    examples: ExampleTable
    records: int
    problems: list[Problem]
    dropped: list[Problem]
    truncated: int
    encodings: dict[str, str] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)
    formats: dict[str, int] = field(default_factory=dict)
    split: int = 0
    pieces: int = 0


def save(cache_dir: Path, key: str, data: CachedDataset) -> Path:
    """Write an entry atomically; if another process wrote the same key first, keep theirs."""
    import pyarrow as pa

    final = cache_dir / key
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=cache_dir))
    try:
        t = data.examples
        offsets = pa.array(t.bounds.astype(np.int64), type=pa.int64())
        table = pa.table({
            "input_ids": pa.LargeListArray.from_arrays(offsets, pa.array(t.ids.astype(np.int32, copy=False))),
            "labels": pa.LargeListArray.from_arrays(offsets, pa.array(t.labels.astype(np.int32, copy=False))),
            "file": pa.array(t.file_of, type=pa.int32()),
            "line": pa.array(t.lines, type=pa.int64()),
        })
        with pa.OSFile(str(tmp / ARROW_FILE), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        meta = {
            "version": CACHE_VERSION, "records": data.records, "truncated": data.truncated, "files": t.files,
            "encodings": data.encodings, "ignored": data.ignored, "problems": len(data.problems),
            "formats": data.formats, "split": data.split, "pieces": data.pieces,
        }
        (tmp / META_FILE).write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")
        with open(tmp / PROBLEMS_FILE, "w", encoding="utf-8", errors="backslashreplace") as f:
            for p in data.problems + data.dropped:
                f.write(json.dumps(p.to_json(), ensure_ascii=False, default=str) + "\n")
        try:
            os.replace(tmp, final)  # atomic: the entry appears whole or not at all
        except OSError:
            if not (final / META_FILE).is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process won the race; keep theirs
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def load(cache_dir: Path, key: str) -> CachedDataset | None:
    """The entry for `key`, or None when there is none (or it is unreadable, then it is rebuilt)."""
    import pyarrow as pa

    entry = cache_dir / key
    if not (entry / META_FILE).is_file():
        return None
    try:
        meta = json.loads((entry / META_FILE).read_text(encoding="utf-8"))
        with pa.memory_map(str(entry / ARROW_FILE)) as source:
            table = pa.ipc.open_stream(source).read_all()
        # split("\n"), not splitlines(): a record's text may hold U+2028, U+2029 or U+0085 unescaped.
        problems = [Problem.from_json(json.loads(line))
                    for line in (entry / PROBLEMS_FILE).read_text(encoding="utf-8").split("\n") if line]
    except (OSError, ValueError, KeyError, pa.ArrowException):
        return None
    ids = table.column("input_ids").combine_chunks()
    labels = table.column("labels").combine_chunks()
    # Zero-copy views of the memory-mapped file: a cache hit does no per-sample work.
    examples = ExampleTable(
        ids.values.to_numpy(), labels.values.to_numpy(), ids.offsets.to_numpy(), meta["files"],
        table.column("file").to_numpy(), table.column("line").to_numpy(),
    )
    n = meta["problems"]
    return CachedDataset(examples, meta["records"], problems[:n], problems[n:], meta["truncated"],
                         meta["encodings"], meta["ignored"], meta.get("formats", {}), meta.get("split", 0),
                         meta.get("pieces", 0))
