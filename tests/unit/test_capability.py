"""Compute capability: bf16 needs 8.0+ (auto takes fp16 below); QFLASH_CUDA_CAPABILITY forces an older GPU's paths."""

import pytest
import torch

from qflash.errors import ModelError
from qflash.model import gpu
from qflash.model.loading import compute_dtype

CUDA = torch.device("cuda")


def test_auto_is_bf16_from_ampere_fp16_before_fp32_on_the_cpu(monkeypatch):
    monkeypatch.setenv(gpu.CAPABILITY_ENV, "9.0")
    assert compute_dtype("auto", CUDA) == torch.bfloat16 and compute_dtype("fp16", CUDA) == torch.float16
    monkeypatch.setenv(gpu.CAPABILITY_ENV, "7.5")
    assert compute_dtype("auto", CUDA) == torch.float16 and compute_dtype("fp32", CUDA) == torch.float32
    assert compute_dtype("auto", torch.device("cpu")) == torch.float32


def test_bf16_on_an_older_gpu_is_refused_naming_both_capabilities(monkeypatch):
    monkeypatch.setenv(gpu.CAPABILITY_ENV, "7.0")
    with pytest.raises(ModelError, match=r"8\.0\+.*compute capability 7\.0 \(QFLASH_CUDA_CAPABILITY\).*fp16"):
        compute_dtype("bf16", CUDA)


def test_a_malformed_override_says_what_is_expected(monkeypatch):
    monkeypatch.setenv(gpu.CAPABILITY_ENV, "turing")
    with pytest.raises(ValueError, match="MAJOR.MINOR"):
        gpu.capability()


def test_a_model_on_the_cpu_takes_cpu_attention_where_a_gpu_is_present(monkeypatch):
    """train.device=cpu on a GPU machine: auto picked the GPU's varlen kernel for CPU tensors (found by the GPU e2e
    tier: a run trained on the CPU there failed on an op with no CPU kernel)."""
    from qflash.errors import ConfigError
    from qflash.model import attention

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv(gpu.CAPABILITY_ENV, "9.0")
    assert attention.resolve("auto", on_cuda=False) == "sdpa"
    assert attention.cudnn_missing("auto", "torch_varlen", on_cuda=False) == "a CUDA GPU"
    with pytest.raises(ConfigError, match="it is on the CPU"):
        attention.resolve("torch_varlen", on_cuda=False)
    monkeypatch.setenv(gpu.CAPABILITY_ENV, "7.5")
    assert "compute capability 8.0+" in attention.available("torch_varlen")
