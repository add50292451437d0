"""`qflash merge`: fold a LoRA adapter into the 16-bit base model, shard by shard.

Never into the 4-bit base: the base is read as stored (bf16/fp16/fp32 safetensors), each targeted
weight gets scale * B @ A added in fp32 (DoRA: rescaled to its trained magnitude) and is cast to the
output dtype, and the result is written as safetensors shards of at most --max-shard-size. Only one
input tensor and one output shard are in memory at a time, so a 7B model merges on a 24 GB machine.

The output directory (written into a temporary sibling and renamed at the end) loads with plain
`AutoModelForCausalLM.from_pretrained`: shards + index, config.json with the output dtype,
generation_config.json, the tokenizer with the chat template the run trained with, and
qflash_merge.json (sources, settings, fidelity numbers).
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

import torch

from qflash.config import Config
from qflash.errors import ConfigError, ModelError, StorageError
from qflash.export.adapter import Adapter, AdapterError, LoraModule, delta_shape, merged_bias, merged_weight, read_adapter
from qflash.export.safetensors_io import DTYPES, INDEX_FILE, SafetensorsModel, ShardLayout, parse_size, plan_shards, write_shard
from qflash.paths import fsync_file, fsync_tree, swap_in
from qflash.rundir import tokenizer_dir
from qflash.ui import console

MERGE_RECORD = "qflash_merge.json"
_CONFIG_DTYPE = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


@dataclass
class MergeOptions:
    source: str
    """A run directory (output_dir of qflash train) or an adapter directory."""
    output: str
    dtype: str = "bf16"
    max_shard_size: str | int = "2GB"
    base: str | None = None
    """The base model (HF dir, .gguf, or the embedded default); default: model.path of the run's config."""
    overwrite: bool = False
    check: bool = True
    check_samples: int = 4
    trust_remote_code: bool = False
    """--trust-remote-code: the base model's own code may run (a run's saved config cannot say so)."""


# ---------------------------------------------------------------------------------------------
# The plan: every output tensor, where it comes from and what the adapter does to it


@dataclass
class OutputTensor:
    name: str
    """Its name in the merged checkpoint (the base checkpoint's name)."""
    source: str
    """The base tensor it starts from (for an untied lm_head: the embedding it was tied to)."""
    shape: tuple[int, ...]
    dtype: torch.dtype
    replacement: str | None = None
    """Adapter key of a whole tensor that replaces the base's (modules_to_save, trained bias)."""
    lora: LoraModule | None = None
    bias_of: LoraModule | None = None
    """This is the bias of a module trained with lora_bias."""

    @property
    def modified(self) -> bool:
        return self.replacement is not None or self.lora is not None or self.bias_of is not None


