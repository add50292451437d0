"""How close a merged model is to what it replaces: logits on a few held-out samples.

The merged model (loaded with plain transformers) is compared with
  (a) the base, unquantized in the output dtype, plus the unmerged adapter (PEFT): what the merge
      should reproduce; the gap is the rounding of W + dW to the output dtype;
  (b) the NF4 base plus the adapter, quantized as the run trained it: what the adapter was tuned
      against; the gap is what de-quantizing the base costs.
All forward passes run in fp32 on the CPU (bf16 matmuls there are ~100x slower, and fp32 keeps the
comparison free of compute rounding). Models are loaded one at a time and only the merged model's
logits are kept, so the memory needed is one fp32 copy of the model plus those logits.
"""

from __future__ import annotations

import gc
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from qflash.config import Config
from qflash.errors import QflashError
from qflash.ui import console

MAX_TOKENS = 256
"""Each sample is cut to this many tokens: enough to cover a reply, small enough for a fast CPU check."""

# For adapters without a run config (or whose data is not reachable): a few short conversations.
_PROBES = [
    [{"role": "user", "content": "Who are you, and who made you?"},
     {"role": "assistant", "content": "I am an assistant. How can I help you today?"}],
    [{"role": "system", "content": "Answer briefly."},
     {"role": "user", "content": "What is the capital of France? 用一句话回答。"},
     {"role": "assistant", "content": "Paris is the capital of France."}],
    [{"role": "user", "content": "Write a Python function that adds two numbers."},
     {"role": "assistant", "content": "def add(a, b):\n    return a + b"}],
    [{"role": "user", "content": "List three colours."},
     {"role": "assistant", "content": "Red, green and blue."}],
]


@dataclass
class Comparison:
    reference: str
    max_abs_diff: float
    mean_abs_diff: float
    mean_kl: float
    """Mean over tokens of KL(reference || merged), in nats."""
    top1_agreement: float
    """Share of positions where both predict the same next token."""


@dataclass
class FidelityReport:
    computed_in: str = "fp32 on cpu"
    samples: int = 0
    tokens: int = 0
    sample_source: str = ""
    comparisons: list[Comparison] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    skipped: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


class _Accumulator:
    """Running max/mean |diff|, mean KL and top-1 agreement over samples."""

    def __init__(self):
        self.max = 0.0
        self.abs_sum = 0.0
        self.elements = 0
        self.kl_sum = 0.0
        self.same_top1 = 0
        self.positions = 0

    def add(self, merged: torch.Tensor, ref: torch.Tensor) -> None:  # (tokens, vocab) fp32 each
        diff = (merged - ref).abs()
        self.max = max(self.max, diff.max().item())
        self.abs_sum += diff.double().sum().item()
        self.elements += diff.numel()
        logp_ref = torch.log_softmax(ref.double(), dim=-1)
        logp_merged = torch.log_softmax(merged.double(), dim=-1)
        self.kl_sum += (logp_ref.exp() * (logp_ref - logp_merged)).sum().item()
        self.same_top1 += (ref.argmax(-1) == merged.argmax(-1)).sum().item()
        self.positions += ref.shape[0]

    def result(self, reference: str) -> Comparison:
        return Comparison(reference, self.max, self.abs_sum / self.elements, self.kl_sum / self.positions,
                          self.same_top1 / self.positions)


@torch.inference_mode()
def _logits(model, samples: list[torch.Tensor]) -> list[torch.Tensor]:
    model.eval()
    return [model(input_ids=ids.unsqueeze(0)).logits[0].float() for ids in samples]


def _run_samples(cfg: Config, renderer, n: int) -> tuple[list[list[int]], str]:
    from qflash.config import check_paths
    from qflash.data.pipeline import build_examples

    check_paths(cfg)
    split = "eval" if (cfg.data.eval_datasets or cfg.data.eval_ratio > 0) else "train"
    examples, _ = build_examples(cfg.data, renderer, split=split, seed=cfg.train.seed)
    source = ("held-out samples of the run" if split == "eval"
              else "training samples of the run (it holds out no eval data)")
    return [list(ex.input_ids) for ex in examples[:n]], source


def check_samples(cfg: Config | None, tok, renderer, n: int) -> tuple[list[torch.Tensor], str]:
    """Token ids of up to n samples (each cut to MAX_TOKENS), and where they come from."""
    note = ""
    if cfg is not None:
        try:
            ids, source = _run_samples(cfg, renderer, n)
            if ids:
                return [torch.tensor(x[:MAX_TOKENS], dtype=torch.long) for x in ids], source
            note = " (the run's data gave no samples)"
        except QflashError as e:
            note = f" (the run's data cannot be read from here: {e})"
    ids = []
    for conv in _PROBES[:n]:
        if renderer is not None:
            ids.append(tok(renderer.render(conv), add_special_tokens=False)["input_ids"])
        else:
            ids.append(tok("\n".join(m["content"] for m in conv))["input_ids"])
    return [torch.tensor(x[:MAX_TOKENS], dtype=torch.long) for x in ids], "built-in probe conversations" + note


