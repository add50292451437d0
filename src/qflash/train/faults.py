"""Fault injection for the crash-safety tests: the failures a long run meets, on demand.

Set from tests, or through the environment for a subprocess, as `QFLASH_FAULTS`:
    nan_steps=3,4         the loss of these steps (1-based) becomes NaN
    save_pause=0.5        sleep this long before each checkpoint file write (to kill a run mid-write)
    enospc_at_save=2      the 2nd checkpoint save fails with ENOSPC (disk full) half way through
Nothing here is active unless asked for.
"""

from __future__ import annotations

import errno
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

ENV = "QFLASH_FAULTS"


@dataclass
class Faults:
    nan_steps: set[int] = field(default_factory=set)
    save_pause: float = 0.0
    enospc_at_save: int = 0
    _writes_in_save: int = 0
    _saves: int = 0

    @classmethod
    def from_env(cls) -> "Faults":
        spec = os.environ.get(ENV, "")
        f = cls()
        for part in filter(None, (p.strip() for p in spec.split(";"))):
            key, _, value = part.partition("=")
            if key == "nan_steps":
                f.nan_steps = {int(x) for x in value.split(",") if x}
            elif key == "save_pause":
                f.save_pause = float(value)
            elif key == "enospc_at_save":
                f.enospc_at_save = int(value)
            else:
                raise ValueError(f"{ENV}: unknown fault '{key}'")
        return f

    def start_save(self) -> None:
        self._saves += 1
        self._writes_in_save = 0

    def before_write(self, path: Path) -> None:
        self._writes_in_save += 1
        if self.save_pause:
            time.sleep(self.save_pause)
        if self.enospc_at_save and self._saves == self.enospc_at_save and self._writes_in_save == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    def loss_is_nan(self, step: int) -> bool:
        return step in self.nan_steps
