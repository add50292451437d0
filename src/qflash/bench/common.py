"""What the bench's recipes share: the qflash model and switches they measure (as training loads and resolves
them), the LoRA targets, and the step timer."""

from __future__ import annotations

import gc
import time
from pathlib import Path

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


QFLASH_OVERRIDES: list[str] = []  # bench-wide qflash config overrides (`qflash bench --set key=value`)


def qflash_config(dropout: float, lr: float, attention: str):
    from qflash.config import load_config

    cfg = load_config(None, list(QFLASH_OVERRIDES))
    cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules = 64, 16.0, dropout, list(TARGETS)
    cfg.train.lr = lr
    cfg.attention.backend = attention
    return cfg


class Precision:
    """What the qflash model the bench built last computes in (quant.compute_dtype: bf16, or fp16 with dynamic loss
    scaling as training does it) and its switches (train/levers.py), read by qflash_step and qflash_loss."""

    dtype: torch.dtype = torch.bfloat16
    scaler: "torch.amp.GradScaler | None" = None
    fused_ce: bool = False


BENCH_STEPS = 10**6
"""The bench measures steady steps: kernels.compile_layers=auto compiles, as for a long run."""


def qflash_model(model_dir: Path, dropout: float, lr: float, attention: str, seed: int, sharded: bool = False,
                 device: torch.device | None = None):
    """A qflash model for the bench: loaded, its switches resolved and applied as training does (train/levers.py),
    always with activation checkpointing (the bench's memory numbers assume it). `device`: the current GPU, or
    the CPU for the CPU twins of the bench's tests (fp32, as training there computes)."""
    from qflash.model.loading import compute_dtype, load_configured_base
    from qflash.train import levers as levers_mod
    from qflash.train.loop import build_optimizer

    cfg = qflash_config(dropout, lr, attention)
    cfg.train.gradient_checkpointing = True
    device = device or torch.device("cuda", torch.cuda.current_device())
    Precision.dtype = compute_dtype(cfg.quant.compute_dtype, device)
    if Precision.dtype == torch.float32 and device.type == "cuda":
        raise SystemExit("qflash bench measures 16-bit training: quant.compute_dtype must be auto, bf16 or fp16")
    Precision.scaler = torch.amp.GradScaler("cuda") if Precision.dtype == torch.float16 else None
    model = load_configured_base(cfg, model_dir, device, Precision.dtype, sharded=sharded)
    model.config.use_cache = False
    levers = levers_mod.resolve(cfg, device, Precision.dtype, model, sharded=sharded, planned_steps=BENCH_STEPS)
    model, levers = levers_mod.apply(model, levers, cfg, seed=seed)
    Precision.fused_ce = levers.fused_ce.on
    model.train()  # transformers checkpoints activations only in training mode
    params = [p for p in model.parameters() if p.requires_grad]
    return model, build_optimizer(params, cfg, device), params


def _free() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(step, warmup: int, steps: int, warm: list[float] | None = None) -> tuple[list[float], list[float]]:
    """Losses of all steps, and the times of those after `warmup` (the warm-up steps' times into `warm`)."""
    losses, times = [], []
    for i in range(warmup + steps):
        _sync()
        t0 = time.perf_counter()
        losses.append(step())
        _sync()
        (times if i >= warmup else warm if warm is not None else []).append(time.perf_counter() - t0)
    return losses, times
