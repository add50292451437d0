"""Loading a base model (+ adapter) for inference and answering prompts with it."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from qflash.config import EMBEDDED_MODEL, Config
from qflash.data.template import ChatRenderer
from qflash.errors import ConfigError
from qflash.model.loading import (
    compute_context,
    compute_dtype,
    load_configured_base,
    load_tokenizer,
    pick_device,
    refuse_unloadable,
    resolve_model_dir,
)
from qflash.model.lora import load_adapter
from qflash.rundir import find_adapter, is_adapter_path, run_name, tokenizer_dir

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    renderer: ChatRenderer
    cfg: Config
    has_adapter: bool
    device: torch.device
    name: str = ""
    """A short name for what was loaded: the run's directory name, else the model's."""
    dtype: torch.dtype = torch.float32
    """The compute dtype (quant.compute_dtype as resolved for `device`)."""

    def compute(self):
        """The context every forward of this model runs in (autocast to a 16-bit `dtype`, as training does)."""
        return compute_context(self.device, self.dtype)


QuantChoice = Literal["auto", "nf4", "none"]


def load_for_inference(
    model: str | None = None, adapter: str | None = None, device: str = "auto", quant: QuantChoice | None = None,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """The base model quantized as it was trained (NF4 unless the run said none), plus the adapter.

    quant: None = the run config's quant.mode (NF4 for a plain model: how training would load it);
    auto = as trained with an adapter, unquantized without one (a merged 16-bit model stays 16-bit);
    nf4 / none force it. trust_remote_code: the command line's --trust-remote-code (a run's saved config
    cannot switch it on: rundir.find_adapter).
    """
    cfg = Config()
    adapter_dir = None
    if adapter:
        adapter_dir, run_cfg = find_adapter(adapter, trust_remote_code)
        if run_cfg is not None:
            cfg = run_cfg
    cfg.model.trust_remote_code = trust_remote_code
    if model:
        cfg.model.path = model
    if quant == "auto":
        quant = cfg.quant.mode if adapter_dir is not None else "none"
    if quant is not None:
        cfg.quant.mode = quant
    dev = pick_device(device)
    dtype = compute_dtype(cfg.quant.compute_dtype, dev)
    model_dir = resolve_model_dir(cfg.model.path)
    refuse_unloadable(model_dir)
    tok = load_tokenizer(tokenizer_dir(model_dir, adapter_dir), cfg.model.trust_remote_code)
    renderer = ChatRenderer(tok, cfg.data.template, cfg.data.train_on)
    base = load_configured_base(cfg, model_dir, dev, dtype)
    net = load_adapter(base, adapter_dir) if adapter_dir is not None else base
    net.eval()
    return LoadedModel(net, tok, renderer, cfg, adapter_dir is not None, dev, _display_name(cfg.model.path, adapter_dir),
                  dtype)


def _display_name(model_path: str, adapter_dir: Path | None) -> str:
    if adapter_dir is not None:
        return run_name(adapter_dir)
    return Path(model_path).stem if model_path.endswith(".gguf") else Path(model_path).name or EMBEDDED_MODEL


def split_target(target: str | None, model: str | None, adapter: str | None) -> tuple[str | None, str | None]:
    """MODEL_OR_RUN (positional) with --model/--adapter -> (model, adapter) for load_for_inference."""
    if not target:
        return model, adapter
    if is_adapter_path(target):
        if adapter:
            raise ConfigError(f"MODEL_OR_RUN {target} is a run/adapter and --adapter {adapter} too: give one of them")
        return model, target
    if model:
        raise ConfigError(f"MODEL_OR_RUN {target} is a model and --model {model} too: give one of them")
    if target != EMBEDDED_MODEL and not Path(target).expanduser().exists():
        raise ConfigError(
            f"MODEL_OR_RUN {target}: no such file or directory; give a run directory, an adapter directory, "
            f"a model directory, a .gguf file or {EMBEDDED_MODEL}"
        )
    return target, adapter


def load_target(
    target: str | None, model: str | None = None, adapter: str | None = None, device: str = "auto",
    quant: QuantChoice = "auto", trust_remote_code: bool = False,
) -> LoadedModel:
    """What the chat/generate/serve commands load: MODEL_OR_RUN and/or --model/--adapter."""
    model, adapter = split_target(target, model, adapter)
    t0 = time.perf_counter()
    log.info("loading %s ...", " + ".join(x for x in (model, adapter) if x) or EMBEDDED_MODEL)
    loaded = load_for_inference(model, adapter, device, quant, trust_remote_code)
    log.info("loaded %s (%s base%s, %s) in %.1fs", loaded.name, "NF4" if loaded.cfg.quant.mode == "nf4" else "unquantized",
             " + adapter" if loaded.has_adapter else "", loaded.device.type, time.perf_counter() - t0)
    return loaded


def answer(
    loaded: LoadedModel,
    conversations: list[list[dict[str, str]]],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 8,
) -> list[tuple[str, bool]]:
    """Greedy replies to each conversation: (text, stopped) where stopped = ended with the end-of-turn token."""
    from qflash.infer.engine import Engine, SamplingOptions

    engine = Engine(loaded)
    opts = SamplingOptions(temperature=0.0, max_new_tokens=max_new_tokens)
    results: list[tuple[str, bool]] = []
    for k in range(0, len(conversations), batch_size):
        prompts = [engine.prompt_ids(c) for c in conversations[k : k + batch_size]]
        for c in engine.complete_batch(prompts, opts):
            results.append((c.text.strip(), c.finish_reason == "stop"))
    return results
