"""The training loop: NF4 base + LoRA, token-weighted loss over gradient accumulation, on Accelerate.

One optimizer step = `grad_accum` micro-batches. Each micro-batch contributes
sum(token cross-entropy) / (trained tokens of the whole step), so the step's loss is the mean over
every trained token of the step however the samples are split into micro-batches.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from qflash.config import Config, check_paths
from qflash.data.batching import Batch, SampleStream, step_micro_batches, trained_tokens
from qflash.data.pipeline import DataStats, build_examples, data_fingerprint
from qflash.data.template import IGNORE, ChatRenderer, Example
from qflash.errors import ConfigError
from qflash.model.loading import compute_dtype, enable_activation_checkpointing, load_base_model, load_tokenizer, pick_device, resolve_model_dir
from qflash.model.lora import add_lora
from qflash.train.metrics import MetricsWriter, StepProgress, console

ADAPTER_DIR = "adapter"
RUN_CONFIG = "qflash_config.yaml"
FINGERPRINT = "data_fingerprint.json"


@dataclass
class TrainResult:
    output_dir: Path
    adapter_dir: Path
    steps: int
    samples: int
    tokens: int
    trained_tokens: int
    seconds: float
    losses: list[float] = field(default_factory=list)

    @property
    def final_loss(self) -> float:
        return self.losses[-1] if self.losses else float("nan")


@dataclass
class Setup:
    """Everything a run needs, built from the config; tests build one to drive steps directly."""

    cfg: Config
    device: torch.device
    dtype: torch.dtype
    model_dir: Path
    tokenizer: object
    renderer: ChatRenderer
    examples: list[Example]
    stats: DataStats
    fingerprint: dict
    model: torch.nn.Module


def build_setup(cfg: Config) -> Setup:
    check_paths(cfg)
    device = pick_device(cfg.train.device)
    dtype = compute_dtype(cfg.quant.compute_dtype, device)
    model_dir = resolve_model_dir(cfg.model.path)
    tok = load_tokenizer(model_dir, cfg.model.trust_remote_code)
    renderer = ChatRenderer(tok, cfg.data.template, cfg.data.train_on)
    examples, stats = build_examples(cfg.data, renderer, split="train", seed=cfg.train.seed)
    fp = data_fingerprint(cfg.data, tok)
    model = load_base_model(
        model_dir,
        quant_mode=cfg.quant.mode,
        double_quant=cfg.quant.double_quant,
        dtype=dtype,
        device=device,
        trust_remote_code=cfg.model.trust_remote_code,
    )
    model.config.use_cache = False  # a KV cache is useless in training and unsafe with packed batches
    if cfg.train.gradient_checkpointing:
        enable_activation_checkpointing(model)
    model = add_lora(model, cfg.lora, seed=cfg.train.seed)
    return Setup(cfg, device, dtype, model_dir, tok, renderer, examples, stats, fp, model)


def build_optimizer(params: list[torch.nn.Parameter], cfg: Config, device: torch.device) -> torch.optim.Optimizer:
    kind = cfg.train.optimizer
    if kind == "auto":
        kind = "paged_adamw_32bit" if device.type == "cuda" else "adamw"
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    if device.type != "cuda":
        raise ConfigError(f"train.optimizer={kind} needs a CUDA GPU; use train.optimizer=adamw on CPU")
    import bitsandbytes as bnb

    cls = bnb.optim.PagedAdamW32bit if kind == "paged_adamw_32bit" else bnb.optim.PagedAdamW8bit
    return cls(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Config, total_steps: int):
    from transformers import get_scheduler

    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[cfg.train.schedule]
    warmup = math.ceil(cfg.train.warmup_ratio * total_steps)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def total_steps(cfg: Config, n_examples: int) -> int:
    if cfg.train.max_steps is not None:
        return cfg.train.max_steps
    per_step = cfg.train.micro_batch_size * cfg.train.grad_accum
    return max(1, math.ceil(cfg.train.epochs * n_examples / per_step))


def loss_sum(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Sum of next-token cross-entropy over the batch's trained tokens (fp32)."""
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    logits = out.logits[:, :-1, :].float()  # (batch, seq-1, vocab): position t predicts token t+1
    labels = batch.labels[:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE, reduction="sum")


def _prepare_output_dir(out: Path, overwrite: bool) -> None:
    if (out / ADAPTER_DIR).exists() and not overwrite:
        raise ConfigError(
            f"output_dir: {out} already holds a trained adapter; pass --overwrite to replace it or choose another output_dir"
        )
    if overwrite:
        for name in (ADAPTER_DIR, "metrics.jsonl", "tensorboard"):
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    out.mkdir(parents=True, exist_ok=True)