@dataclass
class MergePlan:
    tensors: dict[str, OutputTensor]
    untied: list[str] = field(default_factory=list)
    """Tied weights written out separately because the adapter changes one side of the pair."""
    vocab_size: int | None = None
    """The grown vocabulary when the adapter added tokens (its embedding and lm_head have more rows), else None."""

    def out_specs(self, dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {n: (t.shape, dtype if t.dtype.is_floating_point else t.dtype) for n, t in self.tensors.items()}


def tied_weights(model_dir: Path, trust_remote_code: bool) -> dict[str, str]:
    """tied name -> the name it is tied to (lm_head.weight -> model.embed_tokens.weight), as transformers ties them.

    Taken from the model class itself, built on the meta device (no memory): the config flag alone
    does not say which tensors are tied.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return dict(model.all_tied_weights_keys)


def _resolve(name: str, known: list[str], what: str, adapter: Adapter, model: SafetensorsModel) -> str:
    """The base tensor a PEFT name refers to: the same name, else the one name that ends the same way.

    The suffix match covers a checkpoint whose names carry a different prefix than the module tree
    PEFT saw. No match, or several, is an error: nothing from the adapter is ever dropped.
    """
    if name in known:
        return name
    hits = [k for k in known if k.endswith("." + name) or name.endswith("." + k)]
    if len(hits) == 1:
        return hits[0]
    if hits:
        raise AdapterError(f"{adapter.file}: {what} '{name}' matches several tensors of the base model "
                           f"({', '.join(hits[:3])}); cannot tell which one it was trained on")
    import difflib

    near = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    raise AdapterError(
        f"{adapter.file}: {what} '{name}' matches no tensor of the base model {model.dir}"
        + (f" (nearest: '{near[0]}')" if near else "")
        + "; was the adapter trained on this base? pass --base with the model it was trained on"
    )


def plan_merge(model: SafetensorsModel, adapter: Adapter, tied: dict[str, str]) -> MergePlan:
    """Map every adapter tensor onto a base tensor (or fail), and decide the output tensors."""
    tensors = {n: OutputTensor(n, n, i.shape, i.dtype) for n, i in model.tensors.items()}
    # Tied weights the checkpoint leaves out (lm_head when tied to the embedding): an adapter may target them.
    virtual = {t: s for t, s in tied.items() if t not in model.tensors and s in model.tensors}
    known = list(model.tensors) + list(virtual)

    def entry(name: str) -> OutputTensor:
        if name not in tensors:  # an untied copy of the tensor it was tied to
            src = model.tensors[virtual[name]]
            tensors[name] = OutputTensor(name, virtual[name], src.shape, src.dtype)
        return tensors[name]

    grown: dict[str, tuple[int, ...]] = {}  # base shape -> adapter shape of tables the adapter grew (add_tokens)
    for name, key in adapter.replacements.items():
        t = entry(_resolve(name, known, "saved tensor", adapter, model))
        shape = adapter.shapes[key]
        if shape != t.shape and _grown_rows(t.shape, shape):
            grown[t.shape] = shape
            t.shape = shape
        elif shape != t.shape:
            raise AdapterError(f"{adapter.file}: '{key}' has shape {shape}, the base's {t.name} {t.shape}")
        t.replacement = key
    for m in adapter.modules.values():
        t = entry(_resolve(m.module + ".weight", known, "LoRA module", adapter, model))
        if t.lora is not None:
            raise AdapterError(f"{adapter.file}: LoRA modules '{t.lora.module}' and '{m.module}' both map to {t.name}")
        if delta_shape(m, adapter) != t.shape:
            raise AdapterError(f"{adapter.file}: LoRA module '{m.module}' makes an update of shape {delta_shape(m, adapter)}, "
                               f"but the base's {t.name} has shape {t.shape}; was it trained on this base?")
        t.lora = m
        if m.bias_key is not None:
            b = entry(_resolve(m.module + ".bias", known, "lora_bias of module", adapter, model))
            b.bias_of = m
    plan = MergePlan(tensors)
    for target, source in tied.items():
        touched = any(n in tensors and tensors[n].modified for n in (target, source))
        if touched and source in model.tensors:
            entry(target)
            plan.untied.append(target)
    plan.vocab_size = _grown_vocab(tensors, grown, adapter)
    return plan


def _grown_rows(base: tuple[int, ...], saved: tuple[int, ...]) -> bool:
    """The saved table is the base's with rows added (an embedding or lm_head grown for new tokens)."""
    return len(base) == len(saved) == 2 and saved[1] == base[1] and saved[0] > base[0]


def _grown_vocab(tensors: dict[str, OutputTensor], grown: dict[tuple[int, ...], tuple[int, ...]],
                 adapter: Adapter) -> int | None:
    """The vocabulary size of a merge whose adapter grew the embedding tables (model.add_tokens), else None.
    Every base table of the old shape must have been grown alike: one left at the old size would not load."""
    if not grown:
        return None
    sizes = {shape[0] for shape in grown.values()}
    if len(sizes) > 1:
        raise AdapterError(f"{adapter.file}: the adapter grows the embedding tables to different sizes "
                           f"({', '.join(map(str, sorted(sizes)))} rows); it cannot be merged")
    left = [t.name for t in tensors.values() if t.shape in grown and t.replacement is None]
    if left:
        raise AdapterError(f"{adapter.file}: the adapter grows the embedding to {sizes.pop()} rows but saves no "
                           f"trained {left[0]}, which would keep the old size; train it too (lora.modules_to_save)")
    return sizes.pop()


# ---------------------------------------------------------------------------------------------
# Writing


class _ByteProgress:
    """A bar over bytes written on a terminal; a plain line every 10% otherwise (CI, logs)."""

    def __init__(self, total: int, description: str):
        self.total, self.done, self.t0 = total, 0, time.perf_counter()
        self._next_line = 0.1
        self._bar = None
        if console.is_terminal:
            from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(TextColumn(description), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                                 console=console, transient=True)
            self._task = self._bar.add_task(description, total=total)
            self._bar.start()
        self.description = description

    def advance(self, n: int) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done)
        elif self.total and self.done / self.total >= self._next_line:
            self._next_line = int(self.done / self.total * 10 + 1e-9) / 10 + 0.1
            console.print(f"  {self.description}: {_size(self.done)}/{_size(self.total)} "
                          f"({self.done / self.total:.0%}, {time.perf_counter() - self.t0:.0f}s)")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


