"""The training loop: NF4 base + LoRA, token-weighted loss over gradient accumulation, on Accelerate.

One optimizer step = `grad_accum` micro-batches. Each micro-batch contributes
sum(token cross-entropy) / (trained tokens of the whole step), so the step's loss is the mean over
every trained token of the step however the samples are split into micro-batches.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import random
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from qflash.config import Config, check_paths
from qflash.data.pipeline import build_examples, data_fingerprint
from qflash.data.replay import ReplayStats, build_replay
from qflash.data.replay import key_for as replay_key
from qflash.data.template import ChatRenderer, Example
from qflash.errors import ConfigError, StorageError
from qflash.model.loading import (
    add_tokens,
    compute_dtype,
    fit_embeddings_to_tokenizer,
    load_configured_base,
    load_tokenizer,
    pick_device,
    refuse_unloadable,
    resolve_model_dir,
)
from qflash.model.lora import layer_paths, trained_embeddings_problem
from qflash import rundir
from qflash.paths import inside, sha256_file, write_file_durably
from qflash.rundir import ADAPTER_DIR, SAMPLES_LOG
from qflash.train.checkpoint import (
    CKPT_DIR,
    complete_checkpoints,
    load_checkpoint,
    remove_stale_temporaries,
    restore_rng,
    set_aside_newer,
)
from qflash.train.checkpoint import LoadedCheckpoint
from qflash.train.distributed import Parallel, Ranks, fsdp_requested, launched_distributed, make_accelerator, ranks_of
from qflash.train import levers as levers_mod
from qflash.train.faults import Faults
from qflash.train.steps import (  # noqa: F401 (micro_batches, evaluate_held_out, TrainingAborted: the loop's API)
    Run,
    Setup,
    StepHook,
    TrainingAborted,
    TrainResult,
    evaluate_held_out,
    micro_batches,
    run_steps,
)
from qflash.ui import console
from qflash.train.resume import RunLock, differences, pick_checkpoint, run_identity



def build_setup(cfg: Config, *, quiet: bool = False) -> Setup:
    check_paths(cfg)
    device = pick_device(cfg.train.device)
    dtype = compute_dtype(cfg.quant.compute_dtype, device)
    model_dir = resolve_model_dir(cfg.model.path)
    refuse_unloadable(model_dir)  # before the data is tokenized
    tok = load_tokenizer(model_dir, cfg.model.trust_remote_code)
    add_tokens(tok, cfg.model.add_tokens)
    renderer = ChatRenderer(tok, cfg.data.template, cfg.data.train_on, cfg.data.train_reasoning)
    objective = None
    if cfg.train.objective != "sft":
        from qflash.data.preference import build_pairs
        from qflash.train.preference import Objective

        objective = Objective.of(cfg)
        build = build_pairs
    else:
        build = build_examples
    # Records skipped (data.on_error=skip) or dropped (data.too_long=drop) are written beside the run.
    examples, stats = build(cfg.data, renderer, split="train", seed=cfg.train.seed,
                            skipped_path=Path(cfg.output_dir) / "skipped-train.jsonl")
    eval_examples: list = []  # Examples, or PairExamples under a preference objective
    if cfg.train.eval_every > 0:
        eval_examples, _ = build(cfg.data, renderer, split="eval", seed=cfg.train.seed,
                                 skipped_path=Path(cfg.output_dir) / "skipped-eval.jsonl")
        if not eval_examples:
            raise ConfigError(f"train.eval_every={cfg.train.eval_every}: the run has no held-out data; set "
                              "data.eval_datasets or data.eval_ratio, or train.eval_every=0")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    model = load_configured_base(cfg, model_dir, device, dtype, sharded=fsdp_requested())
    timings["load"] = time.perf_counter() - t0
    replay = None
    if cfg.data.replay.prompts:
        # The base model answers before LoRA is added: exactly the model that will be trained.
        replay_examples, replay = _base_model_replay(cfg, model, tok, renderer, model_dir, device, dtype,
                                                     n_train=len(examples), quiet=quiet)
        for ex in replay_examples:
            stats.add(ex)
        stats.per_file[f"replay:{cfg.data.replay.prompts}"] = len(replay_examples)
        examples = list(examples) + replay_examples
        timings["replay"] = replay.seconds
    fp = data_fingerprint(cfg.data, tok, replay.digest if replay else None)
    model.config.use_cache = False  # a KV cache is useless in training and unsafe with packed batches
    if cfg.model.add_tokens:
        fit_embeddings_to_tokenizer(model, tok, seed=cfg.train.seed)
    t0 = time.perf_counter()
    levers = levers_mod.resolve(cfg, device, dtype, model, sharded=fsdp_requested(),
                                planned_steps=total_steps(cfg, len(examples)))
    model, levers = levers_mod.apply(model, levers, cfg, seed=cfg.train.seed)
    if cfg.model.add_tokens and (problem := trained_embeddings_problem(model)) is not None:
        raise ConfigError(problem)
    if cfg.model.adapter:
        start_from_adapter(model, cfg, model_dir)
    timings["lora"] = time.perf_counter() - t0
    return Setup(cfg, device, dtype, model_dir, tok, renderer, examples, stats, fp, model, levers, eval_examples,
                 replay, objective=objective, timings=timings)


LORA_KEYS = ("r", "alpha", "target_modules", "rslora", "dora", "modules_to_save")


def start_from_adapter(model, cfg: Config, model_dir: Path) -> None:
    """model.adapter: the LoRA weights of a trained adapter as this run's starting point (same LoRA shape, same
    base model)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    adapter_dir, saved = rundir.find_adapter(cfg.model.adapter, cfg.model.trust_remote_code)
    if saved is not None:
        diffs = [f"lora.{k}: {getattr(saved.lora, k)!r} there, {getattr(cfg.lora, k)!r} here" for k in LORA_KEYS
                 if getattr(saved.lora, k) != getattr(cfg.lora, k)]
        if diffs:
            raise ConfigError(f"model.adapter: {adapter_dir} was trained with other LoRA settings ({'; '.join(diffs)}); "
                              "set this run's lora section to match")
        if saved.model.add_tokens != cfg.model.add_tokens:
            raise ConfigError(f"model.adapter: {adapter_dir} was trained with model.add_tokens={saved.model.add_tokens}, "
                              f"this run has {cfg.model.add_tokens}; set the same tokens (its embedding rows depend on them)")
    base_file = adapter_dir / rundir.BASE_MODEL_FILE
    if base_file.is_file():
        base = Path(base_file.read_text(encoding="utf-8").strip())
        if base.resolve() != model_dir.resolve():
            raise ConfigError(f"model.adapter: {adapter_dir} was trained on {base}, this run's model.path is "
                              f"{model_dir}; use the same base model")
    weights = load_file(str(adapter_dir / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(model, weights)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise ConfigError(f"model.adapter: {adapter_dir} does not fit this model's LoRA layers ({len(missing)} "
                          f"missing, e.g. {missing[:2]}; {len(result.unexpected_keys)} unexpected, e.g. "
                          f"{list(result.unexpected_keys)[:2]})")


def _base_model_replay(cfg: Config, model, tok, renderer: ChatRenderer, model_dir: Path, device, dtype, *,
                       n_train: int, quiet: bool) -> tuple[list[Example], ReplayStats]:
    """data.replay: the base model's greedy answers to the replay prompts (cached), as training samples."""
    from qflash.infer.generate import LoadedModel, answer

    rp = cfg.data.replay
    loaded = LoadedModel(model=model, tokenizer=tok, renderer=renderer, cfg=cfg, has_adapter=False, device=device,
                    dtype=dtype)
    t0 = time.perf_counter()

    def progress(done: int, total: int) -> None:
        if not quiet:
            console.print(f"replay: the base model answers {rp.prompts}: {done}/{total} prompts "
                          f"({time.perf_counter() - t0:.0f}s)")

    def generate(convs):
        was_training = model.training
        model.eval()
        try:
            return answer(loaded, convs, max_new_tokens=rp.max_new_tokens, batch_size=len(convs))
        finally:
            model.train(was_training)

    return build_replay(
        rp, n_train=n_train, seed=cfg.train.seed, max_len=cfg.data.max_len, variables=cfg.data.vars,
        renderer=renderer, generate=generate, progress=progress,
        key=lambda prompts: replay_key(cfg, model_dir, renderer, device, dtype, prompts, rp.max_new_tokens),
    )


def build_optimizer(params: list[torch.nn.Parameter], cfg: Config, device: torch.device) -> torch.optim.Optimizer:
    kind = cfg.train.optimizer
    if kind in ("auto", "adamw"):
        # LoRA states are small: paging buys nothing, and torch's fused AdamW (one kernel for all
        # tensors, same math) costs ~2 ms a step where bnb's paged one launches per tensor (~50 ms, 7B).
        fused = device.type == "cuda"
        return torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                                 betas=tuple(cfg.train.adam_betas), eps=cfg.train.adam_eps, fused=fused)
    if device.type != "cuda":
        raise ConfigError(f"train.optimizer={kind} needs a CUDA GPU; use train.optimizer=adamw on CPU")
    import bitsandbytes as bnb

    cls = bnb.optim.PagedAdamW32bit if kind == "paged_adamw_32bit" else bnb.optim.PagedAdamW8bit
    return cls(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, betas=tuple(cfg.train.adam_betas),
               eps=cfg.train.adam_eps)


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


def save_adapter(setup: Setup, out: Path, weights: dict[str, torch.Tensor] | None = None) -> Path:
    """The run's adapter and metadata into out/adapter (rundir.save_adapter)."""
    return rundir.save_adapter(setup.model, out, setup.cfg, setup.fingerprint, setup.model_dir, weights,
                               tokenizer=setup.tokenizer)


RUN_FILES = (ADAPTER_DIR, CKPT_DIR, "metrics.jsonl", SAMPLES_LOG, "tensorboard", "preference_reference.pt",
             "preference_reference_eval.pt")


def prepare_output_dir(out: Path) -> None:
    """output_dir exists, is writable and its run files stay inside it. Deletes nothing: that waits for the
    run lock (clear_output_dir)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"output_dir: {out}: cannot write there ({e.strerror or e})") from None
    for name in RUN_FILES:
        inside(out, name, "output_dir")  # a symlinked checkpoints/ or adapter/ must not lead elsewhere


def clear_output_dir(out: Path, overwrite: bool) -> None:
    """--overwrite: the previous run's files go; always: adapter temporaries of a killed run. Only under the
    run lock (RunLock): a live run's files and its in-flight adapter must never be deleted."""
    if overwrite:
        for name in RUN_FILES:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    for stale in out.glob(".adapter.*"):
        shutil.rmtree(stale, ignore_errors=True)


def _trim_log(path: Path, last_step: int) -> None:
    """Keep the lines of a JSONL log up to `last_step`, so a resumed run logs each step exactly once."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line cut short by a kill
        if rec.get("step", 0) <= last_step:
            kept.append(line + "\n")
    write_file_durably(path, "".join(kept))


def _trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _restore_weights(ckpt: LoadedCheckpoint, named: dict[str, torch.nn.Parameter]) -> None:
    """The checkpoint's LoRA weights into the (not yet wrapped or sharded) model."""
    if set(named) != set(ckpt.trainable):
        raise ConfigError("train.resume: the checkpoint's LoRA tensors do not match this model's (different targets?)")
    with torch.no_grad():
        for name, p in named.items():
            if p.shape != ckpt.trainable[name].shape:
                raise ConfigError(f"train.resume: {name} has shape {tuple(ckpt.trainable[name].shape)} in the checkpoint, "
                                  f"{tuple(p.shape)} here (lora.r changed?)")
            p.copy_(ckpt.trainable[name])


def run_training(
    setup: Setup,
    *,
    overwrite: bool = False,
    force: bool = False,
    on_step: StepHook | None = None,
    quiet: bool = False,
    faults: Faults | None = None,
) -> TrainResult:
    cfg = setup.cfg
    out = Path(cfg.output_dir)
    accelerator = make_accelerator(cpu=setup.device.type == "cpu")
    ranks = ranks_of(accelerator)
    # Only process 0 touches the run directory (lock, logs, checkpoints, adapter); the others wait.
    if ranks.main:
        prepare_output_dir(out)
    with RunLock(out) if ranks.main else contextlib.nullcontext():
        if ranks.main:
            clear_output_dir(out, overwrite)  # under the lock: never a live run's files
        ranks.barrier()
        try:
            return _run_locked(setup, out, accelerator, ranks, force=force, on_step=on_step,
                               quiet=quiet or not ranks.main, faults=faults or Faults.from_env())
        except OSError as e:
            if e.errno not in STORAGE_ERRNOS:
                raise
            raise stopped_by_storage(e, out) from e


# A write that failed because of the disk, not because of qflash: training stops as one error that says what
# is intact and how to go on (checkpoint writes say so themselves: CheckpointWriteError).
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EFBIG})


