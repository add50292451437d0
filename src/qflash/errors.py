"""Errors a user can fix. The CLI prints them as one line and exits with code 2; no traceback."""

from __future__ import annotations


class QflashError(Exception):
    """A problem with the user's input (config, data, paths). Its message says what, where and what to do."""

    exit_code = 2


class ConfigError(QflashError):
    """A config key, value or override that is wrong."""


class DataError(QflashError):
    """A data file or record that cannot be used."""


class ModelError(QflashError):
    """A model path or model file that cannot be loaded."""


class StorageError(QflashError):
    """A file could not be written (disk full, permissions); what was there before is intact."""

    exit_code = 1