def _produce(t: OutputTensor, model: SafetensorsModel, adapter: Adapter, dtype: torch.dtype) -> torch.Tensor:
    """One output tensor: read, update, cast; refused when not finite."""
    w = adapter.read(t.replacement) if t.replacement else model.read(t.source)
    if t.lora is not None:
        w = merged_weight(w, t.lora, adapter, dtype)
    elif t.bias_of is not None:
        w = merged_bias(w, t.bias_of, adapter, dtype)
    elif w.is_floating_point():
        w = w.to(dtype)
    # Merged tensors can carry a broken adapter's NaNs; fp16 can overflow any tensor.
    if w.is_floating_point() and (t.modified or dtype == torch.float16) and not _finite(w):
        why = "the adapter produces non-finite values there" if t.modified else "values beyond the fp16 range"
        raise ModelError(f"merged tensor {t.name} has inf/NaN ({why}); "
                         + ("use --dtype bf16" if dtype == torch.float16 else "check the adapter"))
    return w


def _finite(w: torch.Tensor) -> bool:
    # aminmax propagates NaN and shows inf, and on the CPU runs ~10x faster than isfinite().all()
    lo, hi = torch.aminmax(w)
    return math.isfinite(lo.item()) and math.isfinite(hi.item())


def write_shards(plan: MergePlan, layout: ShardLayout, model: SafetensorsModel, adapter: Adapter,
                 dtype: torch.dtype, out_dir: Path) -> None:
    """Produce the tensors in layout order, one shard held at a time."""
    progress = _ByteProgress(layout.total_bytes, "merging")
    try:
        for file, names in layout.files.items():
            shard: dict[str, torch.Tensor] = {}
            for name in names:
                shard[name] = _produce(plan.tensors[name], model, adapter, dtype)
                progress.advance(shard[name].nbytes)
            write_shard(out_dir / file, shard)
            del shard
            fsync_file(out_dir / file)
    finally:
        progress.close()
    if layout.sharded:
        (out_dir / INDEX_FILE).write_text(json.dumps(layout.index(), indent=2) + "\n", encoding="utf-8")


def write_model_config(model_dir: Path, out_dir: Path, dtype_name: str, untie: bool, vocab_size: int | None = None) -> None:
    """The base's config.json with the output dtype, untied embeddings when the merge split them, and the grown
    vocabulary when the adapter added tokens."""
    cfg = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    if vocab_size is not None:
        cfg["vocab_size"] = vocab_size
        if isinstance(cfg.get("text_config"), dict):
            cfg["text_config"]["vocab_size"] = vocab_size
    cfg["dtype"] = _CONFIG_DTYPE[dtype_name]
    if "torch_dtype" in cfg:  # the name transformers 4 wrote and reads
        cfg["torch_dtype"] = _CONFIG_DTYPE[dtype_name]
    if untie:
        cfg["tie_word_embeddings"] = False
        if isinstance(cfg.get("text_config"), dict):
            cfg["text_config"]["tie_word_embeddings"] = False
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_tokenizer_files(model_dir: Path, out_dir: Path, chat_template: str | None, eot_id: int | None,
                          trust_remote_code: bool, tokenizer_dir: Path | None = None) -> list[int]:
    """Tokenizer (+ the chat template the run trained with) and generation config; returns the stop ids.

    Generation stops at the end-of-turn token the model was trained to emit: it is added to
    generation_config.eos_token_id when the base's config does not list it (a base model fine-tuned
    with data.template=chatml would otherwise run past <|im_end|> in plain `generate`).
    """
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    # The run's tokenizer when training added tokens to it (saved beside the adapter), else the base's.
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir or model_dir), trust_remote_code=trust_remote_code)
    if chat_template is not None:
        tok.chat_template = chat_template
    tok.save_pretrained(str(out_dir))
    try:
        gen = GenerationConfig.from_pretrained(str(model_dir))
    except OSError:  # the base ships none: the defaults transformers derives from config.json
        gen = GenerationConfig.from_model_config(AutoConfig.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code))
    eos = gen.eos_token_id
    stops = [] if eos is None else list(eos) if isinstance(eos, (list, tuple)) else [eos]
    if eot_id is not None and eot_id not in stops:
        stops.append(eot_id)
    if stops:
        gen.eos_token_id = stops if len(stops) > 1 else stops[0]
    gen.save_pretrained(str(out_dir))
    return stops