def stopped_by_storage(e: OSError, out: Path) -> StorageError:
    """A full (or failing) disk while writing a run's logs, config or adapter: which file, which checkpoint is
    intact, and the command that goes on from it."""
    where = os.fsdecode(e.filename) if e.filename else out
    complete = complete_checkpoints(out)
    intact = (f"the last complete checkpoint, {complete[-1][1].name}, is intact: free space and run the same command "
              "again to resume from it") if complete else "no checkpoint was written yet: free space and start again"
    return StorageError(f"{where}: {e.strerror or e}: training stopped; {intact}")


def _run_locked(setup: Setup, out: Path, accelerator, ranks: Ranks, *, force: bool, on_step: StepHook | None,
                quiet: bool, faults: Faults) -> TrainResult:
    """A run, from its checkpoint or from the start: restore, report, train, save the adapter."""
    named = _trainable(setup.model)
    identity = run_identity(setup.cfg.to_dict(), setup.fingerprint, {n: list(p.shape) for n, p in named.items()},
                            start_adapter=_adapter_digest(setup.cfg))
    ckpt, ckpt_path = _checkpoint_to_resume(setup, out, ranks, identity, force=force, quiet=quiet)
    if setup.objective is not None and setup.objective.needs_reference:
        from qflash.train.preference import EVAL_REFERENCE_FILE, REFERENCE_FILE

        # from the starting weights
        setup.reference = _reference(setup, setup.examples, out / REFERENCE_FILE, ranks, identity, quiet)
        if setup.eval_examples:
            setup.eval_reference = _reference(setup, setup.eval_examples, out / EVAL_REFERENCE_FILE, ranks, identity,
                                              quiet, what="held-out pairs")
    if ckpt is not None:
        _restore_weights(ckpt, named)  # before the strategy wraps or shards the parameters
    run = _new_run(setup, out, accelerator, ranks, named, identity, faults, on_step=on_step, quiet=quiet)
    if ckpt is not None:
        _resume(run, ckpt, ckpt_path)
    if ranks.main:
        _trim_log(out / "metrics.jsonl", run.start)
        _trim_log(out / SAMPLES_LOG, run.start)
        write_file_durably(out / "config.yaml", setup.cfg.to_yaml())
    if run.start >= run.steps:
        return _already_complete(run)
    if not quiet:
        print_banner(run)
    t_start = time.perf_counter()
    run_steps(run)
    run.result.seconds = time.perf_counter() - t_start
    run.result.graphs = run.par.graphed.summary() if run.par.graphed is not None else None
    weights = run.par.full_trainable()
    if ranks.main:
        run.result.adapter_dir = save_adapter(setup, out, weights)
    ranks.barrier()
    return run.result


