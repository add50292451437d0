"""What the CUDA GPU can do: its compute capability (or one a test forces), and what needs a newer one.

`QFLASH_CUDA_CAPABILITY=7.5` makes qflash take the paths of a GPU of that capability on a newer one (an H100
testing the T4/V100 paths): fp16 instead of bf16 compute, SDPA instead of FlashAttention-2, no cuDNN attention.
"""

from __future__ import annotations

import os

import torch

CAPABILITY_ENV = "QFLASH_CUDA_CAPABILITY"
AMPERE = (8, 0)
"""bf16 arithmetic, FlashAttention-2 (flash-attn and PyTorch's aten kernels) and cuDNN's fused attention need it."""


def capability() -> tuple[int, int]:
    """The current CUDA device's compute capability, or the one QFLASH_CUDA_CAPABILITY forces ("7.5")."""
    forced = os.environ.get(CAPABILITY_ENV, "").strip()
    if forced:
        try:
            major, minor = (int(x) for x in forced.split("."))
        except ValueError:
            raise ValueError(f"{CAPABILITY_ENV}={forced!r}: expected MAJOR.MINOR, e.g. 7.5") from None
        return major, minor
    return torch.cuda.get_device_capability()


def describe() -> str:
    cap = capability()
    forced = f" ({CAPABILITY_ENV})" if os.environ.get(CAPABILITY_ENV, "").strip() else ""
    return f"compute capability {cap[0]}.{cap[1]}{forced}"


def bf16_supported() -> bool:
    return capability() >= AMPERE