# ---------------------------------------------------------------------------------------------
# Sources and destination


def _adapter_source(source: str, base: str | None, trust_remote_code: bool) -> tuple[Path, Config | None, str]:
    """(adapter dir, the run's config or None, the base model path to use)."""
    from qflash.rundir import find_adapter

    p = Path(source)
    if not p.exists():
        raise ConfigError(f"merge: {p}: no such run or adapter directory")
    if not ((p / "adapter_config.json").is_file() or (p / "adapter" / "adapter_config.json").is_file()):
        raise ConfigError(f"merge: {p}: no adapter_config.json here or in {p / 'adapter'}; "
                          "give a run directory (output_dir of qflash train) or a PEFT adapter directory")
    adapter_dir, cfg = find_adapter(p, trust_remote_code)
    if base is not None:
        return adapter_dir, cfg, base
    if cfg is None:
        named = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")
        raise ConfigError(
            f"merge: {adapter_dir} has no qflash_config.yaml, so the base model is unknown"
            + (f" (adapter_config.json names '{named}')" if named else "")
            + "; pass --base with the base model directory it was trained on"
        )
    return adapter_dir, cfg, cfg.model.path


def _overlaps(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a == b or a in b.parents or b in a.parents


def _check_output(out: Path, overwrite: bool, keep: dict[str, Path]) -> None:
    for what, path in keep.items():
        if _overlaps(out, path):
            raise ConfigError(f"--output: {out} overlaps the {what} {path}; choose a directory apart from it")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output: {out} is a file; give a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"--output: {out} exists and is not empty; pass --overwrite to replace it, or choose another directory")


OWNER = ".owner-pid"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def _owner(leftover: Path) -> int | None:
    """The process that made a merge's temporary or set-aside directory: from its name (.X.merge-old-PID,
    .X.merge-tmp-PID-*), else from its .owner-pid file (temporaries of older versions)."""
    tail = leftover.name.rsplit(".merge-", 1)[-1].split("-")  # old-PID, tmp-PID-RANDOM
    if len(tail) == {"old": 2, "tmp": 3}.get(tail[0]) and tail[1].isdigit():
        return int(tail[1])
    try:
        return int((leftover / OWNER).read_text(encoding="utf-8").strip())
    except (OSError, ValueError):
        return None


def _dead(pid: int | None) -> bool:
    return pid is not None and pid != os.getpid() and not _pid_alive(pid)


def _remove_orphans(out: Path) -> None:
    """What merges into `out` left when their process died (killed with -9, power cut): temporaries can never
    finish, so they go; the previous model set aside by a merge killed between its two renames goes too, or,
    when `out` is missing (the kill came between them), is put back as `out`. Anything whose process still
    runs, or of unknown owner, is left alone. Each is said."""
    if not out.parent.is_dir():
        return
    for old in sorted(out.parent.glob(f".{out.name}.merge-old-*")):
        if not _dead(pid := _owner(old)):
            continue
        if out.exists():
            shutil.rmtree(old, ignore_errors=True)
            console.print(f"  removed {old} (the previous {out.name}, left by a merge interrupted while swapping)")
        else:
            os.replace(old, out)
            console.print(f"  restored {out} from {old} (a merge, process {pid}, was killed between its two renames)")
    for tmp in sorted(out.parent.glob(f".{out.name}.merge-tmp-*")):
        if _dead(pid := _owner(tmp)):
            shutil.rmtree(tmp, ignore_errors=True)
            console.print(f"  removed {tmp} (left by an interrupted merge, process {pid})")


