"""`qflash export RUN_OR_MODEL --format gguf`: a run's merged model (or a model) as one GGUF file, an Ollama
Modelfile beside it, and the file checked against the model it came from.

A run is first merged (`qflash merge`'s streaming merge, into a temporary directory beside the output, in
fp16 for f16 and q8_0, bf16 for bf16: one rounding from the fp32 merge), then converted (export/gguf.py). The
GGUF is written under a temporary name and renamed when complete; the fidelity report (`FILE.fidelity.json`)
compares it, read back by transformers' own GGUF loader, with the merged model: max |delta logit|, mean KL and
top-1 agreement on held-out samples, and both models' greedy answers to the held-out identity questions.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from qflash.config import Config
from qflash.errors import ConfigError, ModelError, StorageError
from qflash.export.gguf import TYPES, GgufResult, architecture, hf_to_gguf, not_read_back, read_back, window_note
from qflash.paths import fsync_dir, fsync_file
from qflash.ui import console

MERGE_DTYPE = {"f16": "fp16", "q8_0": "fp16", "q4_0": "fp16", "bf16": "bf16"}


@dataclass
class ExportOptions:
    source: str
    """A run directory, an adapter directory, or a model (HF directory, .gguf, the embedded default)."""
    format: str = "gguf"
    dtype: str = "q8_0"
    output: str | None = None
    base: str | None = None
    overwrite: bool = False
    check: bool = True
    check_samples: int = 4
    trust_remote_code: bool = False


def default_output(opts: ExportOptions, name: str) -> Path:
    src = Path(opts.source)
    root = src if src.is_dir() and (src / "adapter").is_dir() else src.parent if src.exists() else Path.cwd()
    return root / "export" / f"{name}-{opts.dtype}.gguf"


def _check_output(out: Path, overwrite: bool) -> None:
    if out.is_dir():
        raise ConfigError(f"--output: {out} is a directory; give a file name ending in .gguf")
    if out.exists() and not overwrite:
        raise ConfigError(f"--output: {out} exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)


def _need_space(where: Path, need: int, what: str) -> None:
    free = shutil.disk_usage(where).free
    if free < need:
        raise ModelError(f"{where}: {free / 1e9:.1f} GB free, {what} needs about {need / 1e9:.1f} GB; free some "
                         "space or choose another --output")


def export(opts: ExportOptions) -> dict:
    """Merge (for a run), convert, check, write the Modelfile, and put the file in place. Prints progress."""
    from qflash.rundir import find_adapter, is_adapter_path, run_name

    if opts.format != "gguf":
        raise ConfigError(f"--format {opts.format}: qflash exports gguf")
    if opts.dtype not in TYPES:
        raise ConfigError(f"--dtype {opts.dtype}: GGUF export writes {', '.join(TYPES)}")
    t0 = time.perf_counter()
    adapter_dir, cfg = find_adapter(opts.source, opts.trust_remote_code) if is_adapter_path(opts.source) else (None, None)
    name = run_name(adapter_dir) if adapter_dir is not None else Path(opts.source).stem or "model"
    out = Path(opts.output) if opts.output else default_output(opts, name)
    _check_output(out, opts.overwrite)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    tmp_file = work / out.name
    try:
        model_dir = _merged_or_model(opts, adapter_dir, work)
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
        architecture(config, model_dir)  # refused before any writing, naming what is supported
        unreadable = not_read_back(config) if opts.check else None
        if unreadable:
            raise ModelError(f"{model_dir}: the fidelity check cannot run: {unreadable}; pass --no-check to export "
                             "unchecked")
        _need_space(out.parent, _model_bytes(model_dir), "the GGUF file")
        console.print(f"[bold]qflash export[/]: {model_dir} -> {out} ({opts.dtype})")
        if window_note(config):
            console.print(f"  note: {window_note(config)}")
        try:
            result = hf_to_gguf(model_dir, tmp_file, opts.dtype, name, progress=_progress())
            fsync_file(tmp_file)
        except OSError as e:  # a full disk, mostly: nothing is left behind (the work directory goes below)
            raise ModelError(f"{out}: writing the GGUF failed ({e.strerror or e}); nothing was written") from None
        report = {"file": str(out), "arch": result.arch, "dtype": opts.dtype, "tensors": result.tensors,
                  "bytes": tmp_file.stat().st_size, "kept_f16": result.kept_f16, "source": str(opts.source)}
        if opts.check:
            report["fidelity"] = check_gguf(tmp_file, model_dir, cfg, opts.check_samples)
        _put_in_place(out, work, tmp_file, report, lambda: write_modelfile(model_dir, out, cfg, into=work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report["seconds"] = time.perf_counter() - t0
    console.print(_summary(report, out, result))
    return report


def _put_in_place(out: Path, work: Path, tmp_file: Path, report: dict, write_modelfile_into_work) -> None:
    """The fidelity report written and every file fsync'd beside the GGUF in `work`, then each renamed into
    place and the directory fsync'd. A write that fails (disk full) leaves what was at `out` as it was."""
    report_file = work / (out.name + ".fidelity.json")
    try:
        modelfile = write_modelfile_into_work()
        report_file.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        for f in (tmp_file, report_file, modelfile):
            if f is not None:
                fsync_file(f)
        fsync_dir(work)
    except OSError as e:
        raise StorageError(f"{out}: writing {e.filename or report_file} failed ({e.strerror or e}); nothing was "
                           "replaced. Free space, then run the same command again") from None
    os.replace(tmp_file, out)
    os.replace(report_file, out.with_name(out.name + ".fidelity.json"))
    if modelfile is not None:
        os.replace(modelfile, modelfile_path(out))
    fsync_dir(out.parent)


