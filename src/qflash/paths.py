"""Paths built from names that come from configs or data must stay inside their root."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from qflash.errors import ConfigError, StorageError


def qflash_home() -> Path:
    """$QFLASH_HOME, else $XDG_CACHE_HOME/qflash, else ~/.cache/qflash (models, data cache, bench models).

    Here, not in model/, so that a cached `qflash data check` never imports torch.
    """
    if os.environ.get("QFLASH_HOME"):
        return Path(os.environ["QFLASH_HOME"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "qflash"


def fsync_file(path: Path) -> None:
    """Flush a written file's data to the disk before it is renamed into place."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (a file created or renamed in it) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Every file under `root`, then every directory bottom-up, flushed to the disk: after this a rename of
    `root` cannot become durable before its contents (no complete-looking directory of empty files after a
    power cut)."""
    dirs = []
    for here, _, files in os.walk(root):
        dirs.append(Path(here))
        for name in files:
            path = Path(here) / name
            if not path.is_symlink():
                fsync_file(path)
    for d in reversed(dirs):
        fsync_dir(d)


def write_file_durably(path: Path, text: str) -> None:
    """Write a small text file under a temporary name, fsync it, rename it into place, fsync the directory:
    `path` holds the old text or the new one, never a part."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def inside(root: Path, name: str | Path, what: str = "path") -> Path:
    """root/name, refusing absolute names, `..`, and symlinks that lead out of root."""
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts:
        raise ConfigError(f"{what}: '{name}' must be a plain name inside {root} (no absolute path, no '..')")
    target = root / rel
    real_root = root.resolve()
    real = target.resolve()  # follows symlinks, also of components that exist already
    if real != real_root and real_root not in real.parents:
        raise ConfigError(f"{what}: '{name}' leads outside {root} (to {real}) through a symlink; refusing to write there")
    return target


def swap_in(tmp: Path, final: Path, aside: str) -> None:
    """Put directory `tmp` in `final`'s place: the old `final` (if any) is renamed to `aside` beside it,
    `tmp` renamed to `final`, then the old one removed. `final` exists whole at every moment but one rename."""
    old = None
    if final.exists():
        old = final.parent / aside
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)  # both renames on the disk before the old copy goes
    if old is not None:
        shutil.rmtree(old)


@contextlib.contextmanager
def replaced_atomically(final: Path, tag: str):
    """A fresh directory beside `final` to write into; when the block ends without an error its files
    and directories are fsync'd and it takes `final`'s place whole (the old one, if any, removed after the
    swap; the parent directory fsync'd). On an error, or a kill before the swap, `final` is untouched and
    the temporary one is removed (or, after a kill, left as `.TAG.tmp-*` for the next run to clear). A
    write that fails (disk full, permissions) is a StorageError that says so."""
    final = Path(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{tag}.tmp-", dir=final.parent))
    try:
        yield tmp
        fsync_tree(tmp)
        swap_in(tmp, final, f".{tag}.old-{os.getpid()}")
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        kept = f"the previous {final} is intact" if final.exists() else f"nothing was left at {final}"
        raise StorageError(f"could not write {final}: {e.strerror or e}; {kept}. "
                           "Free space or fix permissions, then run the same command again") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
