"""`qflash bench`: training-step throughput and memory on a named shape, against the seeds' recipe.

qflash side: the training code itself (NF4 via load_base_model, LoRA via add_lora, packed batches,
the attention facade, the chunked loss, the optimizer of build_optimizer, autocast bf16).
Reference side (the seeds' recipe): transformers + bitsandbytes NF4 double quant,
peft.prepare_model_for_kbit_training, SDPA, gradient checkpointing, paged AdamW 32-bit, the HF
loss on full logits; varlen batches padded in groups of 4 sorted by length. Two variants:
  reference      as the seeds' TrainingArguments have it (fp16=False, bf16=False): no mixed
                 precision, so after prepare_model_for_kbit_training's fp32 upcast the LoRA
                 matmuls, lm_head and logits run in fp32; only the NF4 matmuls use the bf16
                 compute dtype.
  reference-amp  the same plus bf16 autocast (TrainingArguments bf16=True): the stronger baseline.

Throughput counts real tokens only. MFU uses FLOPs/token = 4*N + attention, where N is every
parameter that does matmul work per token (all but the input embedding; LoRA training needs the
forward and the input gradients, not weight gradients) and attention = 6 * layers * hidden * n for a
causal document of n tokens (forward QK^T and AV, backward twice that), averaged over tokens.
Recomputation from activation checkpointing is not counted.
"""

from __future__ import annotations

import datetime as dt
import gc
import json
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from qflash.bench.common import (  # noqa: F401 (re-exported: bench/distributed.py, the GPU tests)
    BENCH_STEPS, QFLASH_OVERRIDES, TARGETS, Precision, _free, _sync, _timed, qflash_config, qflash_model,
)
from qflash.bench.preference import TRL_RECIPES, dpo_record, print_dpo
from qflash.bench.shapes import model_config, param_counts, random_model_dir
from qflash.data.batching import Batch, packed_micro_batches
from qflash.data.template import IGNORE, Example

PEAK_BF16_FLOPS = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}


@dataclass
class Measured:
    recipe: str
    tokens_per_s: float | None = None
    step_s: float | None = None
    peak_mem_gb: float | None = None
    peak_reserved_gb: float | None = None  # what the caching allocator held: CUDA graphs' pools included
    graphs: str | None = None  # train.cuda_graphs' summary, when the step went through GraphedLoss
    losses: list[float] = field(default_factory=list)
    warmup_s: list[float] = field(default_factory=list)  # the warm-up steps' times (the first compiles)
    error: str | None = None
    max_tokens: int | None = None  # maxlen workload


