"""Atomic writes: a file or a folder is either absent, the old one, or complete; never half-written.

Every writer in medaug goes through :func:`atomic_file` (one file) or :func:`atomic_folder` (a stage's
output folder, finished by a ``DONE`` marker). Both write under ``.<name>.tmp<pid>`` beside the target and
rename it into place; temps of writers that were killed (their pid is gone) are removed first.

Example::

    with atomic_folder("outputs/job/eval") as tmp:
        (tmp / "metrics.json").write_text("{}")
    assert is_complete("outputs/job/eval")
"""

from __future__ import annotations

import os
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def temp_name(path: str | os.PathLike) -> Path:
    """``.<name>.tmp<pid>`` beside ``path``: where this process writes ``path`` before renaming it into place."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Remove the temp files and folders of ``path`` (``.<name>.tmp<pid>``, as :func:`temp_name` makes them,
    with any suffix after the pid) whose writer process is gone: what a kill during a write leaves behind.
    Temps of living processes (this one included) are kept. Returns what was removed.

    Pids are those of this machine: two machines writing into one shared folder at once is not supported.
    """
    path = Path(path)
    prefix = f".{path.name}.tmp"
    removed = []
    if not path.parent.is_dir():
        return removed
    for entry in path.parent.iterdir():
        if not entry.name.startswith(prefix):
            continue
        pid = entry.name[len(prefix) :].split(".", 1)[0]
        if not pid.isdigit() or _pid_alive(int(pid)):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    if removed:
        warnings.warn(f"removed {len(removed)} temp file(s) left by killed writers of {path.name} in {path.parent}")
    return removed


@contextmanager
def atomic_folder(out_dir: str | os.PathLike):
    """Build a folder under a temporary name; on success write ``DONE`` and rename it into place.

    On any error the temporary folder is removed and ``out_dir`` is left as it was, so a
    folder with ``DONE`` is always complete. Yields the temporary path to write into. Temp
    folders of ``out_dir`` left by killed processes are removed first.
    """
    out_dir = Path(out_dir)
    remove_stale_temps(out_dir)
    tmp = temp_name(out_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        (tmp / "DONE").write_text("complete\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_file(
    path: str | os.PathLike, mode: int | None = None, suffix: str = "", clean: bool = True
) -> Iterator[Path]:
    """Write a file under a temporary name beside ``path`` (:func:`temp_name` plus ``suffix``); on success
    rename it into place, so ``path`` is always either the old file or the complete new one.

    Yields the temporary path to write to. On any error the temporary file is removed and ``path`` is left
    as it was. ``mode`` (e.g. ``0o600``): the temporary file is created with these permissions (less the
    umask) before the caller writes to it, so the content is never readable by others. ``suffix``: for
    writers that pick the format by extension (``".nii.gz"``). ``clean``: first remove the temps of ``path``
    left by killed writers (:func:`remove_stale_temps`); writers of many files into one fresh folder pass
    ``False``, as that scans the folder once per file. The parent folder is created if missing.

    Example::

        with atomic_file(out / "report.csv", mode=0o600) as tmp:
            tmp.write_text("file,tag,reason\n")
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if clean:
        remove_stale_temps(path)
    tmp = temp_name(path)
    tmp = tmp.with_name(tmp.name + suffix)
    tmp.unlink(missing_ok=True)
    if mode is not None:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode))
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def is_complete(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` was finished by :func:`atomic_folder` (its ``DONE`` marker exists)."""
    return (Path(folder) / "DONE").is_file()
