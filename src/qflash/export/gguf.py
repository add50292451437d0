"""A 16-bit Hugging Face model directory (what `qflash merge` writes) as one GGUF file for llama.cpp and Ollama.

Written with the `gguf` package's writer, one tensor at a time (read lazily from the safetensors shards,
converted, written, dropped): the architecture's metadata, the tokenizer (byte-level BPE: vocabulary, merges,
token types, special ids, the end-of-turn token) and the chat template the directory carries (merge writes
the one the run trained with). Llama's and Mistral's q/k projections are permuted into the rotary layout llama.cpp
expects (Mistral is llama.cpp's `llama` architecture); Qwen2's and Qwen3's are not (their rotary pairs halves, as
transformers does). Qwen2 keeps its q/k/v biases; Qwen3 has none, and its per-head q/k norms become attn_q_norm /
attn_k_norm. The head width is written (attention.key_length / value_length) where the config gives one: Qwen3's
128 is wider than hidden / heads.

Types: f16, bf16, q8_0 and q4_0 (blocks of 32 weights with one fp16 scale, 8 or 4 bits each; the gguf
package's quantizer; under q4_0 the token embedding / output projection stay q8_0). One-dimensional tensors
(norms, biases) stay f32, as llama.cpp's own converter keeps them; a matrix whose rows are not a multiple of 32
stays f16 under q8_0/q4_0 (said in the summary).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from qflash.data.cache import file_chat_template
from qflash.errors import ConfigError, ModelError

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
                 "Qwen3ForCausalLM": "qwen3"}
"""What this exporter writes: transformers' class -> llama.cpp's architecture name."""
NOT_WRITTEN = {"Gemma3ForCausalLM": "Gemma 3 ((1 + w) norms, a post-feedforward norm, sliding-window layers) is not "
                                    "written by qflash's GGUF exporter"}
"""Architectures qflash trains but does not export, with what they have that the writer lacks."""
TYPES = ("f16", "bf16", "q8_0", "q4_0")


@dataclass
class GgufResult:
    path: Path
    arch: str
    dtype: str
    tensors: int = 0
    bytes: int = 0
    kept_f16: list[str] = field(default_factory=list)
    """Matrices q8_0 could not take (rows not a multiple of 32), written f16."""


def architecture(config: dict, where: Path) -> str:
    known = next((NOT_WRITTEN[a] for a in config.get("architectures") or [] if a in NOT_WRITTEN), None)
    if known is not None:
        raise ModelError(f"{where}: {known}; merge the run (qflash merge RUN --output DIR) and convert DIR with "
                         "llama.cpp's convert_hf_to_gguf.py")
    arch = next((ARCHITECTURES[a] for a in config.get("architectures") or [] if a in ARCHITECTURES), None)
    if arch is None:
        raise ModelError(f"{where}: architecture {config.get('architectures')} cannot be exported to GGUF; "
                         f"supported: {', '.join(ARCHITECTURES)}")
    return arch


def _permute_rotary(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Llama q/k rows from transformers' rotary layout (each head's first half, then its second) to llama.cpp's
    (the two halves interleaved, pair by pair)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _special_ids(model_dir: Path, tok: dict, vocab: dict[str, int]) -> dict[str, int]:
    """bos / eos / padding / unknown / end-of-turn ids from tokenizer_config.json (tokens by name) and
    generation_config.json (the end of turn the run trained: merge writes it as eos_token_id)."""
    cfg = json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8")) \
        if (model_dir / "tokenizer_config.json").is_file() else {}
    added = {a["content"]: a["id"] for a in tok.get("added_tokens", [])}

    def token_id(value) -> int | None:
        content = value.get("content") if isinstance(value, dict) else value
        return added.get(content, vocab.get(content)) if content else None

    ids = {}
    for key, name in (("bos_token", "bos"), ("eos_token", "eos"), ("pad_token", "padding"), ("unk_token", "unknown")):
        found = token_id(cfg.get(key))
        if found is not None:
            ids[name] = found
    gen = model_dir / "generation_config.json"
    if gen.is_file():
        eos = json.loads(gen.read_text(encoding="utf-8")).get("eos_token_id")
        eos = eos[0] if isinstance(eos, list) and eos else eos
        if isinstance(eos, int):
            ids["eot"] = eos
            ids.setdefault("eos", eos)
    return ids


def _pre_tokenizer(tok: dict) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenization (how text is split before BPE)."""
    pre = json.dumps(tok.get("pre_tokenizer"), sort_keys=True)
    if '"type": "ByteLevel"' in pre and '"Split"' not in pre and '"use_regex": true' in pre:
        return "smollm" if len(tok["model"]["vocab"]) == 49152 else "gpt-2"
    if "\\\\p{N}" in pre or "Split" in pre:
        vocab = tok["model"]["vocab"]
        if "<|im_start|>" in vocab or any(a.get("content") == "<|im_start|>" for a in tok.get("added_tokens", [])):
            return "qwen2"
        return "llama-bpe"
    return "default"


