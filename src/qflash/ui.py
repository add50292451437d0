"""The terminal every command writes its progress and summaries to (stderr, so stdout stays the command's output)."""

from __future__ import annotations

from rich.console import Console

console = Console(stderr=True, highlight=False, soft_wrap=True)