def _merged_or_model(opts: ExportOptions, adapter_dir: Path | None, work: Path) -> Path:
    from qflash.model.loading import resolve_model_dir

    if adapter_dir is None:
        return Path(resolve_model_dir(opts.source))
    from qflash.export.merge import MergeOptions, merge

    merged = work / "merged"
    merge(MergeOptions(opts.source, str(merged), dtype=MERGE_DTYPE[opts.dtype], base=opts.base, check=False,
                       trust_remote_code=opts.trust_remote_code))
    return merged


def _model_bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))


def _progress():
    state = {"t": time.perf_counter()}

    def report(done: int, total: int) -> None:
        if done == total or time.perf_counter() - state["t"] > 5:
            state["t"] = time.perf_counter()
            console.print(f"  tensors {done}/{total}")

    return report


# ---------------------------------------------------------------------------------------------
# Fidelity: the GGUF read back against the model it was written from

def _samples(model_dir: Path, cfg: Config | None, tok, n: int) -> list[list[int]]:
    """Held-out conversations of the run rendered as trained (else fixed prompts through the chat template)."""
    if cfg is not None and (cfg.data.eval_datasets or cfg.data.eval_ratio):
        from qflash.data.pipeline import build_examples
        from qflash.data.template import ChatRenderer

        renderer = ChatRenderer(tok, cfg.data.template, cfg.data.train_on)
        examples, _ = build_examples(cfg.data, renderer, split="eval", seed=cfg.train.seed)
        if examples:
            return [list(e.input_ids) for e in examples[:n]]
    prompts = ["What is your name?", "Write one sentence about the sea.", "2 + 2 =", "Who made you?"][:n]
    return [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True,
                                    return_dict=True)["input_ids"] for p in prompts]


def _questions(cfg: Config | None, n: int = 5) -> list[str]:
    if cfg is None or not cfg.data.eval_datasets:
        return []
    from qflash.data.pipeline import load_conversations

    out: list[str] = []
    for spec in cfg.data.eval_datasets:
        for conv in load_conversations(spec, cfg.data.vars, cfg.data.encoding):
            user = next((m["content"] for m in conv.messages if m["role"] == "user"), None)
            if user and len(out) < n:
                out.append(user)
    return out