def add_tokenizer(writer, model_dir: Path) -> dict[str, int]:
    """The byte-level BPE tokenizer of `model_dir` (tokenizer.json) and its chat template into `writer`."""
    import gguf

    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise ModelError(f"{model_dir}: no tokenizer.json; GGUF export needs a fast (tokenizers) tokenizer")
    tok = json.loads(path.read_text(encoding="utf-8"))
    model = tok.get("model", {})
    if model.get("type") != "BPE":
        raise ModelError(f"{path}: a {model.get('type')} tokenizer; GGUF export writes byte-level BPE ones only")
    if model.get("byte_fallback") or '"Metaspace"' in json.dumps(tok.get("pre_tokenizer")):
        # SentencePiece-style BPE (Mistral 7B v0.1-v0.3, Llama 2): llama.cpp reads it as its "llama" vocabulary, with
        # scores and byte tokens this writer does not produce; written as byte-level BPE it would tokenize wrongly.
        raise ModelError(f"{path}: a SentencePiece-style BPE tokenizer (byte fallback / Metaspace); GGUF export "
                         "writes byte-level BPE ones only: convert this model with llama.cpp's convert_hf_to_gguf.py")
    vocab: dict[str, int] = dict(model["vocab"])
    for a in tok.get("added_tokens", []):
        vocab.setdefault(a["content"], a["id"])
    size = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    for text, i in vocab.items():
        tokens[i], types[i] = text, gguf.TokenType.NORMAL
    for a in tok.get("added_tokens", []):
        types[a["id"]] = gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(tok))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    ids = _special_ids(model_dir, tok, vocab)
    for name, adder in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                        ("padding", writer.add_pad_token_id), ("unknown", writer.add_unk_token_id),
                        ("eot", writer.add_eot_token_id)):
        if name in ids:
            adder(ids[name])
    writer.add_add_bos_token(False)
    template = file_chat_template(model_dir)
    if template:
        writer.add_chat_template(template)
    return ids


