"""`qflash bench --workload dpo`: DPO training steps on a named shape, beside TRL's DPOTrainer + PEFT + bitsandbytes.

The workload: 16 random-token pairs a step (prompt lengths lognormal around 192 tokens, answers around 320, so a
sequence stays under 2,048), trained 4 pairs a micro-batch (4 micro-batches a step), DPO sigmoid, beta 0.1, LoRA
r 64 / alpha 16 / dropout 0 on all seven projections, lr 2e-4, gradient clipping at 1.0, the same pairs every step.

qflash side: training's own pieces (train/preference.py): the reference log-probabilities scored once before
training (`reference_logps`, the adapter's starting point), each micro-batch's pairs packed (`pair_batch`: one
varlen row, no attention across sequences) and `preference_loss` under bf16 autocast, the optimizer of
build_optimizer, the switches resolved for `train.objective=dpo` (train/levers.py).

TRL side (`--against trl`, TRL being importable; a test-only dependency, never qflash's): `trl.DPOTrainer` given
the model directory, a bitsandbytes NF4 double-quant BitsAndBytesConfig (bf16 compute) and a peft LoraConfig, as
TRL's documentation has QLoRA; bf16, gradient checkpointing (TRL's default), TRL's default optimizer (fused
AdamW, as qflash's), per_device_train_batch_size 4 x gradient_accumulation_steps 4, max_length None (no
truncation: both sides compute every token), `precompute_ref_log_probs=True` (the reference scored once, as
qflash does; `trl-per-step` is TRL's default instead: a reference forward with the adapter disabled in every
step). The pre-tokenized pairs go in as TRL's `prompt_ids` / `chosen_ids` / `rejected_ids`, so both sides see the
same token ids.

Reported for each: the median step time over the timed steps (TRL: between consecutive optimizer steps, so its
collation and logging are in, as qflash's batch building is), pairs/s and sequence tokens/s (a pair's prompt
counted in both of its sequences, as both sides compute it), the one-time reference scoring of the step's pairs,
"epoch" pairs/s (step plus that scoring: one pass over the data, where every pair is scored once and trained
once), peak GPU memory over the timed steps, and the losses (the first is ln 2 on both sides: the adapter starts
at zero).
"""

from __future__ import annotations

import math
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

PAIRS_PER_STEP = 16
MICRO_PAIRS = 4
CAPACITY = 2048
BETA = 0.1
TRL_RECIPES = ("trl", "trl-per-step")


def workload_pairs(vocab: int, seed: int = 0, n: int = PAIRS_PER_STEP) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """`n` (prompt, chosen, rejected) random-token triples of preference-data-like lengths."""
    rng = np.random.default_rng(seed)

    def lengths(median: float, low: int, high: int) -> np.ndarray:
        return np.clip(rng.lognormal(math.log(median), 0.6, size=n).round().astype(int), low, high)

    prompts, chosen, rejected = lengths(192, 16, 768), lengths(320, 16, 1024), lengths(320, 16, 1024)
    return [(rng.integers(0, vocab, int(p)), rng.integers(0, vocab, int(c)), rng.integers(0, vocab, int(r)))
            for p, c, r in zip(prompts, chosen, rejected)]


def pair_examples(triples) -> list:
    """The triples as training's PairExample: both sequences start with the prompt (not labelled)."""
    from qflash.data.preference import PairExample
    from qflash.data.template import IGNORE, Example

    def seq(p: np.ndarray, a: np.ndarray) -> Example:
        ids = np.concatenate([p, a]).astype(np.int64)
        return Example(ids, np.concatenate([np.full(len(p), IGNORE, dtype=np.int64), a.astype(np.int64)]))

    return [PairExample(seq(p, c), seq(p, r), len(p)) for p, c, r in triples]


def sequence_tokens(triples) -> int:
    return int(sum(2 * len(p) + len(c) + len(r) for p, c, r in triples))


