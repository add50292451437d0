"""Loading a base model (+ adapter) for inference and answering prompts with it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from qflash.config import Config, config_from_dict
from qflash.data.template import ChatRenderer
from qflash.errors import ConfigError
from qflash.model.loading import compute_dtype, load_configured_base, load_tokenizer, pick_device, resolve_model_dir
from qflash.model.lora import load_adapter
from qflash.train.loop import ADAPTER_DIR, RUN_CONFIG


def find_adapter(path: str | Path) -> tuple[Path, Config | None]:
    """A run directory or an adapter directory -> (adapter dir, the run's config if saved beside it)."""
    p = Path(path)
    for cand in (p / ADAPTER_DIR, p):
        if (cand / "adapter_config.json").is_file():
            cfg = None
            if (cand / RUN_CONFIG).is_file():
                tree = yaml.safe_load((cand / RUN_CONFIG).read_text(encoding="utf-8"))
                cfg = config_from_dict(tree, where=str(cand / RUN_CONFIG))
            return cand, cfg
    if (p / "config.yaml").is_file() and not (p / ADAPTER_DIR).exists():
        raise ConfigError(f"--adapter: {p}: this run has no adapter yet (did training finish?)")
    raise ConfigError(f"--adapter: {p}: no adapter_config.json here or in {p / ADAPTER_DIR}")


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: object
    renderer: ChatRenderer
    cfg: Config
    has_adapter: bool
    device: torch.device


def load_for_inference(model: str | None = None, adapter: str | None = None, device: str = "auto") -> Loaded:
    """The base model quantized as it was trained (NF4 unless the run said none), plus the adapter."""
    cfg = Config()
    adapter_dir = None
    if adapter:
        adapter_dir, run_cfg = find_adapter(adapter)
        if run_cfg is not None:
            cfg = run_cfg
    if model:
        cfg.model.path = model
    dev = pick_device(device)
    dtype = compute_dtype(cfg.quant.compute_dtype, dev)
    model_dir = resolve_model_dir(cfg.model.path)
    tok = load_tokenizer(model_dir, cfg.model.trust_remote_code)
    renderer = ChatRenderer(tok, cfg.data.template, cfg.data.train_on)
    base = load_configured_base(cfg, model_dir, dev, dtype)
    net = load_adapter(base, adapter_dir) if adapter_dir is not None else base
    net.eval()
    return Loaded(net, tok, renderer, cfg, adapter_dir is not None, dev)


@torch.inference_mode()
def answer(
    loaded: Loaded,
    conversations: list[list[dict[str, str]]],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 8,
) -> list[tuple[str, bool]]:
    """Greedy replies to each conversation: (text, stopped) where stopped = ended with the end-of-turn token."""
    tok, r = loaded.tokenizer, loaded.renderer
    stop_ids = sorted({r.eot_id, tok.eos_token_id} - {None})
    results: list[tuple[str, bool]] = []
    for k in range(0, len(conversations), batch_size):
        prompts = [r.prompt_ids(c) for c in conversations[k : k + batch_size]]
        width = max(len(p) for p in prompts)
        # Left padding: every prompt ends at the same position, where generation starts.
        ids = torch.full((len(prompts), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, p in enumerate(prompts):
            ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        out = loaded.model.generate(
            input_ids=ids.to(loaded.device),
            attention_mask=mask.to(loaded.device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=stop_ids,
            pad_token_id=tok.pad_token_id,
        )
        for row in out[:, width:].tolist():
            stopped = any(t in stop_ids for t in row)
            if stopped:
                row = row[: min(row.index(t) for t in stop_ids if t in row)]
            results.append((tok.decode(row, skip_special_tokens=True).strip(), stopped))
    return results
