"""`make demo`: fine-tune the embedded model on the identity set, then ask held-out questions before/after."""

from __future__ import annotations

import time
from pathlib import Path

from rich.table import Table

from qflash.errors import ConfigError
from qflash.ui import console


def compare_and_print(run: str, n: int | None = None, max_new_tokens: int | None = None,
                      trust_remote_code: bool = False) -> bool:
    """Print base vs fine-tuned answers side by side; True when the fine-tune names its identity on >= 80%
    of the held-out questions and (with eval.control_prompts) on at most 1 in 6 control prompts."""
    from qflash.eval.identity import compare_identity
    from qflash.infer.generate import load_for_inference

    loaded = load_for_inference(adapter=run, trust_remote_code=trust_remote_code)
    n = n if n is not None else loaded.cfg.eval.identity_samples
    max_new = max_new_tokens or loaded.cfg.eval.max_new_tokens
    console.print(f"asking {n} held-out identity questions to the base model and to the fine-tuned one ...")
    rows = compare_identity(loaded, n, max_new)
    name = loaded.cfg.data.vars.get("name")
    table = Table(title=f"held-out identity questions (identity: {name})", show_lines=True)
    table.add_column("question", ratio=1)
    table.add_column("base model", ratio=2)
    table.add_column("fine-tuned", ratio=2)
    for r in rows:
        mark = lambda ok: "[green]✓[/] " if ok else "[red]✗[/] "  # noqa: E731
        table.add_row(r.question, mark(r.base_named) + r.base, mark(r.tuned_named) + r.tuned)
    console.print(table)
    tuned = sum(r.tuned_named for r in rows)
    base = sum(r.base_named for r in rows)
    ok = tuned >= 0.8 * len(rows) and base < len(rows) / 2
    verdict = "[bold green]learned[/]" if ok else "[bold red]NOT learned[/]"
    console.print(f"answers naming '{name}': base model {base}/{len(rows)}, fine-tuned {tuned}/{len(rows)} -> {verdict}")
    if loaded.cfg.eval.control_prompts:
        ok = print_control(loaded, name) and ok
    return ok


SPILL_LIMIT = 1 / 6
"""Most control answers that may mention the identity before the demo calls it spilling."""


def print_control(loaded, name: str) -> bool:
    """Control prompts (general questions outside the training data): does the identity spill into the
    answers, and how close do they stay to the base model's? True when the spill is within SPILL_LIMIT."""
    from qflash.data.replay import load_prompts
    from qflash.eval.metrics import mentions_identity
    from qflash.eval.evaluate import control_metrics

    cfg = loaded.cfg
    prompts = load_prompts(cfg.eval.control_prompts, cfg.data.vars)
    console.print(f"asking {len(prompts)} control prompts ({cfg.eval.control_prompts}) to both models ...")
    c = control_metrics(loaded, prompts, cfg.eval.control_max_new_tokens, lambda s: console.print(s))
    table = Table(title="control prompts (general questions outside the training data)", show_lines=True)
    table.add_column("prompt", ratio=1)
    table.add_column("base model", ratio=2)
    table.add_column("fine-tuned", ratio=2)
    author = cfg.data.vars.get("author")
    spills = lambda text: mentions_identity(text, name, author)  # noqa: E731
    for p, (b, _), (t, _) in zip(prompts, c.base, c.tuned):
        table.add_row(p.messages[-1]["content"], ("[red]✗[/] " if spills(b) else "") + b,
                      ("[red]✗[/] " if spills(t) else "") + t)
    console.print(table)
    n = len(prompts)
    tuned = sum(spills(t) for t, _ in c.tuned)
    base = sum(spills(b) for b, _ in c.base)
    ok = tuned <= SPILL_LIMIT * n
    verdict = "[bold green]no spill[/]" if ok else "[bold red]spills into general answers[/]"
    who = f"'{name}'" + (f" or '{author}'" if author else "")
    console.print(f"control prompts mentioning {who}: base model {base}/{n}, fine-tuned {tuned}/{n} -> {verdict}")
    if c.closeness is not None:
        console.print(
            f"closeness to the base model on control prompts: KL(base||fine-tuned) {c.closeness.kl:.3f} nats/token, "
            f"top-1 agreement {100 * c.closeness.agreement:.0f}% over {c.closeness.tokens} answer tokens"
        )
    return ok


DEMO_CONFIG = Path("configs/demo.yaml")


def demo_root(cwd: Path | None = None) -> Path:
    """The directory holding configs/demo.yaml and data/demo: the working directory when it has them, else the
    source checkout this qflash runs from (an editable install, as `make setup` makes)."""
    cwd = Path.cwd() if cwd is None else cwd
    for root in (cwd, Path(__file__).resolve().parents[2]):
        if (root / DEMO_CONFIG).is_file():
            return root
    raise ConfigError(f"qflash demo: no {DEMO_CONFIG} in {cwd} or in the qflash source tree; run it from a qflash "
                      "checkout or pass --config with a config of your own")


def _anchor_inputs(cfg, root: Path, cwd: Path) -> list[str]:
    """Relative input files of `cfg` (datasets, replay and control prompts) that exist under `root` but not under
    `cwd` are made absolute under `root`; output_dir stays where the user is. Returns the paths changed."""
    moved = []

    def anchored(path: str) -> str:
        if not path or Path(path).is_absolute() or (cwd / path).exists() or not (root / path).exists():
            return path
        moved.append(path)
        return str(root / path)

    for spec in [*cfg.data.datasets, *cfg.data.eval_datasets]:
        spec.path = anchored(spec.path)
    cfg.data.replay.prompts = anchored(cfg.data.replay.prompts)
    cfg.eval.control_prompts = anchored(cfg.eval.control_prompts)
    return moved


def run_demo(config: str | None, overrides: list[str]) -> int:
    """`qflash demo`: configs/demo.yaml (from the working directory or the source checkout) unless `config`."""
    from qflash.config import load_config
    from qflash.train.loop import train

    t0 = time.perf_counter()
    if config is None:
        cwd = Path.cwd()
        root = demo_root(cwd)
        cfg = load_config(root / DEMO_CONFIG, overrides)
        if root != cwd:
            _anchor_inputs(cfg, root, cwd)
            console.print(f"demo config and data from {root}; the run goes to {Path(cfg.output_dir).resolve()}")
    else:
        cfg = load_config(config, overrides)
    console.rule("[bold]qflash demo: NF4 QLoRA on the embedded SmolLM2-135M-Instruct")
    result = train(cfg, overwrite=True)
    console.rule("[bold]before / after")
    ok = compare_and_print(str(result.output_dir), trust_remote_code=cfg.model.trust_remote_code)  # the user's own config
    console.print(f"demo finished in {time.perf_counter() - t0:.0f}s; run directory: {result.output_dir}")
    return 0 if ok else 1
