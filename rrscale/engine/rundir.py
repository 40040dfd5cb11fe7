"""The files of a run directory and the rules that keep them consistent.

A run directory (``rrscale train --out OUT``) holds ``config.json``, ``metrics.jsonl`` (one
line per epoch), ``checkpoint.pt`` and ``summary.json``. Three rules keep it readable whatever
happened to the previous process:

* one writer at a time: a run holds an exclusive ``flock`` on ``OUT/.rrscale.lock`` for its
  whole life (the kernel releases it when the process ends, even on SIGKILL), so a second
  ``rrscale train`` into the same folder stops at once instead of writing every epoch twice;
* ``metrics.jsonl`` holds each epoch once: a run that resumes from epoch E's checkpoint drops
  the lines of later epochs (written before a kill, trained again now) by an atomic rewrite,
  both when ``rrscale train`` starts and when a process first writes a line (which covers a
  Ray worker group restarted from an older checkpoint); temporary files of a checkpoint write
  that was killed are removed when a run starts;
* JSON is strict: a non-finite number is written as ``null`` (bare ``NaN`` is not JSON).
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import numbers
import os
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from rrscale.engine.checkpoint import stale_temp_files

LOCK_FILE = ".rrscale.lock"
METRICS_FILE = "metrics.jsonl"


class RunDirError(ValueError):
    """A run directory that cannot be used; ``str(err)`` is one line naming it."""


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float replaced by ``None`` (JSON ``null``); numpy
    scalars become plain numbers."""
    if isinstance(value, bool):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    return json.dumps(json_safe(value), allow_nan=False, default=str, **kwargs)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Strict JSON, written to a temporary name and renamed into place."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(dumps(payload, indent=2) + "\n")
    tmp.replace(path)


def append_metrics(out_dir: Path, metrics: dict[str, Any], *, first: bool) -> None:
    """Append one epoch's line; the ``first`` line of a process drops lines of that epoch and later."""
    if first and isinstance(metrics.get("epoch"), int):
        keep_epochs_before(out_dir, metrics["epoch"])
    with open(out_dir / METRICS_FILE, "a") as fh:
        fh.write(dumps(metrics) + "\n")


def check_writable(path: Path, field: str) -> None:
    """Raise :class:`RunDirError` unless ``path`` is, or can be made, a folder this process writes.

    Tries a real write (a temporary file, removed at once) in ``path`` or its nearest existing
    parent: permission bits alone mislead on read-only mounts and for root.
    """
    if path.exists() and not path.is_dir():
        raise RunDirError(f"{field}: '{path}' is a file; expected a folder to write into")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise RunDirError(f"{field}: '{path}': '{existing}' is a file; expected a folder to write into")
    try:
        fd, probe = tempfile.mkstemp(prefix=".rrscale-write-test-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise RunDirError(f"{field}: '{path}': expected a writable folder ({exc.strerror or exc})") from None


class FolderBusy(RuntimeError):
    """Another process holds the folder's lock; ``holder`` is the pid it recorded ("?" if none)."""

    def __init__(self, holder: str) -> None:
        super().__init__(f"pid {holder}")
        self.holder = holder


@contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive, non-blocking ``flock`` on ``folder/.rrscale.lock`` for the ``with`` block
    (run directories and sweep folders); the file says ``pid N`` of the holder. The kernel drops
    the lock when the process dies, however it dies. :class:`FolderBusy` if another holds it."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        text = os.pread(fd, 64, 0).decode(errors="replace").strip()
        os.close(fd)
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            raise FolderBusy(text.removeprefix("pid").strip() or "?") from None
        raise
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


@contextmanager
def locked(out_dir: Path) -> Iterator[None]:
    """Hold the run directory's lock for the ``with`` block; :class:`RunDirError` if another has it."""
    with ExitStack() as held:
        try:
            held.enter_context(folder_lock(out_dir))
        except FolderBusy as exc:
            raise RunDirError(f"--out: '{out_dir}' is in use by another rrscale run (pid {exc.holder}); wait for "
                              f"it to end or choose another --out") from None
        except OSError as exc:
            raise RunDirError(f"--out: '{out_dir}': cannot lock the run directory ({exc.strerror})") from None
        yield


def prepare_resume(out_dir: Path, epoch: int) -> None:
    """Make ``out_dir`` consistent with a run that continues after ``epoch`` (0: from scratch).

    Call it holding the lock: removes the temporary files of killed checkpoint writes and the
    metrics lines of later epochs.
    """
    for tmp in stale_temp_files(out_dir):
        tmp.unlink(missing_ok=True)
    keep_epochs_before(out_dir, epoch + 1)


def keep_epochs_before(out_dir: Path, epoch: int) -> None:
    """Rewrite ``metrics.jsonl`` (atomically) with one line per epoch below ``epoch``, the last
    written of each; torn lines go too. No rewrite when nothing would change."""
    path = out_dir / METRICS_FILE
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    kept: dict[int, str] = {}
    for line in lines:
        try:
            at = int(json.loads(line)["epoch"])
        except (ValueError, TypeError, KeyError):
            continue  # a line torn by a kill, or not an epoch record
        if 1 <= at < epoch:
            kept[at] = line
    if list(kept.values()) == lines:
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept[e] + "\n" for e in sorted(kept)))
    tmp.replace(path)