def workload_docs(name: str, vocab: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    if name == "fixed":
        return [rng.integers(0, vocab, 2048) for _ in range(4)]
    if name == "varlen":
        lengths = np.clip(rng.lognormal(mean=math.log(500), sigma=0.8, size=32).round().astype(int), 32, 2048)
        return [rng.integers(0, vocab, int(n)) for n in lengths]
    raise KeyError(name)


def flops_per_token(shape: str, docs: list[np.ndarray]) -> float:
    cfg = model_config(shape)
    _, n_compute = param_counts(shape)
    lengths = np.array([len(d) for d in docs], dtype=np.float64)
    attn = 6 * cfg.num_hidden_layers * cfg.hidden_size * float((lengths * lengths).sum() / lengths.sum())
    return 4 * n_compute + attn


# ------------------------------------------------------------------------------------------------
# qflash

def qflash_loss(model, params, cfg=None):
    """The micro-batch function of qflash_step: `(batch, scale) -> loss_sum`, backward done; through CUDA
    graphs when train.cuda_graphs and the step allows (the training loop's choice, train/graphs.py)."""
    from qflash.train.graphs import GraphedLoss, graph_blocker
    from qflash.train.loss import loss_sum

    cfg = cfg or qflash_config(0.0, 2e-4, "auto")
    if Precision.scaler is not None:
        return None  # fp16: qflash_step's eager path with the loss scaler (no CUDA graphs: the scale changes)
    device = next(p.device for p in params)
    blocker = graph_blocker(model, device, cfg.train.cuda_graphs)
    if blocker is None:
        return GraphedLoss(model, params, fused_ce=Precision.fused_ce)

    def eager(batch, scale):
        loss = loss_sum(model, batch, fused_ce=Precision.fused_ce)
        (loss * scale).backward()
        return loss.detach()

    return eager


def qflash_batches(docs: list[np.ndarray], capacity: int, model: torch.nn.Module) -> list[Batch]:
    """`docs` packed for `model`'s attention (cu_seqlens for a varlen kernel, else restarting positions)."""
    from qflash.model.attention import choice_of

    examples = [Example(d, d) for d in docs]
    # micro-batch: 4 bins of `capacity` tokens, like the fixed workload's 4 x 2048
    varlen = choice_of(model).varlen
    return [b.to(torch.device("cuda")) for b in
            packed_micro_batches(examples, list(range(len(docs))), 4, capacity, 0, varlen=varlen)]


def qflash_step(model, optimizer, params, batches: list[Batch], micro=None) -> float:
    """One optimizer step; `micro`: qflash_loss's micro-batch function (default: eager loss_sum)."""
    from qflash.data.batching import trained_tokens
    from qflash.train.loss import loss_sum

    n = sum(trained_tokens(b) for b in batches)
    scaler = Precision.scaler
    total = 0.0
    for b in batches:
        with torch.autocast("cuda", dtype=Precision.dtype):
            if micro is not None:
                loss = micro(b, 1.0 / n) / n
            else:
                loss = loss_sum(model, b, fused_ce=Precision.fused_ce) / n
                (scaler.scale(loss) if scaler is not None else loss).backward()
        total += loss.detach()  # read once, at the end: no sync between micro-batches
    if scaler is not None:
        scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    if scaler is not None:
        scaler.step(optimizer)  # skipped where the scaled gradients overflowed
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(total)


def prepared_step(shape: str, workload: str, overrides: list[str], dropout: float = 0.0):
    """The bench's qflash step on a random-weight `shape` model and `workload`, ready to call, and the workload's
    documents (for bench/experiments: the same model, batches and step as `qflash bench`)."""
    from qflash.paths import qflash_home

    QFLASH_OVERRIDES[:] = overrides
    model_dir = random_model_dir(shape, qflash_home() / "bench-models")
    docs = workload_docs(workload, model_config(shape).vocab_size)
    model, optimizer, params = qflash_model(model_dir, dropout, 2e-4, "auto", 0)
    batches = qflash_batches(docs, 2048, model)
    micro = qflash_loss(model, params) if workload == "fixed" else None  # as measure() decides
    return (lambda: qflash_step(model, optimizer, params, batches, micro)), docs


# ------------------------------------------------------------------------------------------------
# the seeds' recipe

def reference_model(model_dir: Path, dropout: float, lr: float):
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    # use_kernels=False: the seeds' recipe as written (transformers 5.25 would otherwise swap in Hugging Face Hub
    # kernels wherever the `kernels` package is installed, and fail offline: device session 14).
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), quantization_config=quant, dtype=torch.bfloat16,
                                                 attn_implementation="sdpa", device_map={"": 0}, use_kernels=False)
    model.config.use_cache = False
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(model, LoraConfig(r=64, lora_alpha=16, lora_dropout=dropout, target_modules=TARGETS,
                                             bias="none", task_type="CAUSAL_LM"))
    model.train()  # as the HF Trainer does
    params = [p for p in model.parameters() if p.requires_grad]
    return model, bnb.optim.PagedAdamW32bit(params, lr=lr), params


