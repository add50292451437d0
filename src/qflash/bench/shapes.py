"""Named model shapes (the real architectures' published sizes) and random-weight model directories.

`qflash bench` needs no download: it writes a model directory with the architecture of a named
shape and random weights once, then loads it through the same NF4 + LoRA code as training.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

QWEN25_COMMON = dict(
    model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_act="silu", rms_norm_eps=1e-6,
    rope_theta=1_000_000.0, max_position_embeddings=131072, attention_dropout=0.0,
    bos_token_id=151643, eos_token_id=151645, use_sliding_window=False,
)
SHAPES: dict[str, dict] = {
    "qwen2.5-0.5b": dict(QWEN25_COMMON, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-3b": dict(QWEN25_COMMON, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                       num_attention_heads=16, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-7b": dict(QWEN25_COMMON, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    "llama3-8b": dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_act="silu", rms_norm_eps=1e-5,
                      rope_theta=500_000.0, max_position_embeddings=131072, hidden_size=4096, intermediate_size=14336,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                      tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128009, attention_bias=False),
    # Qwen3-8B (dense): per-head q/k RMSNorms, head_dim 128, no q/k/v biases
    "qwen3-8b": dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], hidden_act="silu", rms_norm_eps=1e-6,
                     rope_theta=1_000_000.0, max_position_embeddings=40960, hidden_size=4096, intermediate_size=12288,
                     num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                     vocab_size=151936, tie_word_embeddings=False, attention_bias=False, bos_token_id=151643,
                     eos_token_id=151645, use_sliding_window=False),
    # Mistral-7B-v0.3 (no sliding window in v0.3's config)
    "mistral-7b": dict(model_type="mistral", architectures=["MistralForCausalLM"], hidden_act="silu", rms_norm_eps=1e-5,
                       rope_theta=1_000_000.0, max_position_embeddings=32768, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                       vocab_size=32768, tie_word_embeddings=False, sliding_window=None, bos_token_id=1,
                       eos_token_id=2),
    # google/gemma-3-4b-pt's text model: 5 sliding-window (1024) layers to 1 global, RoPE theta 10k local / 1M global
    # (global positions scaled linearly by 8), (1 + w) norms, q/k norms, embeddings scaled by sqrt(hidden), tied.
    "gemma3-4b": dict(model_type="gemma3_text", architectures=["Gemma3ForCausalLM"],
                      hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6, hidden_size=2560,
                      intermediate_size=10240, num_hidden_layers=34, num_attention_heads=8, num_key_value_heads=4,
                      head_dim=256, vocab_size=262208, sliding_window=1024, sliding_window_pattern=6,
                      query_pre_attn_scalar=256, rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
                      rope_scaling={"rope_type": "linear", "factor": 8.0}, max_position_embeddings=131072,
                      final_logit_softcapping=None, attn_logit_softcapping=None, tie_word_embeddings=True,
                      bos_token_id=2, eos_token_id=1, pad_token_id=0, attention_bias=False),
}
UNIT_OFFSET_NORMS = ("gemma3_text",)
"""Model types whose norms multiply by (1 + w): their random models' norm weights are 0, not 1."""


def model_config(shape: str):
    from transformers import AutoConfig

    if shape not in SHAPES:
        raise KeyError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    spec = dict(SHAPES[shape])
    return AutoConfig.for_model(spec.pop("model_type"), **spec)


def param_counts(shape: str) -> tuple[int, int]:
    """(all parameters, parameters that do matmul work per token = all but the input embedding)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config(shape))
    total = sum(p.numel() for p in model.parameters())
    embed = model.get_input_embeddings().weight.numel()
    tied = model.config.tie_word_embeddings
    # Tied: the one matrix is both the lookup (no FLOPs) and lm_head (FLOPs): count it once, as compute.
    return total, total if tied else total - embed


def random_model_dir(shape: str, root: Path, seed: int = 0, shard_bytes: int = 4 << 30) -> Path:
    """A safetensors model directory of `shape` with random bf16 weights (std 0.02, norms scaling by 1), made once."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    target = root / shape
    if (target / "config.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    config = model_config(shape)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=device).manual_seed(seed)
    tmp = Path(tempfile.mkdtemp(prefix=f".{shape}-", dir=root))
    try:
        index: dict[str, str] = {}
        shard: dict[str, torch.Tensor] = {}
        size, n = 0, 0

        def flush() -> None:
            nonlocal shard, size, n
            if shard:
                name = f"model-{n:05d}.safetensors"
                save_file(shard, str(tmp / name), metadata={"format": "pt"})
                index.update({k: name for k in shard})
                shard, size, n = {}, 0, n + 1

        skip = {"lm_head.weight"} if config.tie_word_embeddings else set()
        for name, p in meta.state_dict().items():
            if name in skip:
                continue
            if name.endswith("norm.weight") or "layernorm" in name:
                unit = 0.0 if config.model_type in UNIT_OFFSET_NORMS else 1.0  # each norm scales by 1
                t = torch.full(p.shape, unit, dtype=torch.bfloat16)
            elif name.endswith(".bias"):
                t = torch.zeros(p.shape, dtype=torch.bfloat16)
            else:
                t = (torch.randn(p.shape, generator=g, device=device, dtype=torch.float32) * 0.02).to(torch.bfloat16).cpu()
            shard[name] = t
            size += t.numel() * 2
            if size >= shard_bytes:
                flush()
        flush()
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": sum((tmp / f).stat().st_size for f in set(index.values()))},
                        "weight_map": index}), encoding="utf-8")
        config.dtype = "bfloat16"
        config.save_pretrained(str(tmp))
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
