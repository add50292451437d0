"""`qflash eval RUN_DIR`: evaluate, write <run>/eval/, print the summary table."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from qflash.errors import ConfigError


def run_eval(run: str, *, data: Sequence[str] | None = None, control: str | None = None,
             max_new_tokens: int | None = None, limit: int | None = None, trust_remote_code: bool = False) -> int:
    from qflash.eval.evaluate import evaluate_run
    from qflash.eval.report import print_table, write_report
    from qflash.ui import console

    run_dir = Path(run)
    if not run_dir.is_dir():
        raise ConfigError(f"RUN_DIR: {run}: no such directory (give the output_dir of a qflash train run)")
    console.rule(f"[bold]qflash eval {run}")
    result = evaluate_run(run_dir, data=data, control=control, max_new_tokens=max_new_tokens, limit=limit,
                          say=lambda s: console.print(s), trust_remote_code=trust_remote_code)
    where = write_report(result, run_dir)
    print_table(result, where)
    return 0