def reference_batches(docs: list[np.ndarray]) -> list[dict]:
    """Padded batches of 4, sorted by length (the seeds' group_by_length)."""
    order = sorted(range(len(docs)), key=lambda i: len(docs[i]))
    out = []
    for k in range(0, len(order), 4):
        group = [docs[i] for i in order[k : k + 4]]
        width = max(len(d) for d in group)
        ids = torch.zeros((len(group), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, IGNORE)
        for r, d in enumerate(group):
            ids[r, : len(d)] = torch.as_tensor(d)
            labels[r, : len(d)] = torch.as_tensor(d)
            mask[r, : len(d)] = 1
        out.append({"input_ids": ids.cuda(), "attention_mask": mask.cuda(), "labels": labels.cuda()})
    return out


REFERENCES = ("reference", "reference-amp")


def reference_step(model, optimizer, params, batches: list[dict], amp: bool) -> float:
    total = 0.0
    for b in batches:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            loss = model(**b).loss / len(batches)
        loss.backward()
        total += loss.item()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total


# ------------------------------------------------------------------------------------------------

def _measure_once(recipe: str, model_dir: Path, docs: list[np.ndarray], warmup: int, steps: int, dropout: float,
                  attention: str, seed: int, graphs: bool = True) -> Measured:
    out = Measured(recipe)
    if recipe == "qflash":
        model, optimizer, params = qflash_model(model_dir, dropout, 2e-4, attention, seed)
        batches = qflash_batches(docs, 2048, model)
        micro = qflash_loss(model, params) if graphs else None
        step = lambda: qflash_step(model, optimizer, params, batches, micro)  # noqa: E731
    else:
        model, optimizer, params = reference_model(model_dir, dropout, 2e-4)
        batches = reference_batches(docs)
        step = lambda: reference_step(model, optimizer, params, batches, recipe == "reference-amp")  # noqa: E731
    torch.cuda.reset_peak_memory_stats()
    out.losses, times = _timed(step, warmup, steps, out.warmup_s)
    out.step_s = statistics.median(times)
    out.tokens_per_s = sum(len(d) for d in docs) / out.step_s
    out.peak_mem_gb = torch.cuda.max_memory_allocated() / 1e9
    out.peak_reserved_gb = torch.cuda.max_memory_reserved() / 1e9
    if recipe == "qflash" and hasattr(micro, "summary"):
        out.graphs = micro.summary()
    return out  # the model, optimizer and batches die with this frame


def measure(recipe: str, model_dir: Path, docs: list[np.ndarray], *, warmup: int, steps: int, dropout: float,
            attention: str, seed: int = 0, graphs: bool = True) -> Measured:
    """`graphs`: the step may use train.cuda_graphs. Only for workloads whose batch shapes repeat from step to
    step in real training too (`fixed`): the bench reuses one step's batches, and replaying `varlen`'s would
    measure something training on fresh variable-length data does not get."""
    try:
        return _measure_once(recipe, model_dir, docs, warmup, steps, dropout, attention, seed, graphs)
    except torch.OutOfMemoryError as e:
        return Measured(recipe, error=f"out of memory: {str(e).splitlines()[0]}")
    finally:
        _free()


def measure_maxlen(recipe: str, model_dir: Path, vocab: int, attention: str, limit: int = 262144) -> Measured:
    """Longest single sequence that trains one step, doubling from 8k."""
    try:
        return _maxlen_once(recipe, model_dir, vocab, attention, limit)
    finally:
        _free()


def _maxlen_once(recipe: str, model_dir: Path, vocab: int, attention: str, limit: int) -> Measured:
    out = Measured(recipe)
    if recipe == "qflash":
        model, optimizer, params = qflash_model(model_dir, 0.0, 2e-4, attention, 0)
    else:
        model, optimizer, params = reference_model(model_dir, 0.0, 2e-4)
    rng = np.random.default_rng(0)
    n = 8192
    while n <= limit:
        doc = rng.integers(0, vocab, n)
        try:
            torch.cuda.reset_peak_memory_stats()
            if recipe == "qflash":
                qflash_step(model, optimizer, params, qflash_batches([doc], n, model))
            else:
                reference_step(model, optimizer, params, reference_batches([doc]), recipe == "reference-amp")
            out.max_tokens, out.peak_mem_gb = n, torch.cuda.max_memory_allocated() / 1e9
            print(f"  maxlen {recipe}: {n} tokens ok, peak {out.peak_mem_gb:.1f} GB", flush=True)
        except torch.OutOfMemoryError:
            print(f"  maxlen {recipe}: {n} tokens out of memory", flush=True)
            optimizer.zero_grad(set_to_none=True)
            break
        finally:
            gc.collect()
            torch.cuda.empty_cache()
        n *= 2
    return out


def _losses(recipe: str, model_dir: Path, data, steps: int, attention: str, init: dict | None):
    if recipe == "qflash":
        model, optimizer, params = qflash_model(model_dir, 0.0, 1e-4, attention, 0)
        batches = [qflash_batches(d, 2048, model) for d in data]
        micro = qflash_loss(model, params)
        step = lambda i: qflash_step(model, optimizer, params, batches[i % len(batches)], micro)  # noqa: E731
    else:
        model, optimizer, params = reference_model(model_dir, 0.0, 1e-4)
        batches = [reference_batches(d) for d in data]
        amp = recipe == "reference-amp"
        step = lambda i: reference_step(model, optimizer, params, batches[i % len(batches)], amp)  # noqa: E731
    if init is None:
        init = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    else:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if p.requires_grad:
                    p.copy_(init[n])
    return [step(i) for i in range(steps)], init


def parity(model_dir: Path, vocab: int, steps: int, attention: str, references: list[str]) -> dict:
    """Per-step loss of qflash vs each reference, dropout 0, same data and same initial LoRA weights."""
    rng = np.random.default_rng(1)
    data = [[rng.integers(0, vocab, 2048) for _ in range(4)] for _ in range(2)]  # two batches, alternating
    ours, init = _losses("qflash", model_dir, data, steps, attention, None)
    _free()
    out: dict = {"qflash_losses": ours}
    for recipe in references:
        theirs, _ = _losses(recipe, model_dir, data, steps, attention, init)
        _free()
        key = recipe.replace("-", "_")
        out[f"{key}_losses"] = theirs
        out[f"{key}_max_rel_diff"] = max(abs(a - b) / abs(b) for a, b in zip(ours, theirs))
    return out


def versions() -> dict:
    import accelerate
    import bitsandbytes
    import peft
    import transformers

    return {
        "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "transformers": transformers.__version__, "peft": peft.__version__, "bitsandbytes": bitsandbytes.__version__,
        "accelerate": accelerate.__version__,
    }


def run_bench(shape: str, workloads: list[str], *, against: str | None, steps: int, warmup: int, dropout: float,
              attention: str, out_dir: Path, parity_steps: int, cache: Path, overrides: list[str] | None = None) -> list[dict]:
    from qflash.model.attention import choose

    QFLASH_OVERRIDES[:] = overrides or []
    qcfg = qflash_config(dropout, 2e-4, attention)  # validates the overrides before any work
    refs = [r for r in (against or "").split(",") if r]
    unknown = set(refs) - set(REFERENCES) - set(TRL_RECIPES)
    if unknown:
        raise SystemExit(f"--against: unknown recipe(s) {sorted(unknown)}; choose from "
                         f"{', '.join(REFERENCES + TRL_RECIPES)}")
    workloads = [w for w in workloads if w]  # `--workload "" --parity N`: the parity run alone
    unknown = set(workloads) - {"fixed", "varlen", "maxlen", "dpo"}
    if unknown:
        raise SystemExit(f"--workload: unknown {sorted(unknown)}; choose from fixed, varlen, maxlen, dpo")
    if not torch.cuda.is_available():
        raise SystemExit("qflash bench needs a CUDA GPU")
    choice = choose(attention, cudnn=qcfg.attention.cudnn)
    backend = choice.backend
    device = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in device), None)
    t0 = time.perf_counter()
    model_dir = random_model_dir(shape, cache)
    print(f"random {shape} weights ready in {time.perf_counter() - t0:.0f}s at {model_dir}", flush=True)
    vocab = model_config(shape).vocab_size
    results = []
    common = {
        "device": device, "shape": shape, "lora_r": 64, "lora_alpha": 16, "lora_dropout": dropout,
        "quant": f"nf4 double-quant, {qcfg.quant.compute_dtype} compute", "attention_backend": backend,
        # attention.cudnn as resolved: documents of one length (`fixed`) go to cuDNN's kernel
        "attention_cudnn_equal_length": choice.equal_dense_max > 0,
        "residual_dtype": qcfg.quant.residual_dtype, "lora_fused": qcfg.lora.fused, "kernels": dict(vars(qcfg.kernels)),
        "optimizer": qcfg.train.optimizer, "overrides": list(QFLASH_OVERRIDES),
        "git_commit": os.environ.get("QFLASH_GIT_COMMIT"), "versions": versions(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "flops_basis": "4N + 6*layers*hidden*n per token (N = params except input embedding; no recompute)",
    }
    for wl in workloads:
        rec = {**common, "workload": wl}
        if wl == "dpo":
            rec.update(dpo_record(model_dir, vocab, refs, warmup=warmup, steps=steps))
            results.append(rec)
            print_dpo(rec)
            continue
        if wl == "maxlen":
            ours = measure_maxlen("qflash", model_dir, vocab, attention)
            rec.update({"max_tokens": ours.max_tokens, "peak_mem_gb": ours.peak_mem_gb, "tokens_per_s": None, "mfu": None})
            for recipe in REFERENCES:
                key = recipe.replace("-", "_")
                ref = measure_maxlen(recipe, model_dir, vocab, attention) if recipe in refs else None
                rec.update({f"{key}_max_tokens": ref.max_tokens if ref else None,
                            f"{key}_peak_mem_gb": ref.peak_mem_gb if ref else None, f"{key}_tokens_per_s": None})
        else:
            docs = workload_docs(wl, vocab)
            ours = measure("qflash", model_dir, docs, warmup=warmup, steps=steps, dropout=dropout, attention=attention,
                           graphs=wl == "fixed")
            fpt = flops_per_token(shape, docs)
            rec.update({"real_tokens_per_step": int(sum(len(d) for d in docs)),
                        "steps_timed": steps, "warmup_steps": warmup, "warmup_step_s": ours.warmup_s,
                        "tokens_per_s": ours.tokens_per_s, "step_s": ours.step_s, "peak_mem_gb": ours.peak_mem_gb,
                        "peak_reserved_gb": ours.peak_reserved_gb, "cuda_graphs": ours.graphs,
                        "mfu": (ours.tokens_per_s * fpt / peak) if (peak and ours.tokens_per_s) else None,
                        "flops_per_token": fpt, "error": ours.error, "losses": ours.losses})
            for recipe in REFERENCES:
                key = recipe.replace("-", "_")
                ref = (measure(recipe, model_dir, docs, warmup=warmup, steps=steps, dropout=dropout, attention=attention)
                       if recipe in refs else None)
                ok = bool(ref and ref.tokens_per_s and ours.tokens_per_s)
                rec.update({f"{key}_tokens_per_s": ref.tokens_per_s if ref else None,
                            f"{key}_step_s": ref.step_s if ref else None,
                            f"{key}_peak_mem_gb": ref.peak_mem_gb if ref else None,
                            f"{key}_error": ref.error if ref else None,
                            f"{key}_losses": ref.losses if ref else None,
                            f"speedup_vs_{key}": ours.tokens_per_s / ref.tokens_per_s if ok else None})
            rec["speedup"] = rec["speedup_vs_reference"]
        results.append(rec)
        _print(rec)
    if parity_steps:  # without --against: qflash's own per-step losses (e.g. fp16 beside bf16)
        p = parity(model_dir, vocab, parity_steps, attention, refs)
        rec = {**common, "workload": "parity", "lora_dropout": 0.0, "steps": parity_steps, **p,
               "tokens_per_s": None, "peak_mem_gb": None, "mfu": None, "reference_tokens_per_s": None,
               "reference_peak_mem_gb": None}
        results.append(rec)
        ql = p["qflash_losses"]
        print(f"qflash loss over {parity_steps} steps: {ql[0]:.4f} -> {ql[-1]:.4f} (last 5: "
              f"{', '.join(f'{x:.4f}' for x in ql[-5:])})", flush=True)
        for recipe in refs:
            key = recipe.replace("-", "_")
            print(f"parity vs {recipe} over {parity_steps} steps: max relative loss difference "
                  f"{p[f'{key}_max_rel_diff']:.4%}", flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
    tag = device.replace(" ", "-").replace("/", "-")
    for rec in results:
        (out_dir / f"{stamp}_{shape}_{rec['workload']}_{tag}.json").write_text(json.dumps(rec, indent=1))
    return results


def _print(rec: dict) -> None:
    if rec["workload"] == "maxlen":
        line = f"{rec['shape']} maxlen: qflash {rec['max_tokens']} tokens (peak {rec['peak_mem_gb'] or 0:.1f} GB)"
        for recipe in REFERENCES:
            key = recipe.replace("-", "_")
            if rec.get(f"{key}_max_tokens") is not None:
                line += f"; {recipe} {rec[f'{key}_max_tokens']} tokens (peak {rec[f'{key}_peak_mem_gb']:.1f} GB)"
        print(line, flush=True)
        return
    line = (f"{rec['shape']} {rec['workload']}: qflash {rec['tokens_per_s'] or 0:,.0f} tok/s, "
            f"peak {rec['peak_mem_gb'] or 0:.1f} GB ({rec.get('peak_reserved_gb') or 0:.1f} reserved), "
            f"MFU {rec['mfu'] or 0:.1%}, step {rec.get('step_s') or 0:.3f}s (warm-up steps: "
            f"{', '.join(f'{t:.1f}s' for t in rec.get('warmup_step_s') or [])})"
            + (f" [cuda graphs: {rec['cuda_graphs']}]" if rec.get("cuda_graphs") else ""))
    for recipe in REFERENCES:
        key = recipe.replace("-", "_")
        if rec.get(f"{key}_tokens_per_s"):
            line += (f" | {recipe} {rec[f'{key}_tokens_per_s']:,.0f} tok/s, peak {rec[f'{key}_peak_mem_gb']:.1f} GB"
                     f" -> {rec[f'speedup_vs_{key}']:.2f}x")
        if rec.get(f"{key}_error"):
            line += f" | {recipe} error: {rec[f'{key}_error']}"
    if rec.get("error"):
        line += f" | qflash error: {rec['error']}"
    print(line, flush=True)
