"""Say a thing once per process: a fallback or a choice the user should know about, not on every call."""

from __future__ import annotations

import logging

_said: set[str] = set()


def log_once(logger: logging.Logger, message: str, level: int = logging.WARNING) -> None:
    if message not in _said:
        _said.add(message)
        logger.log(level, message)
