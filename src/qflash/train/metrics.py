"""Where training reports go: a progress bar on the terminal, metrics.jsonl and TensorBoard."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from qflash.ui import console


class MetricsWriter:
    """Appends one JSON line per logged step and mirrors scalars to TensorBoard."""

    def __init__(self, out_dir: Path, tensorboard: bool = True, purge_step: int | None = None):
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / "metrics.jsonl"
        self._file = open(self.path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: a resumed run hides the events an interrupted attempt wrote past its checkpoint
            self._tb = SummaryWriter(log_dir=str(out_dir / "tensorboard"), purge_step=purge_step)

    def write(self, step: int, values: dict) -> None:
        self._file.write(json.dumps({"step": step, **values}) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(f"train/{k}", v, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


class StepProgress:
    """A live bar (step, loss, lr, tok/s, ETA) on a terminal; periodic plain lines otherwise (CI, logs)."""

    def __init__(self, total: int, start: int = 0, description: str = "train"):
        self.total, self.step, self.start = total, start, start
        self.live = console.is_terminal
        self.t0 = time.perf_counter()
        self.every = max(1, total // 20)
        self._progress = None
        if self.live:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total}"),
                TextColumn("{task.fields[stats]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=console,
                transient=False,
            )
            self._task = self._progress.add_task(description, total=total, completed=start, stats="")
            self._progress.start()

    def update(self, step: int, loss: float, lr: float, tok_s: float) -> None:
        self.step = step
        stats = f"loss {loss:.4f}  lr {lr:.2e}  {tok_s:,.0f} tok/s"
        if self._progress is not None:
            self._progress.update(self._task, completed=step, stats=stats)
        elif step % self.every == 0 or step == self.total:
            elapsed = time.perf_counter() - self.t0
            eta = elapsed / max(step - self.start, 1) * (self.total - step)
            print(f"step {step}/{self.total}  {stats}  elapsed {elapsed:.0f}s  ETA {eta:.0f}s", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
