"""Shared fixtures: the embedded model's real tokenizer, tiny random Qwen2/Llama/Qwen3/Mistral/Gemma 3 models, small
data."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The untested-version line (qflash/versions.py) would be a second stderr line in the one-line-error tests when
# they run against other releases (make check-latest); tests/unit/test_versions.py checks the line itself.
os.environ.setdefault("QFLASH_UNTESTED_OK", "1")


def _isolated_home() -> Path:
    """Tests (and the commands they start) get their own $QFLASH_HOME, so they never write data-cache or
    base-answer entries into the user's; only the converted embedded model is shared (read-mostly)."""
    from qflash.paths import qflash_home

    real = qflash_home()
    (real / "models").mkdir(parents=True, exist_ok=True)
    home = Path(tempfile.mkdtemp(prefix="qflash-test-home-"))
    (home / "models").symlink_to(real / "models", target_is_directory=True)
    os.environ["QFLASH_HOME"] = str(home)
    return home


TEST_HOME = _isolated_home()


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(TEST_HOME, ignore_errors=True)  # the models link goes, not what it points to

REPO = Path(__file__).resolve().parents[1]
# Wide enough init that logits can move: with 0.02 the final RMSNorm caps them near uniform.
INIT_RANGE = 0.2
DEMO = REPO / "data" / "demo"


@pytest.fixture(scope="session")
def smol_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct as an HF directory (converted once into $QFLASH_HOME)."""
    from qflash.config import EMBEDDED_MODEL
    from qflash.model.loading import resolve_model_dir

    return resolve_model_dir(EMBEDDED_MODEL)


@pytest.fixture(scope="session")
def smol_tokenizer(smol_dir):
    from qflash.model.loading import load_tokenizer

    return load_tokenizer(smol_dir)


ARCHES = ("qwen2", "llama", "qwen3", "mistral", "gemma3")
"""The architectures of the tiny models (tests parametrized over all of them use this)."""


def make_tiny_model(out: Path, arch: str, tokenizer, seed: int = 0, sliding_window: int | None = None) -> Path:
    """A tiny random model of the real architecture (2 layers, hidden 64, GQA) with the real tokenizer.
    Qwen3: per-head q/k RMSNorms over head_dim 128 (wider than hidden / heads, as in the real ones), no q/k/v
    biases. Mistral: `sliding_window` (None: full causal attention, as the general tests want). Gemma 3: see
    _gemma3_config."""
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        initializer_range=INIT_RANGE,
    )
    if arch == "qwen3":
        config = Qwen3Config(**common, head_dim=128)  # as in every Qwen3 dense model: wider than hidden / heads
    elif arch == "mistral":
        config = MistralConfig(**common, head_dim=16, sliding_window=sliding_window)
    elif arch == "gemma3":
        config = _gemma3_config(common, sliding_window)
    else:
        config = {"qwen2": Qwen2Config, "llama": LlamaConfig}[arch](**common)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if arch == "gemma3":
        _randomize_norms(model)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


GEMMA3_SOFTCAP = 10.0
"""The tiny Gemma 3's final_logit_softcapping: small enough that capping moves its logits (published Gemma 3
checkpoints set none; Gemma 2's was 30)."""


def _gemma3_config(common: dict, sliding_window: int | None):
    """Gemma 3 text: a sliding layer then a global one (the published pattern is 5 sliding : 1 global), each with
    its own RoPE theta; q/k norms; attention scaled by query_pre_attn_scalar (not head_dim); embeddings scaled by
    sqrt(hidden); logits soft-capped. `sliding_window` None: 512, wider than any test document."""
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(**common, head_dim=32, query_pre_attn_scalar=24, sliding_window=sliding_window or 512,
                            layer_types=["sliding_attention", "full_attention"],
                            final_logit_softcapping=GEMMA3_SOFTCAP)


def _randomize_norms(model) -> None:
    """Gemma's norms multiply by (1 + w) and start at w = 0: random w, so a norm that forgot the 1 (or the w)
    changes the logits."""
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, smol_tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {arch: make_tiny_model(root / arch, arch, smol_tokenizer) for arch in ARCHES}


@pytest.fixture(scope="session")
def identity_subset(tmp_path_factory) -> Path:
    """16 identity records from the demo set (English and Chinese)."""
    records = json.loads((DEMO / "identity.json").read_text(encoding="utf-8"))
    subset = records[:12] + records[-4:]
    path = tmp_path_factory.mktemp("data") / "identity16.json"
    path.write_text(json.dumps(subset, ensure_ascii=False, indent=1), encoding="utf-8")
    return path


def tiny_config(model_dir: Path, data: Path, out: Path, *extra: str):
    from qflash.config import load_config

    return load_config(
        None,
        [
            f"model.path={model_dir}",
            f"data.datasets=[{{path: '{data}'}}]",
            "data.vars.name=Zyxo",
            "data.vars.author=Quillfeather",
            "lora.r=8",
            "lora.alpha=16",
            "lora.dropout=0.0",
            "train.micro_batch_size=4",
            "train.lr=1e-2",
            "train.warmup_ratio=0",
            "train.gradient_checkpointing=false",
            "train.device=cpu",
            f"output_dir={out}",
            *extra,
        ],
    )