def _adapter_digest(cfg: Config) -> str | None:
    """model.adapter's weights (sha256), for the run's identity: the same path trained again is another start, so
    neither its checkpoints nor its saved reference log-probabilities may be taken for this run's."""
    if not cfg.model.adapter:
        return None
    adapter_dir, _ = rundir.find_adapter(cfg.model.adapter, cfg.model.trust_remote_code)
    return sha256_file(adapter_dir / "adapter_model.safetensors")


def _reference(setup: Setup, pairs: list, path: Path, ranks: Ranks, identity: dict, quiet: bool,
               what: str = "pairs") -> torch.Tensor:
    """dpo: the starting model's log-probabilities of every pair's answers, computed before any weight changes
    (the weights are still the start's: a checkpoint's are restored after this), saved beside the run and read
    back by a resumed run of the same identity."""
    import hashlib

    from qflash.train.preference import load_reference, reference_logps, save_reference

    key = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()
    saved = load_reference(path, key, len(pairs))
    if saved is not None:
        return saved
    cfg, t0 = setup.cfg, time.perf_counter()

    def progress(done: int, total: int) -> None:
        if not quiet and (done == total or done % (20 * cfg.train.micro_batch_size) == 0):
            share = f" (this process's share of {len(pairs)})" if ranks.distributed else ""
            console.print(f"reference: the starting model scores the {what}: {done}/{total}{share} "
                          f"({time.perf_counter() - t0:.0f}s)")

    values = reference_logps(setup.model, pairs, micro=cfg.train.micro_batch_size,
                             capacity=cfg.data.max_len, varlen=setup.levers.attention.varlen,
                             pad_id=setup.tokenizer.pad_token_id, device=setup.device,
                             autocast_dtype=setup.dtype if setup.dtype != torch.float32 else None, progress=progress,
                             share=(ranks.rank, ranks.world))
    values = ranks.sum_tensor(values)  # each process scored its share of the micro-batches (the rest are zeros)
    setup.timings["reference"] = setup.timings.get("reference", 0.0) + time.perf_counter() - t0
    if ranks.main:
        save_reference(path, values, key)
    ranks.barrier()
    return values