def add_model_metadata(writer, config: dict, arch: str, name: str, dtype: str) -> None:
    import gguf

    heads = config["num_attention_heads"]
    hidden = config["hidden_size"]
    rope = config.get("rope_parameters") or {}
    # transformers' GGUF loader (the fidelity check's reader) takes a llama file named exactly "mistral" for a
    # gguf-py architecture "mistral", which does not exist, and cannot read it; llama.cpp does not read the name.
    writer.add_name("Mistral" if arch == "llama" and name == "mistral" else name)
    writer.add_context_length(config.get("max_position_embeddings", 4096))
    writer.add_embedding_length(hidden)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads", heads))
    writer.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_vocab_size(config["vocab_size"])
    head_dim = config.get("head_dim") or hidden // heads
    writer.add_rope_dimension_count(head_dim)
    if config.get("head_dim"):
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    file_type = {"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[dtype]
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _target_type(shape: tuple[int, ...], dtype: str, target: str = ""):
    """(GGML type, numpy dtype of the written array) for the tensor `target` of `shape` under --dtype `dtype`.
    q4_0 keeps the embedding / output projection at q8_0 (the tensor 4 bits hurt most, read by every token)."""
    import gguf

    Q = gguf.GGMLQuantizationType
    if len(shape) == 1:
        return Q.F32, np.float32
    if dtype == "q4_0" and target.startswith(("token_embd", "output.")):
        dtype = "q8_0"
    if dtype in ("q8_0", "q4_0") and shape[-1] % 32 == 0:
        return (Q.Q8_0 if dtype == "q8_0" else Q.Q4_0), np.uint8
    if dtype == "bf16":
        return Q.BF16, np.uint16
    return Q.F16, np.float16


def _byte_shape(shape: tuple[int, ...], qtype) -> tuple[int, ...]:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return (*shape[:-1], shape[-1] // block * size)


def _convert(t: torch.Tensor, qtype) -> np.ndarray:
    import gguf

    data = t.to(torch.float32).numpy()
    Q = gguf.GGMLQuantizationType
    if qtype == Q.F32:
        return data
    if qtype == Q.F16:
        return data.astype(np.float16)
    return gguf.quants.quantize(data, qtype)


def hf_to_gguf(model_dir: Path, out: Path, dtype: str, name: str, progress=None) -> GgufResult:
    """Write `model_dir` (config.json, safetensors, tokenizer.json) to the GGUF file `out` (not atomic: the caller
    writes to a temporary name and renames)."""
    import gguf

    from qflash.export.safetensors_io import SafetensorsModel

    if dtype not in TYPES:
        raise ConfigError(f"--dtype {dtype}: GGUF export writes {', '.join(TYPES)}")
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    arch = architecture(config, model_dir)
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"])
    names = gguf.get_tensor_name_map({"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2,
                                      "qwen3": gguf.MODEL_ARCH.QWEN3}[arch], config["num_hidden_layers"])
    model = SafetensorsModel(model_dir)
    tied = config.get("tie_word_embeddings", False)
    plan = []
    result = GgufResult(out, arch, dtype)
    for hf_name in model.tensors:
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reads the output projection from token_embd when output.weight is absent
        target = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if target is None:
            if hf_name.endswith("rotary_emb.inv_freq"):
                continue
            raise ModelError(f"{model_dir}: tensor {hf_name} has no GGUF name for {arch}")
        shape = tuple(model.tensors[hf_name].shape)
        qtype, np_dtype = _target_type(shape, dtype, target)
        if dtype in ("q8_0", "q4_0") and len(shape) > 1 and np_dtype != np.uint8:
            result.kept_f16.append(target)
        plan.append((hf_name, target, shape, qtype, np_dtype))
    writer = gguf.GGUFWriter(out, arch)
    add_model_metadata(writer, config, arch, name, dtype)
    add_tokenizer(writer, model_dir)
    for _, target, shape, qtype, np_dtype in plan:
        if np_dtype == np.uint8:
            byte_shape = _byte_shape(shape, qtype)
            writer.add_tensor_info(target, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=qtype)
        else:
            nbytes = int(np.prod(shape)) * np.dtype(np_dtype).itemsize
            raw = qtype if qtype == gguf.GGMLQuantizationType.BF16 else None
            writer.add_tensor_info(target, shape, np.dtype(np_dtype), nbytes, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    try:
        for hf_name, target, shape, qtype, _ in plan:
            t = model.read(hf_name)
            if arch == "llama" and hf_name.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
                t = _permute_rotary(t, heads if "q_proj" in hf_name else kv_heads)
            data = _convert(t, qtype)
            writer.write_tensor_data(data)
            result.tensors += 1
            result.bytes += data.nbytes
            if progress is not None:
                progress(result.tensors, len(plan))
    finally:
        writer.close()
    return result


def not_read_back(config: dict) -> str | None:
    """Why transformers' GGUF loader cannot read back the export of `config` (the fidelity check), else None."""
    if architecture(config, Path("config.json")) == "qwen3" and config.get("head_dim", 128) != 128:
        # its qwen3 table maps no attention.key_length: the head width read back is Qwen3Config's default
        return f"transformers' GGUF loader reads Qwen3 with head_dim 128 only (this model has {config['head_dim']})"
    return None


def window_note(config: dict) -> str | None:
    """What a sliding window becomes in the GGUF (llama.cpp's llama architecture attends over the whole context)."""
    window = config.get("sliding_window")
    if config.get("model_type") == "mistral" and window and window < config.get("max_position_embeddings", 0):
        return (f"the model's {window}-token sliding window is not in GGUF's llama architecture: llama.cpp attends "
                f"over the whole context, the same as the model up to {window} tokens")
    return None


def read_back(path: Path, dtype: torch.dtype = torch.float32):
    """The GGUF file as transformers reads it (its own loader, dequantizing): (model, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {"gguf_file": path.name}
    tok = AutoTokenizer.from_pretrained(str(path.parent), **kw)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=dtype, use_kernels=False, **kw)
    return model.eval(), tok

