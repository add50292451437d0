"""The versions of the core packages qflash is tested with, and one line for each one found outside them.

qflash reaches into transformers, PEFT, bitsandbytes and accelerate at known depths (attention registration,
PEFT's 4-bit LoRA layer, bitsandbytes' quantization state, Accelerate's strategies). A release outside the
ranges below may change what it relies on (seed 003: XTuner broke when transformers 4.44 changed its
internals), so qflash says so at start, before a crash deep inside training can. The ranges are the versions
of requirements/*.lock (`make setup` installs them) and of the GPU machine the GPU tiers ran on; moving a
lock forward means moving these with it (tests/unit/test_versions.py checks that both agree).

`python -m qflash.versions --against requirements/cpu.lock` lists the installed versions that differ from a
lock (used by `make check-latest`).
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

# (oldest, newest) release tested, as major.minor; patch releases within them are taken as tested.
TESTED: dict[str, tuple[str, str]] = {
    "torch": ("2.11", "2.13"),  # 2.11 (CUDA 13) on the GPU machine, 2.13 (CPU) in CI
    "transformers": ("5.17", "5.25"),  # 5.17 on the GPU machine's image, 5.25 locked
    "peft": ("0.21", "0.21"),
    "accelerate": ("1.15", "1.16"),
    "bitsandbytes": ("0.50", "0.50"),
}

ENV_QUIET = "QFLASH_UNTESTED_OK"
"""Set to 1 to silence the untested-version lines (the check itself still runs in tests)."""


def _minor(version: str) -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", version)
    if m is None:
        raise ValueError(f"not a version: {version!r}")
    return int(m.group(1)), int(m.group(2))


def installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def untested(found: dict[str, str | None] | None = None) -> list[str]:
    """One line per core package whose installed version lies outside TESTED (none when all are inside).

    `found` maps package -> version (default: what is installed); a package that is not installed is left
    to the code that imports it, which names what to install."""
    found = found if found is not None else {name: installed(name) for name in TESTED}
    lines = []
    for name, (low, high) in TESTED.items():
        version = found.get(name)
        if version is None:
            continue
        if not _minor(low) <= _minor(version) <= _minor(high):
            tested = f"{low}.x" if low == high else f"{low}.x to {high}.x"
            lines.append(f"qflash: {name} {version} is outside the tested range {tested}; it may work, but if "
                         f"something breaks, install the lock (make setup) or `pip install '{name}=={high}.*'`")
    return lines


def warn_untested(stream=None) -> list[str]:
    """Print untested() to stderr, once per process start (the CLI calls this first)."""
    import os

    lines = untested()
    if lines and os.environ.get(ENV_QUIET) != "1":
        for line in lines:
            print(line, file=stream or sys.stderr)
    return lines


def read_lock(path: Path) -> dict[str, str]:
    """package -> version of a requirements lock (lines `name==version`, comments and options skipped)."""
    pins = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;\\]+)", line.strip())
        if m:
            pins[m.group(1).lower().replace("_", "-")] = m.group(2)
    return pins


def _main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m qflash.versions",
                                     description="installed versions of the locked packages that differ from a lock")
    parser.add_argument("--against", type=Path, required=True, help="a requirements lock (requirements/cpu.lock)")
    args = parser.parse_args(argv)
    pins = read_lock(args.against)
    moved = [(name, want, installed(name)) for name, want in sorted(pins.items())]
    moved = [(n, w, got) for n, w, got in moved if got is not None and got != w]
    for name, want, got in moved:
        print(f"  {name}: {want} (lock) -> {got}")
    print(f"{len(moved)} of {len(pins)} locked packages differ from {args.against}")
    for line in untested():
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