def _checkpoint_to_resume(setup: Setup, out: Path, ranks: Ranks, identity: dict, *, force: bool,
                          quiet: bool) -> tuple[LoadedCheckpoint | None, Path | None]:
    """The newest complete checkpoint to resume from (None: a fresh run); refuses what would lose work."""
    cfg = setup.cfg
    ckpt_path, notes = pick_checkpoint(out, cfg.train.resume)
    for note in notes:
        if not quiet:
            console.print(f"[yellow]{note}[/]")
    if ranks.main:
        remove_stale_temporaries(out)
    ranks.barrier()
    if cfg.train.resume == "never" and complete_checkpoints(out):
        raise ConfigError(f"train.resume=never but {out / CKPT_DIR} holds checkpoints; pass --overwrite to discard them")
    if ckpt_path is None and (out / ADAPTER_DIR).exists():
        raise ConfigError(f"output_dir: {out} already holds a trained adapter; pass --overwrite to replace it or choose another output_dir")
    if ckpt_path is None:
        _rewind(out, 0, ranks, quiet)  # damaged later checkpoints must not outrank the new ones
        return None, None
    ckpt = load_checkpoint(ckpt_path, map_location="cpu")
    diffs = differences(ckpt.state.get("identity", {}), identity)
    if diffs and not force:
        raise ConfigError(
            f"train.resume: {ckpt_path} belongs to a different run: " + "; ".join(diffs[:6])
            + (f"; and {len(diffs) - 6} more" if len(diffs) > 6 else "")
            + ". Pass --force to resume anyway, --overwrite to start over, or choose another output_dir"
        )
    _rewind(out, ckpt.step, ranks, quiet)
    return ckpt, ckpt_path