def _replace_dir(tmp: Path, out: Path) -> None:
    (tmp / OWNER).unlink(missing_ok=True)
    # mkdtemp makes the directory private (0700) and safetensors writes 0600 files: give them the
    # modes any new file gets here, so the merged model is as readable as the base was.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    for f in tmp.iterdir():
        os.chmod(f, 0o666 & ~umask)
    fsync_tree(tmp)  # shards, index, config, tokenizer, qflash_merge.json and the directory, before the rename
    swap_in(tmp, out, f".{out.name}.merge-old-{os.getpid()}")  # fsyncs the parent directory


def _refuse_quantized(model_dir: Path, given: bool) -> None:
    """Merging writes 16-bit weights, so it reads 16-bit ones: a quantized base (the run may have trained on one,
    a bitsandbytes 4-bit, GPTQ or AWQ checkpoint) is refused, saying to pass the 16-bit model with --base."""
    from qflash.model.loading import stored_quantization

    q = stored_quantization(model_dir)
    if q is None:
        return
    if given:
        raise ModelError(f"--base: {model_dir} is quantized ({q.describe()}); merge reads 16-bit weights: pass the "
                         "unquantized model it was made from")
    raise ModelError(f"merge: the run trained on {model_dir}, which is quantized ({q.describe()}); merge reads 16-bit "
                     "weights: pass --base with the unquantized model it was made from")


# ---------------------------------------------------------------------------------------------
# The command


@dataclass
class MergeResult:
    output: Path
    files: list[str]
    total_bytes: int
    tensors: int
    lora_modules: int
    replaced: list[str]
    untied: list[str]
    stop_ids: list[int]
    seconds: float
    fidelity: dict | None = None

    def record(self, opts: MergeOptions, adapter: Adapter, base: str, model_dir: Path, max_bytes: int) -> dict:
        from qflash import __version__
        from qflash.paths import sha256_file

        return {
            "qflash_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "source": str(Path(opts.source).resolve()),
            "adapter": {"dir": str(adapter.dir.resolve()), "sha256": sha256_file(adapter.file),
                        "r": adapter.config.get("r"), "lora_alpha": adapter.config.get("lora_alpha"),
                        "use_rslora": bool(adapter.config.get("use_rslora")), "use_dora": adapter.dora},
            "base": {"path": base, "dir": str(model_dir.resolve())},
            "dtype": opts.dtype,
            "max_shard_size": max_bytes,
            "files": self.files,
            "total_bytes": self.total_bytes,
            "tensors": self.tensors,
            "lora_modules": self.lora_modules,
            "replaced_tensors": self.replaced,
            "untied": self.untied,
            "generation_stop_ids": self.stop_ids,
            "fidelity": self.fidelity,
        }


@dataclass
class _Sources:
    """Everything the merge reads, resolved and checked before anything is written."""

    adapter: Adapter
    cfg: Config | None
    base: str
    model_dir: Path
    model: SafetensorsModel
    tok: object
    renderer: object | None
    trust: bool


def _gather(opts: MergeOptions) -> _Sources:
    from qflash.model.loading import load_tokenizer, resolve_model_dir

    adapter_dir, cfg, base = _adapter_source(opts.source, opts.base, opts.trust_remote_code)
    model_dir = resolve_model_dir(base)
    _check_output(Path(opts.output), opts.overwrite, {"base model": model_dir, "adapter": adapter_dir})
    _refuse_quantized(model_dir, given=opts.base is not None)
    trust = opts.trust_remote_code
    adapter, model = read_adapter(adapter_dir), SafetensorsModel(model_dir)
    tok = load_tokenizer(tokenizer_dir(model_dir, adapter_dir), trust)
    return _Sources(adapter, cfg, base, model_dir, model, tok, _renderer(tok, cfg), trust)


def _write_all(tmp: Path, src: _Sources, plan: MergePlan, layout: ShardLayout, dtype_name: str) -> list[int]:
    """Shards, index, config, tokenizer and generation config into tmp; returns the generation stop ids."""
    write_shards(plan, layout, src.model, src.adapter, DTYPES[dtype_name], tmp)
    write_model_config(src.model_dir, tmp, dtype_name, untie=bool(plan.untied), vocab_size=plan.vocab_size)
    r = src.renderer
    # The run's own template (data.template) when it trained with one instead of the tokenizer's.
    trained_template = r.template_text if r is not None and src.cfg is not None and src.cfg.data.template else None
    return write_tokenizer_files(src.model_dir, tmp, trained_template, r.eot_id if r is not None else None, src.trust,
                                 tokenizer_dir(src.model_dir, src.adapter.dir))