@dataclass
class PrefMeasured:
    recipe: str
    step_s: float | None = None
    pairs_per_s: float | None = None
    tokens_per_s: float | None = None
    reference_s: float | None = None  # scoring the step's pairs under the reference, once
    epoch_pairs_per_s: float | None = None
    peak_mem_gb: float | None = None
    losses: list[float] = field(default_factory=list)
    warmup_s: list[float] = field(default_factory=list)
    error: str | None = None

    def finish(self, triples, times: list[float]) -> "PrefMeasured":
        self.step_s = statistics.median(times)
        self.pairs_per_s = len(triples) / self.step_s
        self.tokens_per_s = sequence_tokens(triples) / self.step_s
        if self.reference_s is not None:
            self.epoch_pairs_per_s = len(triples) / (self.step_s + self.reference_s)
        if torch.cuda.is_available():
            self.peak_mem_gb = torch.cuda.max_memory_allocated() / 1e9
        return self


def _reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


# ------------------------------------------------------------------------------------------------
# qflash


def qflash_dpo(model_dir: Path, triples, *, warmup: int, steps: int, device: torch.device | None = None,
               lr: float = 2e-4) -> PrefMeasured:
    """qflash's DPO steps on `triples` (the same pairs each step); `device` None = the current GPU."""
    from qflash.bench.common import QFLASH_OVERRIDES, Precision, _sync, _timed, qflash_model
    from qflash.model.attention import choice_of
    from qflash.train.preference import Objective, pair_batch, preference_loss, reference_logps

    before = list(QFLASH_OVERRIDES)
    QFLASH_OVERRIDES.append("train.objective=dpo")  # the switches resolved as DPO training resolves them
    try:
        model, optimizer, params = qflash_model(model_dir, 0.0, lr, "auto", 0, device=device)
    finally:
        QFLASH_OVERRIDES[:] = before  # the run's other workloads keep their own objective (sft)
    if Precision.scaler is not None:
        raise SystemExit("qflash bench --workload dpo measures bf16 (quant.compute_dtype=fp16 is not benched here)")
    device = next(p.device for p in params)
    dtype = Precision.dtype if Precision.dtype != torch.float32 else None
    obj = Objective("dpo", BETA)
    pairs = pair_examples(triples)
    varlen = choice_of(model).varlen
    groups = [list(range(k, min(k + MICRO_PAIRS, len(pairs)))) for k in range(0, len(pairs), MICRO_PAIRS)]
    out = PrefMeasured("qflash")
    _sync()
    t0 = time.perf_counter()
    reference = reference_logps(model, pairs, micro=MICRO_PAIRS, capacity=CAPACITY, varlen=varlen, pad_id=0,
                                device=device, autocast_dtype=dtype)
    _sync()
    out.reference_s = time.perf_counter() - t0

    def step() -> float:
        total = torch.zeros((), device=device)
        for ids in groups:
            pb = pair_batch(pairs, ids, capacity=CAPACITY, varlen=varlen, pad_id=0).to(device)
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                part, _ = preference_loss(model, pb, obj, reference[ids].float().to(device), 1.0 / len(pairs), 0.0)
            part.backward()
            total += part.detach()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(total)

    _reset_peak()
    out.losses, times = _timed(step, warmup, steps, out.warmup_s)
    return out.finish(triples, times)


# ------------------------------------------------------------------------------------------------
# TRL


def trl_available() -> bool:
    try:
        import trl  # noqa: F401
    except Exception:
        return False
    return True