def _rewind(out: Path, step: int, ranks: Ranks, quiet: bool) -> None:
    """Checkpoints after the step the run goes on from are set aside (checkpoint.set_aside_newer), said once."""
    if ranks.main:
        moved = set_aside_newer(out, step)
        if moved is not None and not quiet:
            aside, names = moved
            console.print(f"[yellow]rewinding to step {step}: the later checkpoints {', '.join(names)} were moved to "
                          f"{aside} (never resumed from; delete it when you no longer need them)[/]")
    ranks.barrier()


def _new_run(setup: Setup, out: Path, accelerator, ranks: Ranks, named: dict, identity: dict, faults: Faults, *,
             on_step: StepHook | None, quiet: bool) -> Run:
    """Optimizer, schedule and the launch's strategy around the model; the step-0 seeds."""
    cfg = setup.cfg
    optimizer = build_optimizer(list(named.values()), cfg, setup.device)
    steps = total_steps(cfg, len(setup.examples))
    scheduler = build_scheduler(optimizer, cfg, steps)
    # Accelerate wraps model + loss for the launch's strategy (DDP, FSDP2, DeepSpeed; nothing alone).
    # Master LoRA weights stay fp32; on GPU their matmuls run in the compute dtype like the base's.
    mixed = setup.dtype if setup.dtype != torch.float32 else None  # the CPU computes in fp32 unless told otherwise
    par = Parallel(accelerator, setup.model, optimizer, micro_batch_size=cfg.train.micro_batch_size,
                   max_grad_norm=cfg.train.max_grad_norm, autocast_dtype=mixed,
                   cuda_graphs=setup.levers.cuda_graphs, fused_ce=setup.levers.fused_ce.on)
    torch.manual_seed(cfg.train.seed + 1_000_003 * ranks.rank)  # LoRA dropout: each process its own masks
    random.seed(cfg.train.seed)
    np.random.seed(cfg.train.seed % 2**32)
    result = TrainResult(out, out / ADAPTER_DIR, 0, 0, 0, 0, 0.0)
    return Run(setup, out, ranks, par, scheduler, steps, identity, faults, result, on_step=on_step, quiet=quiet)