def merge(opts: MergeOptions) -> MergeResult:
    """Merge, check fidelity (unless opts.check is off), and put the result in place. Prints progress."""
    from qflash.export.fidelity import check_fidelity, print_fidelity

    t0 = time.perf_counter()
    if opts.dtype not in DTYPES:
        raise ConfigError(f"--dtype: {opts.dtype!r}; choose bf16, fp16 or fp32")
    if opts.check and opts.check_samples < 1:
        raise ConfigError("--check-samples: must be >= 1 (or pass --no-check)")
    max_bytes = parse_size(opts.max_shard_size)
    out = Path(opts.output)
    _remove_orphans(out)  # before the output is checked: an interrupted swap puts the previous model back
    src = _gather(opts)
    plan = plan_merge(src.model, src.adapter, tied_weights(src.model_dir, src.trust))
    layout = plan_shards(plan.out_specs(DTYPES[opts.dtype]), max_bytes)
    console.print(
        f"[bold]qflash merge[/]: {len(src.adapter.modules)} LoRA modules"
        + (f" + {len(src.adapter.replacements)} saved tensors" if src.adapter.replacements else "")
        + f" from {src.adapter.dir} into {src.model_dir} ({_count(src.model.n_params)} parameters), "
        f"{opts.dtype}, {len(layout.files)} file(s) of at most {_size(max_bytes)}"
    )

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.merge-tmp-{os.getpid()}-", dir=out.parent))
    try:
        (tmp / OWNER).write_text(f"{os.getpid()}\n", encoding="utf-8")
        stops = _write_all(tmp, src, plan, layout, opts.dtype)
        result = MergeResult(
            out, list(layout.files), layout.total_bytes, len(plan.tensors), len(src.adapter.modules),
            sorted(t.name for t in plan.tensors.values() if t.replacement), plan.untied, stops, 0.0,
        )
        console.print(f"  wrote {len(layout.files)} file(s), {_size(layout.total_bytes)}, "
                      f"in {time.perf_counter() - t0:.1f}s" + (f"; untied {', '.join(plan.untied)}" if plan.untied else ""))
        if opts.check:
            report = check_fidelity(tmp, src.model_dir, src.adapter.dir, src.cfg, src.tok, src.renderer, opts.dtype,
                                    src.model.n_params, opts.check_samples)
            print_fidelity(report)
            result.fidelity = report.to_dict()
        result.seconds = time.perf_counter() - t0
        record = result.record(opts, src.adapter, src.base, src.model_dir, max_bytes)
        (tmp / MERGE_RECORD).write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        _replace_dir(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        kept = f"the previous {out} is intact" if out.exists() else "nothing was left behind"
        raise StorageError(f"merge: {e.filename or out}: {e.strerror or e}; {kept}. Free space or fix permissions, "
                           "then run the same command again") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    console.print(_summary(result))
    return result


def _renderer(tok, cfg: Config | None):
    """The chat renderer the run trained with; for a bare adapter, the tokenizer's own template if it has one."""
    from qflash.data.template import ChatRenderer
    from qflash.errors import DataError

    if cfg is not None:
        return ChatRenderer(tok, cfg.data.template, cfg.data.train_on)
    if not getattr(tok, "chat_template", None):
        return None
    try:
        return ChatRenderer(tok)
    except DataError as e:  # a template qflash cannot train with still renders check samples as plain text
        console.print(f"[yellow]the tokenizer's chat template is not usable by qflash ({e}); "
                      "check samples are plain text[/]")
        return None


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _summary(r: MergeResult) -> str:
    line = (f"merged {r.lora_modules} LoRA modules into {r.tensors} tensors -> {r.output} "
            f"({len(r.files)} file(s), {_size(r.total_bytes)}) in {r.seconds:.1f}s")
    fid = r.fidelity or {}
    comps = fid.get("comparisons") or []
    if comps:
        line += "; vs " + "; vs ".join(
            f"{c['reference']}: max |dlogit| {c['max_abs_diff']:.2e}, KL {c['mean_kl']:.2e}" for c in comps)
    elif fid.get("skipped"):
        line += f"; fidelity check skipped ({fid['skipped']})"
    return line
