"""A model's safetensors read tensor by tensor, and merged shards written one at a time.

Reading: safetensors' `safe_open` maps the file, and every page a read touches stays resident (and
counted in RSS) until the handle closes; one handle kept open over a 4 GB shard ends up holding all of
it. So each tensor is read through a handle of its own, and at most one tensor of the input is
resident at a time. Opening a handle costs one header parse.

Writing: the output layout (which tensor goes in which shard) is planned up front from shapes and
dtypes alone, with huggingface_hub's splitter (the one `save_pretrained` uses), so file names and the
index are final before the first byte is written and only one shard is held in memory at a time.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from qflash.errors import ConfigError, ModelError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# safetensors dtype names -> torch dtypes (the ones a language model checkpoint holds)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
"""`--dtype` names of the 16/32-bit outputs (merge, fidelity)."""

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _header(path: Path) -> dict[str, TensorInfo]:
    """name -> (file, shape, dtype) from one safetensors header, without reading any tensor data."""
    infos: dict[str, TensorInfo] = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                sl = f.get_slice(name)
                dtype = _DTYPES.get(sl.get_dtype())
                if dtype is None:
                    raise ModelError(f"{path}: tensor '{name}' has dtype {sl.get_dtype()}, which qflash merge does not handle")
                infos[name] = TensorInfo(path, tuple(sl.get_shape()), dtype)
    except SafetensorError as e:
        raise ModelError(f"{path}: not a readable safetensors file ({e})") from None
    return infos


class SafetensorsModel:
    """The tensors of a model directory (model.safetensors, or shards listed in model.safetensors.index.json)."""

    def __init__(self, model_dir: Path):
        self.dir = Path(model_dir)
        self.files = self._files()
        self.tensors: dict[str, TensorInfo] = {}
        for f in self.files:
            for name, info in _header(f).items():
                if name in self.tensors:
                    raise ModelError(f"{self.dir}: tensor '{name}' is stored twice ({self.tensors[name].file.name} and {f.name})")
                self.tensors[name] = info
        self._check_index()

    def _files(self) -> list[Path]:
        index = self.dir / INDEX_FILE
        if index.is_file():
            weight_map = self._weight_map(index)
            files = sorted({self.dir / name for name in weight_map.values()})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise ModelError(f"{index}: lists shard(s) that are not there: {', '.join(missing[:3])}")
            return files
        if (self.dir / SINGLE_FILE).is_file():
            return [self.dir / SINGLE_FILE]
        others = sorted(p.name for p in self.dir.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth"))
        raise ModelError(
            f"{self.dir}: no {SINGLE_FILE} and no {INDEX_FILE}"
            + (f" (found {', '.join(others[:4])})" if others else "")
            + "; qflash merge reads safetensors checkpoints (save the base with save_pretrained(safe_serialization=True))"
        )

    @staticmethod
    def _weight_map(index: Path) -> dict[str, str]:
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise ModelError(f"{index}: not a safetensors index (no weight_map: {e})") from None
        for name in weight_map.values():
            if Path(name).name != name:
                raise ModelError(f"{index}: shard name '{name}' is not a plain file name")
        return weight_map

    def _check_index(self) -> None:
        index = self.dir / INDEX_FILE
        if not index.is_file():
            return
        weight_map = self._weight_map(index)
        for name, file in weight_map.items():
            info = self.tensors.get(name)
            if info is None or info.file.name != file:
                raise ModelError(f"{index}: says '{name}' is in {file}, but it is not there")

    def read(self, name: str) -> torch.Tensor:
        """One tensor, through a handle of its own (see the module docstring for why)."""
        with safe_open(str(self.tensors[name].file), framework="pt") as f:
            return f.get_tensor(name)

    @property
    def n_params(self) -> int:
        return sum(i.numel for i in self.tensors.values())


def parse_size(text: str | int) -> int:
    """`2GB`, `500MB`, `1.5GB`, `2GiB` or a number of bytes -> bytes (GB = 10^9 as in save_pretrained)."""
    if isinstance(text, int):
        return text
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in units:
        raise ConfigError(f"--max-shard-size: '{text}' is not a size; write it like 2GB, 500MB or 1.5GiB")
    size = int(float(m.group(1)) * units[m.group(2).upper()])
    if size < 1:
        raise ConfigError(f"--max-shard-size: '{text}' must be at least 1 byte")
    return size


@dataclass
class ShardLayout:
    """Which output tensor goes into which file, decided before anything is written."""

    files: dict[str, list[str]]
    """file name -> tensor names, in write order."""
    total_bytes: int

    @property
    def sharded(self) -> bool:
        return len(self.files) > 1

    def index(self) -> dict:
        weight_map = {name: file for file, names in self.files.items() for name in names}
        return {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}


def plan_shards(specs: dict[str, tuple[tuple[int, ...], torch.dtype]], max_bytes: int) -> ShardLayout:
    """Split tensors (name -> (shape, dtype), in order) into files of at most max_bytes, as save_pretrained does.

    A tensor larger than max_bytes gets a file of its own.
    """
    from huggingface_hub import split_torch_state_dict_into_shards

    # Meta tensors: the splitter only looks at sizes, nothing is allocated.
    meta = {name: torch.empty(shape, dtype=dtype, device="meta") for name, (shape, dtype) in specs.items()}
    split = split_torch_state_dict_into_shards(meta, max_shard_size=max_bytes)
    files = {file: list(names) for file, names in split.filename_to_tensors.items()}
    placed = [n for names in files.values() for n in names]
    if sorted(placed) != sorted(specs):
        # The splitter drops tensors it believes share storage; none of ours do, so this would be a bug.
        raise RuntimeError(f"shard planning placed {len(placed)} tensors of {len(specs)}")
    total = sum(math.prod(s) * d.itemsize for s, d in specs.values())
    return ShardLayout(files, total)


def write_shard(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    # metadata format=pt: transformers checks it to know the file was written from PyTorch
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})
