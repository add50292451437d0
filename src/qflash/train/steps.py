"""A training run's steps: what a run carries from step to step (`Run`), one optimizer step (`train_step`), and
what follows it (`after_step`: the logs, held-out evaluation, the abort rule, checkpoints and stop requests).

One optimizer step = `grad_accum` micro-batches. Each micro-batch contributes sum(token cross-entropy) /
(trained tokens of the whole step, over every process), so the step's loss is the mean over every trained token
of the step however the samples are split into micro-batches and processes.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from qflash.config import Config
from qflash.data.batching import Batch, SampleStream, packed_micro_batches, step_micro_batches, trained_tokens
from qflash.data.pipeline import DataStats
from qflash.data.replay import ReplayStats
from qflash.data.template import ChatRenderer, Example
from qflash.errors import QflashError
from qflash.rundir import SAMPLES_LOG
from qflash.train import levers as levers_mod
from qflash.train.checkpoint import CKPT_DIR, newest_complete, save_checkpoint
from qflash.train.held_out import held_out_loss
from qflash.train.distributed import Parallel, Ranks, batch_fields
from qflash.train.faults import Faults
from qflash.train.metrics import MetricsWriter, StepProgress
from qflash.train.signals import StopRequests, TrainingInterrupted
from qflash.ui import console

StepHook = Callable[[int, dict], None]


class TrainingAborted(QflashError):
    """The run cannot go on (e.g. repeated non-finite losses); the last good checkpoint is kept."""

    exit_code = 1


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
    eval_losses: list[tuple[int, float]] = field(default_factory=list)
    """(step, held-out loss) at every train.eval_every step and at the end."""
    graphs: str | None = None
    """train.cuda_graphs: what was captured and replayed (None when not in use)."""
    step_seconds: list[float] = field(default_factory=list)
    """Wall time of each step this process ran (the first ones include torch.compile's compiling)."""
    last_extra: dict = field(default_factory=dict)
    """The last step's objective-specific metrics (preference tuning: rewards, accuracy)."""

    @property
    def final_loss(self) -> float:
        return self.losses[-1] if self.losses else float("nan")


def micro_batches(setup: Setup, sample_ids: list[int]) -> list[Batch]:
    """One step's samples as micro-batches: packed (bins of data.max_len) or padded, grouped by length."""
    cfg = setup.cfg
    pad_id = setup.tokenizer.pad_token_id
    if cfg.data.packing:
        return packed_micro_batches(setup.examples, sample_ids, cfg.train.micro_batch_size, cfg.data.max_len,
                                    pad_id, varlen=setup.levers.attention.varlen)
    return step_micro_batches(setup.examples, sample_ids, cfg.train.micro_batch_size, pad_id)



def evaluate_held_out(setup: Setup, model, loss_fn=None) -> float:
    """Token-weighted loss on the held-out split, batched as training batches are (RNG state untouched)."""
    cfg = setup.cfg
    return held_out_loss(
        model, setup.eval_examples, pad_id=setup.tokenizer.pad_token_id, device=setup.device,
        max_len=cfg.data.max_len, rows=cfg.train.micro_batch_size, packing=cfg.data.packing,
        varlen=setup.levers.attention.varlen, loss_fn=loss_fn,
    ).loss



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
    levers: levers_mod.Levers
    """Every speed and memory switch as it applies to this run (train/levers.py)."""
    eval_examples: list = field(default_factory=list)
    """The held-out split, for train.eval_every (empty when that is off): Examples, or PairExamples under a
    preference objective."""
    replay: ReplayStats | None = None
    """What data.replay added to `examples` (None without replay)."""
    objective: object = None
    """Preference tuning (train/preference.py Objective; `examples` then holds PairExamples); None for sft."""
    reference: torch.Tensor | None = None
    """dpo: (pairs, 2) summed log-probabilities of each pair's answers under the starting model (set by the loop
    before the first step)."""
    eval_reference: torch.Tensor | None = None
    """dpo with train.eval_every: the held-out pairs' `reference`."""
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds spent before training: load (reading + NF4 quantization, which bitsandbytes does while loading),
    replay (the base model's answers), lora (adapter, kernels, compile wrappers; compiling itself happens in the
    first steps)."""


@dataclass
class Run:
    """One run's state between steps. Only process 0 (`ranks.main`) writes logs and checkpoints."""

    setup: Setup
    out: Path
    ranks: Ranks
    par: Parallel
    scheduler: object
    steps: int
    identity: dict
    faults: Faults
    result: TrainResult
    on_step: StepHook | None = None
    quiet: bool = False
    start: int = 0
    consecutive_bad: int = 0
    bad_total: int = 0
    last_saved: int = 0
    metrics: MetricsWriter | None = None
    samples_log: object = None
    progress: StepProgress | None = None
    stream: SampleStream = field(init=False)

    def __post_init__(self) -> None:
        self.stream = SampleStream(len(self.setup.examples), self.setup.cfg.train.seed, self.per_step)

    @property
    def per_step(self) -> int:
        return self.setup.cfg.train.micro_batch_size * self.setup.cfg.train.grad_accum

    def say(self, message: str) -> None:
        if not self.quiet:
            console.print(message)

    def open_logs(self) -> None:
        if self.ranks.main:
            self.metrics = MetricsWriter(self.out, purge_step=self.start + 1 if self.start else None)
            self.samples_log = open(self.out / SAMPLES_LOG, "a", encoding="utf-8")
        if not self.quiet:
            self.progress = StepProgress(self.steps, start=self.start)

    def close_logs(self) -> None:
        for log in (self.samples_log, self.metrics, self.progress):
            if log is not None:
                log.close()


@dataclass
class StepRecord:
    """What one optimizer step did (`step` counts from 1)."""

    step: int
    sample_ids: list[int]
    loss: float
    lr: float
    grad_norm: float
    finite: bool
    loss_scale: float | None
    trained_tokens: int
    tokens: int
    seconds: float
    extra: dict = field(default_factory=dict)
    """Objective-specific metrics (preference tuning: rewards, accuracy, log-probabilities)."""


def run_steps(run: Run) -> None:
    """Every step from run.start to run.steps, stopping early (checkpointed) on a stop request."""
    run.setup.model.train()
    run.open_logs()
    try:
        with StopRequests() as stop:
            one_step = train_step if run.setup.objective is None else pref_train_step
            for step in range(run.start, run.steps):
                after_step(run, one_step(run, step), stop)
    finally:
        run.close_logs()
    assert run.last_saved == run.steps


def train_step(run: Run, step: int) -> StepRecord:
    """One optimizer step (0-based `step`) over this process's share of the step's samples."""
    setup, ranks, par = run.setup, run.ranks, run.par
    t0 = time.perf_counter()
    ids = run.stream.ids(step)
    mine = ranks.shard(ids)
    micro = micro_batches(setup, mine) if mine else []
    n_trained = int(ranks.sum(sum(trained_tokens(b) for b in micro)))
    rounds = int(ranks.max(len(micro)))  # every process runs as many micro-steps (collectives must match)
    filler = micro[0] if micro else (micro_batches(setup, ids[:1])[0] if rounds else None)
    local_sum = torch.zeros((), dtype=torch.float64, device=setup.device)  # read once, after the step's backwards
    for i in range(rounds):
        real_batch = i < len(micro)
        b = (micro[i] if real_batch else filler).to(setup.device)
        with par.micro_step(i == rounds - 1):
            # token-weighted over the global batch; the strategies' mean over processes is undone by * world
            weight = ranks.world / n_trained if real_batch else 0.0
            token_loss = par.loss_and_backward(b, weight, poison=run.faults.loss_is_nan(step + 1))
        if real_batch:
            local_sum += token_loss
    loss = ranks.sum(local_sum.item()) / n_trained if n_trained else float("nan")
    lr, scale, grad_norm, finite = _optimizer_step(run, step, loss)
    real = int(ranks.sum(sum(b.real_tokens for b in micro)))
    return StepRecord(step + 1, ids, loss, lr, grad_norm, finite, scale, n_trained, real, time.perf_counter() - t0)


def _pair_batch(setup: Setup, pairs: list, ids: list[int]):
    """Pairs `ids` of `pairs` as one micro-batch, as this run batches them (on the CPU; .to(device) when used)."""
    from qflash.train.preference import pair_batch

    return pair_batch(pairs, ids, capacity=setup.cfg.data.max_len, varlen=setup.levers.attention.varlen,
                      pad_id=setup.tokenizer.pad_token_id, chosen_prompt=setup.objective.name == "orpo")


def evaluate_pairs(run: Run) -> dict[str, float]:
    """Preference tuning's held-out numbers at a train.eval_every step: the objective's loss over the held-out
    pairs (`eval_loss`) and the training metrics on them (`eval_rewards/accuracy`, `eval_rewards/margin`, ...),
    against the same reference as training (dpo: the starting model's log-probabilities of the held-out pairs,
    scored once). Eval mode (no dropout), no gradients, the RNG state untouched; every process the same pairs."""
    from qflash.train.held_out import rng_untouched
    from qflash.train.preference import mean_stats

    setup, cfg = run.setup, run.setup.cfg
    pairs, obj = setup.eval_examples, setup.objective
    mb = cfg.train.micro_batch_size
    groups = [list(range(k, min(k + mb, len(pairs)))) for k in range(0, len(pairs), mb)]
    micro = [_pair_batch(setup, pairs, g) for g in groups]
    chosen_tokens = sum(int((pb.owner % 2 == 0).sum()) for pb in micro)
    w_pair, w_token = 1.0 / len(pairs), 1.0 / max(chosen_tokens, 1)
    total = torch.zeros((), dtype=torch.float64, device=setup.device)
    stats = torch.zeros(8, dtype=torch.float64, device=setup.device)
    model = setup.model
    was_training = model.training
    model.eval()
    try:
        with rng_untouched(), torch.no_grad():
            for g, pb in zip(groups, micro):
                ref = setup.eval_reference[g].float().to(setup.device) if setup.eval_reference is not None else None
                pb = pb.to(setup.device)
                part, st = run.par.module(**batch_fields(pb.batch), pref=(pb.owner, pb.answer, pb.pairs, obj, ref,
                                                                          w_pair, w_token))
                total += part
                stats += st
    finally:
        model.train(was_training)
    means = mean_stats(stats.tolist(), len(pairs))
    return {"eval_loss": float(total), **{f"eval_{k}": v for k, v in means.items()}}


def pref_train_step(run: Run, step: int) -> StepRecord:
    """One optimizer step of preference tuning over this process's share of the step's pairs (preference.py):
    micro-batches of micro_batch_size pairs, each pair's loss weighted 1 / (the step's pairs, every process)."""
    from qflash.train.preference import mean_stats

    setup, ranks, par, cfg = run.setup, run.ranks, run.par, run.setup.cfg
    t0 = time.perf_counter()
    ids = run.stream.ids(step)
    mine = ranks.shard(ids)
    mb = cfg.train.micro_batch_size
    groups = [mine[k:k + mb] for k in range(0, len(mine), mb)]
    micro = [_pair_batch(setup, setup.examples, g) for g in groups]
    rounds = int(ranks.max(len(micro)))
    filler = micro[0] if micro else (_pair_batch(setup, setup.examples, ids[:1]) if rounds else None)
    chosen_tokens = int(ranks.sum(sum(int((pb.owner % 2 == 0).sum()) for pb in micro)))  # orpo's, rpo's NLL tokens
    w_pair, w_token = ranks.world / len(ids), ranks.world / max(chosen_tokens, 1)
    local = torch.zeros((), dtype=torch.float64, device=setup.device)
    stats = torch.zeros(8, dtype=torch.float64, device=setup.device)
    for i in range(rounds):
        real = i < len(micro)
        group = groups[i] if real else ids[:1]
        pb = (micro[i] if real else filler).to(setup.device)
        reference = (setup.reference[group].float().to(setup.device) if setup.reference is not None else None)
        with par.micro_step(i == rounds - 1):
            part, st = par.pref_loss_and_backward(pb, setup.objective, reference, w_pair if real else 0.0,
                                                  w_token if real else 0.0, poison=run.faults.loss_is_nan(step + 1))
        if real:
            local += part
            stats += st
    loss = ranks.sum(local.item()) / ranks.world
    totals = [ranks.sum(v) for v in stats.tolist()]
    lr, scale, grad_norm, finite = _optimizer_step(run, step, loss)
    real_tokens = int(ranks.sum(sum(pb.batch.real_tokens for pb in micro)))
    trained = int(ranks.sum(sum(int(pb.answer.sum()) for pb in micro)))
    return StepRecord(step + 1, ids, loss, lr, grad_norm, finite, scale, trained, real_tokens,
                      time.perf_counter() - t0, extra=mean_stats(totals, len(ids)))


def _optimizer_step(run: Run, step: int, loss: float) -> tuple[float, float | None, float, bool]:
    """After the step's backwards: (lr, loss scale, grad norm, applied). A finite step moves the weights and the
    schedule; a non-finite one is skipped (`_skipped`)."""
    lr = run.scheduler.get_last_lr()[0]
    scale = run.par.loss_scale()
    grad_norm, finite = run.par.step(math.isfinite(loss))
    if finite:
        run.scheduler.step()
        run.consecutive_bad = 0
    else:
        _skipped(run, step + 1, loss, grad_norm, scale)
    return lr, scale, grad_norm, finite


def _skipped(run: Run, step: int, loss: float, grad_norm: float, scale: float | None) -> None:
    """A skipped step: no optimizer or scheduler step, so weights, moments and LR stay as they were."""
    run.bad_total += 1
    if scale is not None and math.isfinite(loss) and scale >= 1.0:
        # fp16: the scaled gradients overflowed; the scaler lowered the scale for the next step.
        # Counted, but not toward max_bad_steps while the scale is still above 1 (it starts at 2^16).
        console.print(f"[yellow]step {step}: fp16 gradients overflowed at loss scale {scale:g}; skipped, scale now "
                      f"{run.par.loss_scale():g} ({run.bad_total} skipped in all)[/]")
    else:
        run.consecutive_bad += 1
        console.print(f"[red]step {step}: non-finite loss ({loss}) or gradient norm ({grad_norm}); skipped "
                      f"({run.consecutive_bad} in a row, {run.bad_total} in all)[/]")


def after_step(run: Run, rec: StepRecord, stop: StopRequests) -> None:
    """The step's record into the result and the logs; held-out loss when due; the abort rule; a checkpoint
    when due or asked for (then a stop request ends the run)."""
    cfg = run.setup.cfg
    values = _account(run, rec)
    if run.samples_log is not None:
        run.samples_log.write(json.dumps({"step": rec.step, "sample_ids": rec.sample_ids}) + "\n")
        run.samples_log.flush()
    evaluate = cfg.train.eval_every > 0 and (rec.step % cfg.train.eval_every == 0 or rec.step == run.steps)
    if evaluate:
        # every process, the same batches (through the strategy's wrapper), so the same number
        if run.setup.objective is None:
            values["eval_loss"] = evaluate_held_out(run.setup, run.setup.model, loss_fn=run.par.loss)
        else:
            values.update(evaluate_pairs(run))
        run.result.eval_losses.append((rec.step, values["eval_loss"]))
    if run.metrics is not None and (evaluate or rec.step % cfg.train.log_every == 0 or rec.step == run.steps):
        run.metrics.write(rec.step, values)
    if run.progress is not None:
        run.progress.update(rec.step, rec.loss, rec.lr, rec.tokens / rec.seconds)
    if run.on_step is not None:
        run.on_step(rec.step, values)
    if run.consecutive_bad >= cfg.train.max_bad_steps:
        raise TrainingAborted(
            f"{run.consecutive_bad} consecutive steps (up to step {rec.step}) had a non-finite loss or gradient; "
            f"stopped. Last good checkpoint: {newest_complete(run.out) or 'none'}. Lower train.lr, check the data "
            "with `qflash data check`, or raise train.max_bad_steps"
        )
    # A periodic save waits for a good step, so the newest checkpoint never sits inside a bad streak.
    periodic = rec.step % cfg.train.save_every == 0 and rec.finite
    # A signal may reach the processes at different steps: they stop together at the first.
    stopping = run.ranks.max(stop.signum or 0)
    if periodic or rec.step == run.steps or stopping:
        path = checkpoint(run, rec.step)
        run.last_saved = rec.step
        if stopping:
            raise TrainingInterrupted(int(stopping), rec.step, str(path or run.out / CKPT_DIR))


def _account(run: Run, rec: StepRecord) -> dict:
    """The step into the run's result; its metrics line."""
    r = run.result
    r.step_seconds.append(rec.seconds)
    r.steps = rec.step
    r.samples += len(rec.sample_ids)
    r.tokens += rec.tokens
    r.trained_tokens += rec.trained_tokens
    r.losses.append(rec.loss)
    r.last_extra = rec.extra
    return {
        "loss": rec.loss if rec.finite else None,
        "lr": rec.lr,
        "grad_norm": rec.grad_norm if rec.finite else None,
        "skipped": not rec.finite,
        **({"loss_scale": rec.loss_scale} if rec.loss_scale is not None else {}),
        "trained_tokens": rec.trained_tokens,
        "tokens": rec.tokens,
        "tokens_per_s": rec.tokens / rec.seconds,
        "epoch": run.stream.epoch_of(rec.step),
        **{k: (v if rec.finite else None) for k, v in rec.extra.items()},
    }


def checkpoint(run: Run, step: int) -> Path | None:
    """Every process takes part (the weights and optimizer state are gathered); process 0 writes."""
    cfg, par = run.setup.cfg, run.par
    state = {
        "step": step,
        "samples_per_step": run.per_step,
        "consumed_samples": step * run.per_step,
        "epoch": run.stream.epoch_of(step),
        "seed": cfg.train.seed,
        "total_steps": run.steps,
        "consecutive_bad": run.consecutive_bad,
        "bad_total": run.bad_total,
        "identity": run.identity,
        "loss_scaler": par.scaler_state(),  # fp16: the dynamic loss scale and its growth counter
    }
    weights, opt_state = par.full_trainable(), par.full_optimizer_state()  # every process: collectives
    path = (save_checkpoint(run.out, step, weights, opt_state, run.scheduler, state, cfg.train.keep, run.faults)
            if run.ranks.main else None)
    run.ranks.barrier()
    return path
