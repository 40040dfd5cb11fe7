"""Decoded-array cache: decoding 60,000 PNGs takes seconds at every start, loading a ``.npy`` does not.

Entries are keyed by the sha256 of the *contents* of the source files (plus the split name),
never by paths or modification times: copying a dataset elsewhere keeps its cache entry, and
editing a file in place invalidates it. Every entry is written into a temporary folder that is
then renamed into place, so a crashed or concurrent writer (several Ray workers on one node)
can never leave a half-written entry behind that a reader would trust.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

CACHE_ENV = "RRSCALE_CACHE"
_DEFAULT_CACHE = Path("~/.cache/rrscale/decoded")
_CHUNK = 1 << 22

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """``$RRSCALE_CACHE`` if set, else ``~/.cache/rrscale/decoded``."""
    return Path(os.environ.get(CACHE_ENV) or _DEFAULT_CACHE).expanduser()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def hash_files(paths: Sequence[Path], names: Sequence[str] | None = None) -> str:
    """One digest for an ordered set of files.

    ``names`` joins the hash when a file's place carries meaning (an image folder's class
    directory is its label); otherwise only contents count.
    """
    digest = hashlib.sha256()
    for i, path in enumerate(paths):
        if names is not None:
            digest.update(names[i].encode() + b"\0")
        digest.update(bytes.fromhex(file_sha256(path)))
    return digest.hexdigest()


def _entry(content: str, split: str) -> Path:
    return cache_dir() / f"{content[:32]}-{split}"


def _publish(build_into: Callable[[Path], None], final: Path) -> None:
    """Fill a fresh temporary folder, then rename it to ``final``; losing a race is fine."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        build_into(tmp)
        os.replace(tmp, final)
    except OSError:
        if not final.exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _discard(final: Path) -> None:
    """Remove an unreadable entry (a truncated copy, a deleted file) so it can be rebuilt."""
    if final.exists():
        shutil.rmtree(final, ignore_errors=True)


def cached_arrays(
    content: str, split: str, build: Callable[[], tuple[np.ndarray, np.ndarray]]
) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` from the cache, or from ``build()`` which is then stored.

    An unwritable cache folder (a read-only home on a cluster node) only costs the speed-up,
    so it is logged rather than raised.
    """
    final = _entry(content, split)
    try:
        # Plain arrays only: an object array in a planted .npy would be a pickle.
        return np.load(final / "x.npy", allow_pickle=False), np.load(final / "y.npy", allow_pickle=False)
    except (OSError, ValueError, EOFError):
        _discard(final)
    x, y = build()

    def write(tmp: Path) -> None:
        np.save(tmp / "x.npy", x)
        np.save(tmp / "y.npy", y)

    try:
        _publish(write, final)
    except OSError as exc:
        log.warning("decode cache not written to %s: %s", final, exc)
    return x, y


def cached_json(content: str, split: str, build: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """A small JSON record (e.g. channel statistics) cached like :func:`cached_arrays`."""
    final = _entry(content, split)
    try:
        return json.loads((final / "record.json").read_text())
    except (OSError, ValueError):
        _discard(final)
    record = build()
    try:
        _publish(lambda tmp: (tmp / "record.json").write_text(json.dumps(record)), final)
    except OSError as exc:
        log.warning("decode cache not written to %s: %s", final, exc)
    return record
