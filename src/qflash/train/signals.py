"""SIGTERM / SIGINT: finish the current step, save a checkpoint, then stop with 143 / 130."""

from __future__ import annotations

import signal
import threading

from qflash.errors import QflashError


class TrainingInterrupted(QflashError):
    def __init__(self, signum: int, step: int, checkpoint: str):
        name = signal.Signals(signum).name
        super().__init__(
            f"{name} received: stopped after step {step}, checkpoint saved to {checkpoint}; "
            "rerun the same command to resume"
        )
        self.exit_code = 128 + signum  # 130 for SIGINT, 143 for SIGTERM


class StopRequests:
    """Records the first SIGTERM/SIGINT; a second one falls through to the default (immediate) action."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
            return
        self.signum = signum

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is not threading.main_thread():
            return self  # Python only delivers signals to the main thread
        for s in self.SIGNALS:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