def _stand_in_tokenizer(vocab_size: int):
    """The random-weight model directory has no tokenizer; TRL only reads its pad / EOS ids (nothing is tokenized:
    the pairs go in as ids)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({f"<t{i}>": i for i in range(vocab_size)},
                                                                         unk_token="<t0>")))
    tok.add_special_tokens({"pad_token": "<t0>", "eos_token": "<t0>"})
    return tok


def trl_dpo(model_dir: Path, triples, *, warmup: int, steps: int, recipe: str = "trl", device: torch.device | None = None,
            lr: float = 2e-4) -> PrefMeasured:
    """TRL's DPOTrainer on the same pairs; `device` None = the current GPU (NF4 via bitsandbytes, bf16), "cpu" for
    the tests' CPU twin (fp32, no quantization)."""
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    import datasets
    from peft import LoraConfig
    from transformers import AutoConfig, BitsAndBytesConfig, TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import DPOConfig, DPOTrainer

    from qflash.bench.common import TARGETS, _sync

    if recipe not in TRL_RECIPES:
        raise ValueError(f"recipe must be one of {TRL_RECIPES}, not {recipe!r}")
    if len(triples) % MICRO_PAIRS:
        raise ValueError(f"{len(triples)} pairs: a multiple of {MICRO_PAIRS} (one step = every pair once)")
    gpu = device is None or device.type == "cuda"
    out = PrefMeasured(recipe)
    marks: list[float] = []

    class Trainer(DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset  # already prompt_ids / chosen_ids / rejected_ids, as TRL's collator reads them

        def _precompute_ref_logps(self, dataset, name, batch_size):
            _sync()
            t0 = time.perf_counter()
            result = super()._precompute_ref_logps(dataset, name, batch_size)
            _sync()
            out.reference_s = time.perf_counter() - t0
            return result

        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            self._step_loss = getattr(self, "_step_loss", 0.0) + float(loss)
            return loss

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            _sync()
            _reset_peak()
            marks.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            _sync()
            marks.append(time.perf_counter())
            if len(marks) == warmup + 1:
                _reset_peak()  # peak over the timed steps, as the qflash side measures it

    vocab = AutoConfig.from_pretrained(str(model_dir)).vocab_size
    dataset = datasets.Dataset.from_dict({
        "prompt_ids": [list(map(int, p)) for p, _, _ in triples],
        "chosen_ids": [list(map(int, c)) for _, c, _ in triples],
        "rejected_ids": [list(map(int, r)) for _, _, r in triples],
    })
    init = {"dtype": "bfloat16" if gpu else "float32", "attn_implementation": "sdpa", "use_kernels": False}
    quant = None
    if gpu:
        init["device_map"] = {"": torch.cuda.current_device()}
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16)
    with tempfile.TemporaryDirectory(prefix="qflash-bench-trl-") as tmp:
        datasets.config.HF_DATASETS_CACHE = Path(tmp) / "datasets"  # the precompute's cache file: never reused
        config = DPOConfig(
            output_dir=tmp, use_cpu=not gpu, bf16=gpu, fp16=False, gradient_checkpointing=True,
            activation_checkpointing=True,  # (its transformers 5.2x name; the old one alone warns)
            per_device_train_batch_size=MICRO_PAIRS, gradient_accumulation_steps=len(triples) // MICRO_PAIRS,
            max_steps=warmup + steps, learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0,
            weight_decay=0.0, max_grad_norm=1.0, beta=BETA, loss_type=["sigmoid"], max_length=None,
            precompute_ref_log_probs=recipe == "trl", logging_steps=1, save_strategy="no", eval_strategy="no",
            report_to="none", disable_tqdm=True, dataloader_num_workers=0, seed=0, model_init_kwargs=init,
        )
        peft_config = LoraConfig(r=64, lora_alpha=16, lora_dropout=0.0, target_modules=list(TARGETS), bias="none",
                                 task_type="CAUSAL_LM")
        trainer = Trainer(model=str(model_dir), args=config, train_dataset=dataset,
                          processing_class=_stand_in_tokenizer(vocab), peft_config=peft_config,
                          quantization_config=quant, callbacks=[Clock()])
        trainer.remove_callback(PrinterCallback)
        step_losses: list[float] = []

        class Losses(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                step_losses.append(trainer._step_loss)
                trainer._step_loss = 0.0

        trainer.add_callback(Losses())
        trainer.train()
    intervals = [b - a for a, b in zip(marks, marks[1:])]
    out.warmup_s, times = intervals[:warmup], intervals[warmup:]
    out.losses = step_losses
    return out.finish(triples, times)


# ------------------------------------------------------------------------------------------------


def measure_dpo(recipe: str, model_dir: Path, triples, *, warmup: int, steps: int) -> PrefMeasured:
    from qflash.bench.common import _free

    try:
        if recipe == "qflash":
            return qflash_dpo(model_dir, triples, warmup=warmup, steps=steps)
        return trl_dpo(model_dir, triples, warmup=warmup, steps=steps, recipe=recipe)
    except torch.OutOfMemoryError as e:
        return PrefMeasured(recipe, error=f"out of memory: {str(e).splitlines()[0]}")
    except Exception as e:  # noqa: BLE001 — TRL's side failing must not lose qflash's numbers
        if recipe == "qflash":
            raise
        import traceback

        traceback.print_exc()
        return PrefMeasured(recipe, error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    finally:
        _free()


def dpo_record(model_dir: Path, vocab: int, refs: list[str], *, warmup: int, steps: int) -> dict:
    """The `dpo` workload's result: qflash, then each TRL recipe asked for, on the same pairs."""
    triples = workload_pairs(vocab)
    rec: dict = {"pairs_per_step": len(triples), "micro_batch_pairs": MICRO_PAIRS, "beta": BETA,
                 "sequence_tokens_per_step": sequence_tokens(triples),
                 "tokens_basis": "both sequences of a pair, its prompt in each", "steps_timed": steps,
                 "warmup_steps": warmup, "lora_dropout": 0.0}
    ours = measure_dpo("qflash", model_dir, triples, warmup=warmup, steps=steps)
    print(f"qflash dpo: {ours.pairs_per_s or 0:.2f} pairs/s ({ours.tokens_per_s or 0:,.0f} tok/s), step "
          f"{ours.step_s or 0:.2f}s, peak {ours.peak_mem_gb or 0:.1f} GB, reference {ours.reference_s or 0:.1f}s, "
          f"warm-up {', '.join(f'{t:.1f}s' for t in ours.warmup_s)}, losses {[round(x, 4) for x in ours.losses]}",
          flush=True)
    rec.update({"tokens_per_s": ours.tokens_per_s, "pairs_per_s": ours.pairs_per_s, "step_s": ours.step_s,
                "reference_s": ours.reference_s, "epoch_pairs_per_s": ours.epoch_pairs_per_s,
                "peak_mem_gb": ours.peak_mem_gb, "warmup_step_s": ours.warmup_s, "losses": ours.losses,
                "error": ours.error, "mfu": None})
    for recipe in TRL_RECIPES:
        key = recipe.replace("-", "_")
        if recipe not in refs:
            continue
        if not trl_available():
            raise SystemExit(f"--against {recipe}: TRL is not importable here (pip install trl; a test-only "
                             "dependency: `pip install -e .[test]`)")
        ref = measure_dpo(recipe, model_dir, triples, warmup=warmup, steps=steps)
        ok = bool(ref.pairs_per_s and ours.pairs_per_s)
        rec.update({f"{key}_tokens_per_s": ref.tokens_per_s, f"{key}_pairs_per_s": ref.pairs_per_s,
                    f"{key}_step_s": ref.step_s, f"{key}_reference_s": ref.reference_s,
                    f"{key}_epoch_pairs_per_s": ref.epoch_pairs_per_s, f"{key}_peak_mem_gb": ref.peak_mem_gb,
                    f"{key}_warmup_step_s": ref.warmup_s, f"{key}_losses": ref.losses, f"{key}_error": ref.error,
                    f"speedup_vs_{key}": ours.pairs_per_s / ref.pairs_per_s if ok else None,
                    f"epoch_speedup_vs_{key}": (ours.epoch_pairs_per_s / ref.epoch_pairs_per_s
                                                if ok and ref.epoch_pairs_per_s and ours.epoch_pairs_per_s else None)})
    return rec


def print_dpo(rec: dict) -> None:
    def one(name: str, prefix: str) -> str:
        if rec.get(f"{prefix}error"):
            return f"{name} error: {rec[f'{prefix}error']}"
        ref_s = rec.get(f"{prefix}reference_s")
        return (f"{name} {rec[f'{prefix}pairs_per_s'] or 0:.2f} pairs/s ({rec[f'{prefix}tokens_per_s'] or 0:,.0f} tok/s), "
                f"step {rec[f'{prefix}step_s'] or 0:.2f}s, peak {rec[f'{prefix}peak_mem_gb'] or 0:.1f} GB"
                + (f", reference scored once in {ref_s:.1f}s (epoch {rec[f'{prefix}epoch_pairs_per_s']:.2f} pairs/s)"
                   if ref_s is not None else ", reference forward in every step"))

    line = f"{rec['shape']} dpo: " + one("qflash", "")
    for recipe in TRL_RECIPES:
        key = recipe.replace("-", "_")
        if f"{key}_pairs_per_s" in rec:
            line += " | " + one(recipe, f"{key}_")
            if rec.get(f"speedup_vs_{key}"):
                line += f" -> {rec[f'speedup_vs_{key}']:.2f}x"
                if rec.get(f"epoch_speedup_vs_{key}"):
                    line += f" (epoch {rec[f'epoch_speedup_vs_{key}']:.2f}x)"
    print(line, flush=True)