def _ram_needed(n_params: int, stored_bytes: int, samples: list[torch.Tensor], vocab: int) -> int:
    # One fp32 model at a time, plus its checkpoint mapped while it loads, plus the merged model's kept
    # logits and ~1 GB of libraries (a 1.54B bf16 model measured 10.4 GB peak RSS; this says 10.3).
    return n_params * (4 + stored_bytes) + sum(len(s) for s in samples) * vocab * 4 + 10**9


def check_fidelity(merged_dir: Path, model_dir: Path, adapter_dir: Path, cfg: Config | None, tok, renderer,
                   dtype_name: str, n_params: int, n_samples: int) -> FidelityReport:
    """Compare the merged model's logits with base+adapter (16-bit) and with the NF4 base+adapter the run trained."""
    import psutil
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qflash.export.safetensors_io import DTYPES
    from qflash.model.loading import NO_HUB_KERNELS, load_configured_base
    from qflash.model.lora import fit_embeddings_to_adapter, load_adapter

    report = FidelityReport()
    samples, report.sample_source = check_samples(cfg, tok, renderer, n_samples)
    report.samples, report.tokens = len(samples), sum(len(s) for s in samples)
    need = _ram_needed(n_params, DTYPES[dtype_name].itemsize, samples, len(tok))
    free = psutil.virtual_memory().available
    if need > free:
        report.skipped = (f"needs about {need / 1e9:.1f} GB of free RAM for fp32 copies of the model, "
                          f"{free / 1e9:.1f} GB free; pass --no-check, or merge on a larger machine")
        console.print(f"[yellow]fidelity check skipped: {report.skipped}[/]")
        return report
    trust = cfg.model.trust_remote_code if cfg else False
    console.print(f"fidelity check: {report.samples} samples, {report.tokens} tokens ({report.sample_source}); "
                  "computed in fp32 on the CPU")

    def timed(what: str, load) -> list[torch.Tensor]:
        t0 = time.perf_counter()
        model = load()
        out = _logits(model, samples)
        del model
        gc.collect()  # the next model is loaded only after this one is gone
        console.print(f"  {what}: {time.perf_counter() - t0:.1f}s")
        return out

    merged = timed("merged model (plain transformers)",
                   lambda: AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32,
                                                                trust_remote_code=trust, **NO_HUB_KERNELS))

    def base_16bit_with_adapter():
        base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=DTYPES[dtype_name], trust_remote_code=trust,
                                                    **NO_HUB_KERNELS)
        fit_embeddings_to_adapter(base, adapter_dir)  # tokens added in training (model.add_tokens)
        return PeftModel.from_pretrained(base.float(), str(adapter_dir))

    references = [(f"base {dtype_name} + adapter", base_16bit_with_adapter)]
    trained_on, stored = _trained_base(cfg, model_dir)
    if stored is not None and not stored.bnb_4bit:
        report.notes.append(f"no comparison with the base as trained: {trained_on} is {stored.describe()}, "
                            "which qflash does not run on the CPU")
    elif cfg is not None and (cfg.quant.mode == "nf4" or stored is not None):
        what = "4-bit base as stored" if stored is not None else "NF4 base"
        references.append((f"{what} + adapter (as trained)", lambda: load_adapter(
            load_configured_base(cfg, trained_on, torch.device("cpu"), torch.float32), adapter_dir)))
    else:
        report.notes.append("no NF4 comparison: " + ("the run trained an unquantized base" if cfg is not None
                                                      else "no run config, so the training quantization is unknown"))
    for name, load in references:
        acc = _Accumulator()
        for m, r in zip(merged, timed(name, load)):
            acc.add(m, r)
        report.comparisons.append(acc.result(name))
    return report


def _trained_base(cfg: Config | None, model_dir: Path):
    """(the base the run trained on, its stored quantization or None): the run's model.path when that checkpoint was
    quantized already (the merge then reads the 16-bit model given with --base), else the merge's base."""
    from qflash.model.loading import resolve_model_dir, stored_quantization

    if cfg is not None:
        try:
            trained_on = resolve_model_dir(cfg.model.path)
        except QflashError:
            trained_on = None  # moved or gone: the 16-bit base stands in for it
        stored = stored_quantization(trained_on) if trained_on is not None else None
        if stored is not None:
            return trained_on, stored
    return model_dir, None


def print_fidelity(report: FidelityReport) -> None:
    from rich.table import Table

    if report.skipped:
        return
    table = Table(title=f"merged model vs references ({report.samples} samples, {report.tokens} tokens, fp32 on the CPU)")
    for col in ("reference", "max |dlogit|", "mean |dlogit|", "mean KL", "top-1 agree"):
        table.add_column(col, justify="left" if col == "reference" else "right")
    for c in report.comparisons:
        table.add_row(c.reference, f"{c.max_abs_diff:.3e}", f"{c.mean_abs_diff:.3e}", f"{c.mean_kl:.3e}",
                      f"{c.top1_agreement:.1%}")
    console.print(table)
    for note in report.notes:
        console.print(f"  {note}")
