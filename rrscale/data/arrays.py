"""Array files: a whole image dataset in one ``.npz``, or unlabelled images in one ``.npy``.

Why a second on-disk format: Parquet needs pyarrow, and a bare GPU machine (Python, torch,
torchvision, numpy) has none; numpy reads these files everywhere. ``rrscale data convert
NAME:ROOT out.npz`` writes one, and a ``data.root`` (or ``benchmarks/gpu_suite.py --data``)
naming one loads it under any image dataset name, like a folder of Parquet shards.

Layout of a ``.npz``: ``x_<split>`` uint8 images ``(N, H, W, C)``, C in 1 or 3, and
``y_<split>`` integer labels (-1 = unlabelled; a missing ``y_<split>`` means all unlabelled),
for ``train`` and ``test`` (both required) and optionally ``unlabeled`` (an STL-10 conversion
trains on it), plus ``name``, the dataset it was made from. Written compressed (zlib), since
the file is often carried to another machine. A ``.npy`` is a single uint8 image array: the
images train unlabelled and also serve as the (unlabelled) test split, so nothing is scored.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

SUFFIXES = (".npz", ".npy")
REQUIRED_SPLITS = ("train", "test")


def is_array_file(path: str | Path) -> bool:
    """A ``.npz``/``.npy`` path, whether or not it exists yet."""
    return Path(path).suffix.lower() in SUFFIXES


def _check_images(x: np.ndarray, where: str) -> None:
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] not in (1, 3) or len(x) == 0:
        raise ValueError(f"{where}: expected uint8 images (N, H, W, C) with N > 0 and C in (1, 3), "
                         f"got {x.dtype} {tuple(x.shape)}")


def _check_labels(y: np.ndarray, n: int, where: str) -> None:
    if y.ndim != 1 or len(y) != n or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{where}: expected {n} integer labels, got {y.dtype} {tuple(y.shape)}")


def array_splits(path: str | Path) -> list[str]:
    """The splits a file holds (``.npy``: train and test, the same images)."""
    path = Path(path)
    if path.suffix.lower() == ".npy":
        return list(REQUIRED_SPLITS)
    with np.load(path, allow_pickle=False) as f:
        return [key[2:] for key in f.files if key.startswith("x_")]


def read_array_split(path: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` of one split: uint8 ``(N, H, W, C)`` images and int64 labels (-1 unlabelled).

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` (naming the file and the
    key) for a split the file lacks or arrays of the wrong type or shape.
    """
    path = Path(path)
    if path.suffix.lower() == ".npy":
        if split not in REQUIRED_SPLITS:
            raise ValueError(f"'{path}' holds only unlabelled images (no '{split}' split)")
        x = np.load(path, allow_pickle=False)
        _check_images(x, str(path))
        return x, np.full(len(x), -1, dtype=np.int64)
    with np.load(path, allow_pickle=False) as f:
        if f"x_{split}" not in f.files:
            keys = ", ".join(f.files) or "none"
            raise ValueError(f"'{path}' has no array 'x_{split}' (arrays: {keys})")
        x = f[f"x_{split}"]
        _check_images(x, f"'{path}' x_{split}")
        y = f[f"y_{split}"] if f"y_{split}" in f.files else np.full(len(x), -1, dtype=np.int64)
    _check_labels(y, len(x), f"'{path}' y_{split}")
    return x, y.astype(np.int64)


def dataset_name(path: str | Path) -> str:
    """The ``name`` a converted ``.npz`` records, or "" (``.npy`` files and hand-made arrays)."""
    path = Path(path)
    if path.suffix.lower() != ".npz":
        return ""
    with np.load(path, allow_pickle=False) as f:
        return str(f["name"]) if "name" in f.files else ""


def write_arrays(dst: str | Path, splits: Mapping[str, tuple[np.ndarray, np.ndarray]], name: str) -> Path:
    """Write ``{split: (x, y)}`` and ``name`` as one compressed ``.npz``, atomically; returns its path."""
    dst = Path(dst)
    if dst.suffix.lower() != ".npz":
        raise ValueError(f"'{dst}': a file holding labels and several splits must end in .npz")
    missing = [s for s in REQUIRED_SPLITS if s not in splits]
    if missing:
        raise ValueError(f"write_arrays needs the splits {', '.join(REQUIRED_SPLITS)} (missing {', '.join(missing)})")
    arrays: dict[str, np.ndarray] = {"name": np.array(name)}
    for split, (x, y) in splits.items():
        _check_images(x, f"split {split}")
        y = np.asarray(y)
        _check_labels(y, len(x), f"labels of split {split}")
        arrays[f"x_{split}"] = np.ascontiguousarray(x)
        arrays[f"y_{split}"] = y.astype(np.int64)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp")
    try:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return dst