def _resume(run: Run, ckpt: LoadedCheckpoint, ckpt_path: Path) -> None:
    """Optimizer, schedule, RNG, counters and loss scale as the checkpoint left them."""
    run.par.load_optimizer_state(ckpt.optimizer)
    run.scheduler.load_state_dict(ckpt.scheduler)
    if run.ranks.main:  # process 0's RNG; the others keep their own seeds (their dropout masks differ anyway)
        restore_rng(ckpt.state["rng"], ckpt.rng)
    run.start = run.last_saved = run.result.steps = ckpt.step
    run.consecutive_bad, run.bad_total = ckpt.state.get("consecutive_bad", 0), ckpt.state.get("bad_total", 0)
    run.par.load_scaler_state(ckpt.state.get("loss_scaler"))
    run.say(f"resuming from {ckpt_path} (step {run.start}, {run.start * ckpt.state['samples_per_step']} samples "
            "consumed)")


def _already_complete(run: Run) -> TrainResult:
    """A run resumed at its last step: the adapter saved if it is not there yet, nothing trained."""
    if not (run.out / ADAPTER_DIR).exists():
        weights = run.par.full_trainable()
        if run.ranks.main:
            run.result.adapter_dir = save_adapter(run.setup, run.out, weights)
    run.ranks.barrier()
    run.say(f"nothing to do: {run.out} is complete at step {run.start} (raise train.max_steps to continue, or "
            "--overwrite to start over)")
    return run.result


def print_banner(run: Run) -> None:
    """What is about to be trained, on what, how; what the data pipeline left out; every switch."""
    setup, cfg, par, ranks = run.setup, run.setup.cfg, run.par, run.ranks
    what = "samples" if setup.objective is None else "pairs"
    console.print(
        f"[bold]qflash train[/]: {len(setup.examples)} {what} ({setup.stats.tokens:,} tokens, "
        f"{setup.stats.trained_tokens:,} trained), {run.steps} steps of {run.per_step} {what}, "
        f"device {setup.device.type}, compute {str(setup.dtype).replace('torch.', '')}, "
        f"quant {cfg.quant.mode}, LoRA r={cfg.lora.r}"
        + (f", CUDA graphs {par.graphs_note}" if setup.device.type == "cuda" else "")
        + (f", {ranks.world} processes ({par.strategy}{f' over {par.units} modules' if par.units else ''}; "
           f"process r takes samples r, r+{ranks.world}, ... of each step)"
           if ranks.distributed else "")
    )
    st = setup.stats
    if setup.objective is not None:
        console.print(f"  objective: {setup.objective.describe()}; {st.summary()}")
    elif st.skipped or st.dropped_too_long or st.truncated or st.held_out or st.split:
        console.print(
            f"  data: {st.skipped} records skipped {dict(st.problems)}, {st.dropped_too_long} dropped and "
            f"{st.truncated} truncated for data.max_len"
            + (f", {st.split} split into {st.pieces} pieces" if st.split else "")
            + f", {st.held_out} held out for eval"
            + (f"; left-out records in {st.skipped_path}" if st.skipped_path else "")
        )
    if setup.replay is not None:
        console.print("  " + setup.replay.summary(cfg.data.replay))
    console.print("  " + layer_paths(setup.model))
    console.print("  speed and memory switches (train/levers.py; `qflash config explain KEY` for any):\n"
                  + setup.levers.table())