def save_adapter(setup: Setup, out: Path) -> Path:
    """Write the PEFT adapter plus run metadata to out/adapter, atomically (temp dir, then rename)."""
    final = out / ADAPTER_DIR
    tmp = Path(tempfile.mkdtemp(prefix=".adapter.tmp-", dir=out))
    try:
        setup.model.save_pretrained(str(tmp), safe_serialization=True)
        (tmp / RUN_CONFIG).write_text(setup.cfg.to_yaml(), encoding="utf-8")
        (tmp / FINGERPRINT).write_text(json.dumps(setup.fingerprint, indent=2, ensure_ascii=False), encoding="utf-8")
        (tmp / "base_model_dir.txt").write_text(str(setup.model_dir.resolve()) + "\n", encoding="utf-8")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        old = None
        if final.exists():
            old = out / f".adapter.old-{os.getpid()}"
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


StepHook = Callable[[int, dict], None]


def run_training(setup: Setup, *, overwrite: bool = False, on_step: StepHook | None = None, quiet: bool = False) -> TrainResult:
    from accelerate import Accelerator

    cfg = setup.cfg
    out = Path(cfg.output_dir)
    _prepare_output_dir(out, overwrite)
    (out / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")

    accelerator = Accelerator(cpu=setup.device.type == "cpu", mixed_precision="no")
    model = setup.model
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, cfg, setup.device)
    steps = total_steps(cfg, len(setup.examples))
    scheduler = build_scheduler(optimizer, cfg, steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()

    per_step = cfg.train.micro_batch_size * cfg.train.grad_accum
    stream = SampleStream(len(setup.examples), cfg.train.seed, per_step)
    pad_id = setup.tokenizer.pad_token_id
    metrics = MetricsWriter(out)
    progress = StepProgress(steps) if not quiet else None
    torch.manual_seed(cfg.train.seed)  # LoRA dropout
    if not quiet:
        console.print(
            f"[bold]qflash train[/]: {len(setup.examples)} samples ({setup.stats.tokens:,} tokens, "
            f"{setup.stats.trained_tokens:,} trained), {steps} steps of {per_step} samples, "
            f"device {setup.device.type}, compute {str(setup.dtype).replace('torch.', '')}, "
            f"quant {cfg.quant.mode}, LoRA r={cfg.lora.r}"
        )

    result = TrainResult(out, out / ADAPTER_DIR, 0, 0, 0, 0, 0.0)
    t_start = time.perf_counter()
    try:
        for step in range(steps):
            t0 = time.perf_counter()
            ids = stream.ids(step)
            micro = step_micro_batches(setup.examples, ids, cfg.train.micro_batch_size, pad_id)
            n_trained = sum(trained_tokens(b) for b in micro)
            step_loss = 0.0
            for b in micro:
                b = b.to(setup.device)
                loss = loss_sum(model, b) / n_trained
                accelerator.backward(loss)
                step_loss += loss.item()
            grad_norm = None
            if cfg.train.max_grad_norm > 0:
                grad_norm = float(accelerator.clip_grad_norm_(params, cfg.train.max_grad_norm))
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            dt = time.perf_counter() - t0
            real = sum(b.real_tokens for b in micro)
            result.steps = step + 1
            result.samples += len(ids)
            result.tokens += real
            result.trained_tokens += n_trained
            result.losses.append(step_loss)
            values = {
                "loss": step_loss,
                "lr": lr,
                "grad_norm": grad_norm,
                "trained_tokens": n_trained,
                "tokens": real,
                "tokens_per_s": real / dt,
                "epoch": stream.epoch_of(step + 1),
                "sample_ids": ids,
            }
            if (step + 1) % cfg.train.log_every == 0 or step + 1 == steps:
                metrics.write(step + 1, values)
            if progress is not None:
                progress.update(step + 1, step_loss, lr, real / dt)
            if on_step is not None:
                on_step(step + 1, values)
    finally:
        metrics.close()
        if progress is not None:
            progress.close()
    result.seconds = time.perf_counter() - t_start
    result.adapter_dir = save_adapter(setup, out)
    return result


def train(cfg: Config, *, overwrite: bool = False, quiet: bool = False) -> TrainResult:
    setup = build_setup(cfg)
    result = run_training(setup, overwrite=overwrite, quiet=quiet)
    if not quiet:
        print_summary(result, setup)
    return result


def print_summary(r: TrainResult, setup: Setup) -> None:
    first = r.losses[0] if r.losses else float("nan")
    console.print(
        f"[bold green]done[/]: {r.steps} steps, {r.samples} samples "
        f"({r.samples / max(len(setup.examples), 1):.2f} epochs), {r.tokens:,} tokens "
        f"({r.trained_tokens:,} trained) in {r.seconds:.0f}s ({r.tokens / max(r.seconds, 1e-9):,.0f} tok/s); "
        f"loss {first:.4f} -> {r.final_loss:.4f}\n"
        f"  adapter      {r.adapter_dir}\n"
        f"  metrics      {r.output_dir / 'metrics.jsonl'}  (TensorBoard: {r.output_dir / 'tensorboard'})\n"
        f"  try it       qflash chat --adapter {r.output_dir} --prompt \"Who are you?\""
    )