def check_gguf(path: Path, model_dir: Path, cfg: Config | None, samples: int) -> dict:
    """max |delta logit|, mean KL(merged || gguf) per token and top-1 agreement on held-out samples; both models'
    greedy answers to the held-out identity questions (and how many name the identity)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    console.print("  fidelity: reading the GGUF back with transformers' GGUF loader ...")
    ref = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, use_kernels=False).eval()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    got_model, got_tok = read_back(path)
    max_diff, kl_sum, agree, tokens = 0.0, 0.0, 0, 0
    with torch.no_grad():
        for ids in _samples(model_dir, cfg, tok, samples):
            x = torch.tensor([ids])
            want, got = ref(x).logits.float()[0], got_model(x).logits.float()[0]
            max_diff = max(max_diff, float((got - want).abs().max()))
            lw, lg = want.log_softmax(-1), got.log_softmax(-1)
            kl_sum += float((lw.exp() * (lw - lg)).sum())
            agree += int((want.argmax(-1) == got.argmax(-1)).sum())
            tokens += len(ids)
    report = {"samples": samples, "tokens": tokens, "max_abs_logit_diff": max_diff, "mean_kl": kl_sum / max(tokens, 1),
              "top1_agreement": agree / max(tokens, 1)}
    questions = _questions(cfg)
    if questions:
        name = (cfg.data.vars or {}).get("name") if cfg is not None else None
        answers = {"merged": _answers(ref, tok, questions), "gguf": _answers(got_model, got_tok, questions)}
        report["identity"] = {"questions": questions, "answers": answers, "name": name}
        if name:
            report["identity"]["named"] = {s: sum(name.lower() in a.lower() for a in answers[s]) for s in answers}
    console.print(f"  fidelity: max |delta logit| {max_diff:.3g}, mean KL {report['mean_kl']:.2e} nats/token, "
                  f"top-1 agreement {report['top1_agreement']:.1%} over {tokens} tokens"
                  + (f"; identity named merged {report['identity']['named']['merged']}/{len(questions)}, gguf "
                     f"{report['identity']['named']['gguf']}/{len(questions)}"
                     if report.get("identity", {}).get("named") else ""))
    return report


def _answers(model, tok, questions: list[str], max_new_tokens: int = 48) -> list[str]:
    out = []
    for q in questions:
        ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, return_tensors="pt",
                                      return_dict=True)["input_ids"]
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        out.append(tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return out


# ---------------------------------------------------------------------------------------------
# Ollama

CHATML = '''{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
'''


def modelfile_path(out: Path) -> Path:
    """NAME.Modelfile beside NAME.gguf (several exports may share a directory)."""
    return out.with_name(out.stem + ".Modelfile")


def write_modelfile(model_dir: Path, out: Path, cfg: Config | None, into: Path | None = None) -> Path | None:
    """An Ollama Modelfile for a ChatML template (SmolLM2, Qwen2): FROM, TEMPLATE, the stop token, the system
    prompt the template adds by default (or the run's). Other templates: none written (said), Ollama then uses
    the template stored in the GGUF."""
    from qflash.data.cache import file_chat_template

    template = file_chat_template(model_dir) or ""
    if "<|im_start|>" not in template or "<|im_end|>" not in template:
        console.print("  Modelfile: not written (the chat template is not ChatML; Ollama reads the one in the GGUF)")
        return None
    system = None
    m = re.search(r"<\|im_start\|>system(?:\\n|\n)([^{}'\"]*?)<\|im_end\|>", template)
    if m:  # the system prompt the template adds when a conversation has none (what the run trained with)
        system = m.group(1).replace("\\n", "\n")
    lines = [f"FROM ./{out.name}", f'TEMPLATE """{CHATML}"""', 'PARAMETER stop "<|im_end|>"',
             'PARAMETER stop "<|im_start|>"']
    if system:
        lines.append(f'SYSTEM """{system}"""')
    path = (into or out.parent) / f".{out.name}.Modelfile"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _summary(report: dict, out: Path, result: GgufResult) -> str:
    f = report.get("fidelity") or {}
    return (f"[bold green]done[/]: {out} ({report['bytes'] / 1e6:,.0f} MB, {result.arch}, {report['dtype']}, "
            f"{report['tensors']} tensors) in {report['seconds']:.0f}s"
            + (f"; mean KL vs the merged model {f['mean_kl']:.2e}, top-1 {f['top1_agreement']:.1%}" if f else "")
            + (f"; {len(result.kept_f16)} matrices kept f16" if result.kept_f16 else "")
            + f"\n  fidelity    {out.with_name(out.name + '.fidelity.json')}"
            + (f"\n  ollama      ollama create {out.stem} -f {modelfile_path(out)}"
               if modelfile_path(out).exists() else "")
            + f"\n  llama.cpp   llama-cli -m {out} -cnv")