def train(cfg: Config, *, overwrite: bool = False, force: bool = False, quiet: bool = False) -> TrainResult:
    if launched_distributed():
        # torchrun / accelerate launch: set up the process group (and each process's GPU) first;
        # process 0 builds the data (and its caches, replay answers) before the others read them.
        accelerator = make_accelerator(cpu=cfg.train.device == "cpu" or not torch.cuda.is_available())
        main = accelerator.is_main_process
        with accelerator.main_process_first():
            setup = build_setup(cfg, quiet=quiet or not main)
        result = run_training(setup, overwrite=overwrite, force=force, quiet=quiet)
    else:
        main = True
        out = Path(cfg.output_dir)
        prepare_output_dir(out)
        # The lock before anything is built: a second run on a live output_dir is refused at once, before it
        # loads a model or writes a file there (run_training takes the same lock again, re-entrantly).
        with RunLock(out):
            setup = build_setup(cfg, quiet=quiet)
            result = run_training(setup, overwrite=overwrite, force=force, quiet=quiet)
    if not quiet and main:
        print_summary(result, setup)
    return result


def time_to_first_step(timings: dict[str, float], steps: list[float]) -> str:
    """Where the time before training went, and what the first steps cost over a steady one (compiling)."""
    parts = [f"{k} {v:.1f}s" for k, v in timings.items()]
    line = "time to first step: " + ", ".join(parts)
    if steps:
        steady = statistics.median(steps[len(steps) // 2:])  # the second half: compiled and warm
        extra = sum(max(s - steady, 0.0) for s in steps[:5])
        line += (f", first step {steps[0]:.1f}s; steady step {steady:.2f}s (the first 5 steps took {extra:.1f}s "
                 "more: compiling and warm-up)")
    return line


def print_summary(r: TrainResult, setup: Setup) -> None:
    first = r.losses[0] if r.losses else float("nan")
    what = "samples" if setup.objective is None else "pairs"
    console.print(
        f"[bold green]done[/]: {r.steps} steps, {r.samples} {what} "
        f"({r.samples / max(len(setup.examples), 1):.2f} epochs), {r.tokens:,} tokens "
        f"({r.trained_tokens:,} trained) in {r.seconds:.0f}s ({r.tokens / max(r.seconds, 1e-9):,.0f} tok/s); "
        f"loss {first:.4f} -> {r.final_loss:.4f}"
        + (f", held-out loss {r.eval_losses[0][1]:.4f} (step {r.eval_losses[0][0]}) -> {r.eval_losses[-1][1]:.4f}"
           if r.eval_losses else "")
        + (f"; {setup.replay.samples} of the samples were base-model replay" if setup.replay else "")
        + (f"; CUDA graphs: {r.graphs}" if r.graphs else "")
        + (f"; last step: reward accuracy {r.last_extra.get('rewards/accuracy', float('nan')):.2f}, margin "
           f"{r.last_extra.get('rewards/margin', float('nan')):.3f}" if setup.objective is not None and r.last_extra
           else "")
        + "\n"
        + f"  {time_to_first_step(setup.timings, r.step_seconds)}\n"
        f"  adapter      {r.adapter_dir}\n"
        f"  metrics      {r.output_dir / 'metrics.jsonl'}  (TensorBoard: {r.output_dir / 'tensorboard'})\n"
        f"  try it       qflash chat --adapter {r.output_dir} --prompt \"Who are you?\""
    )
