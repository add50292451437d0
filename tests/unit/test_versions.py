"""The tested version ranges: one clear line for a core package outside them; the locks stay inside them."""

import subprocess
import sys

import pytest

from conftest import REPO
from qflash import versions


def test_inside_the_ranges_says_nothing_outside_names_package_version_and_range():
    inside = {name: f"{high}.3" for name, (_, high) in versions.TESTED.items()}
    assert versions.untested(inside) == []
    outside = dict(inside, transformers="5.26.0", peft="0.20.1")
    lines = versions.untested(outside)
    assert len(lines) == 2
    low, high = versions.TESTED["transformers"]
    assert lines[0].startswith("qflash: transformers 5.26.0 is outside the tested range ")
    assert f"{low}.x to {high}.x" in lines[0] and "make setup" in lines[0]
    assert "peft 0.20.1" in lines[1]
    assert versions.untested(dict(inside, torch=None)) == []  # not installed: left to the import that needs it


@pytest.mark.parametrize("lock", ["cpu.lock", "cuda.lock"])
def test_each_lock_pins_every_core_package_inside_the_tested_ranges(lock):
    """Moving a lock forward moves qflash/versions.py with it (and the tiers run again): never one alone."""
    pins = versions.read_lock(REPO / "requirements" / lock)
    assert set(versions.TESTED) <= set(pins), set(versions.TESTED) - set(pins)
    assert versions.untested(pins) == []
    assert pins["torch"].startswith("2.13.0+cpu" if lock == "cpu.lock" else "2.11.0")


def test_the_cli_says_it_once_at_start(monkeypatch, capsys):
    from qflash import cli

    monkeypatch.setattr(versions, "installed", lambda name: "9.9.0" if name == "accelerate" else None)
    monkeypatch.delenv(versions.ENV_QUIET, raising=False)
    assert cli.main(["config", "show", str(REPO / "configs" / "demo.yaml")]) == 0
    err = capsys.readouterr().err.splitlines()
    assert [line for line in err if "outside the tested range" in line] == [
        f"qflash: accelerate 9.9.0 is outside the tested range {versions.TESTED['accelerate'][0]}.x to "
        f"{versions.TESTED['accelerate'][1]}.x; it may work, but if something breaks, install the lock "
        f"(make setup) or `pip install 'accelerate=={versions.TESTED['accelerate'][1]}.*'`"]


def test_installed_versions_are_compared_with_a_lock():
    p = subprocess.run([sys.executable, "-m", "qflash.versions", "--against", str(REPO / "requirements" / "cpu.lock")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "locked packages differ from" in p.stdout
