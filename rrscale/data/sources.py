"""Every dataset rrscale trains on, as CPU tensors: uint8 NHWC images or float32 toy vectors.

The engine moves the uint8 images to the device once and augments them there, so this module
only has to find, decode and label the data, and never touches torch transforms.

Where data comes from: ``data.root``, else ``$RRSCALE_DATA_ROOT``, else a download folder
(``~/.cache/rrscale/data``). For the torchvision datasets a root (or its ``<name>/`` subfolder)
holding ``train*.parquet`` and ``test*.parquet`` shards wins over torchvision's own files, so
``rrscale data convert`` output and ``shared/data/cifar10-mini`` load under their real names and
keep their published normalisation. A root that is a ``.npz``/``.npy`` array file
(:mod:`rrscale.data.arrays`, readable without pyarrow) wins likewise, for every image dataset
name. Otherwise torchvision reads its files, downloading them when ``data.download`` allows. A
Parquet folder with ``unlabeled*.parquet`` shards, or an array file with ``x_unlabeled`` (an
STL-10 conversion), trains on those and probes on ``train``/``test``.

Choices worth knowing:

- cifar100-20 maps the 100 fine labels to the 20 super-classes with the fixed table
  :data:`CIFAR100_COARSE` (fine labels in alphabetical class order, as CIFAR-100 ships them).
  A Parquet split whose labels are all below 20 is taken to be coarse already.
- imagefolder reads ``root/{train,test}/<class>/<image>``; classes are the sorted folder names
  of ``train``; images whose size differs from the first one are resized (bilinear) to it.
  Everything is converted to RGB, so grayscale sets get 3 identical channels.
- Normalisation is the published one for CIFAR-10/100 and STL-10; for the others it is
  computed from the ``train`` images once and cached. Probe splits of another dataset
  (``data.probe_name``) carry that dataset's statistics.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.error import URLError

import numpy as np
import torch
from torchvision import datasets as tv

from rrscale.config import DATA_ROOT_ENV, DATASET_NAMES, DataConfig, resolve_data_root
from rrscale.data.arrays import array_splits, is_array_file, read_array_split
from rrscale.data.cache import cached_arrays, cached_json, hash_files
from rrscale.data.parquet import decode_images, read_parquet_split_keyed, split_files
from rrscale.data.synthetic import make_synthetic

Stats = tuple[tuple[float, ...], tuple[float, ...]]

DOWNLOAD_DIR = Path("~/.cache/rrscale/data")
SPLITS = ("train", "test", "unlabeled")
# CIFAR-100 fine label -> super-class (both in the dataset's alphabetical order), 5 fine per coarse.
CIFAR100_COARSE = np.array(
    [4, 1, 14, 8, 0, 6, 7, 7, 18, 3, 3, 14, 9, 18, 7, 11, 3, 9, 7, 11,
     6, 11, 5, 10, 7, 6, 13, 15, 3, 15, 0, 11, 1, 10, 12, 14, 16, 9, 11, 5,
     5, 19, 8, 8, 15, 13, 14, 17, 18, 10, 16, 4, 17, 4, 2, 0, 17, 4, 18, 17,
     10, 3, 2, 12, 12, 16, 12, 1, 9, 19, 2, 10, 0, 1, 16, 12, 9, 13, 15, 13,
     16, 19, 2, 4, 6, 19, 5, 5, 8, 19, 18, 1, 2, 15, 6, 0, 17, 8, 14, 13],
    dtype=np.int64,
)  # fmt: skip
_CIFAR100_STATS: Stats = ((0.507, 0.487, 0.441), (0.267, 0.256, 0.276))
FIXED_STATS: dict[str, Stats] = {
    "cifar10": ((0.491, 0.482, 0.447), (0.247, 0.243, 0.262)),
    "cifar100": _CIFAR100_STATS,
    "cifar100-20": _CIFAR100_STATS,
    "stl10": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}
_KNOWN_CLASSES = {"cifar10": 10, "cifar100": 100, "cifar100-20": 20, "stl10": 10, "svhn": 10, "synthetic": 10}
_PRETTY = {
    "cifar10": "CIFAR-10",
    "cifar100": "CIFAR-100",
    "cifar100-20": "CIFAR-100",
    "stl10": "STL-10",
    "svhn": "SVHN",
}
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}
_GENERATED = ("synthetic", "moons", "circles")
_DEFAULT_GENERATED_SIZE = 2000


class DataError(ValueError):
    """A user-facing data problem; ``str(err)`` is the one line to print."""


@dataclass
class Split:
    """One split: images ``(N, H, W, C)`` uint8 or vectors ``(N, D)`` float32, labels -1 if unknown."""

    x: torch.Tensor
    y: torch.Tensor
    num_classes: int
    name: str
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def is_image(self) -> bool:
        return self.x.dim() == 4


@dataclass
class DataBundle:
    """What one experiment needs: the SSL split and the labelled probe splits."""

    train: Split
    probe_train: Split
    probe_test: Split
    fingerprint: str


@dataclass
class _Raw:
    x: np.ndarray
    y: np.ndarray
    num_classes: int
    content: str  # sha256 identifying the data: source file contents or the generated arrays


@dataclass(frozen=True)
class _Source:
    name: str
    root: Path
    download: bool
    field: str  # the config key to name in error messages
    size: int = _DEFAULT_GENERATED_SIZE
    seed: int = 0


def _one_line(exc: BaseException, limit: int = 120) -> str:
    """The first line of an error, shortened; a failed download says why without urllib's wrapper."""
    lines = str(exc.reason if isinstance(exc, URLError) else exc).strip().splitlines()
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _array_hash(x: np.ndarray, y: np.ndarray) -> str:
    digest = hashlib.sha256(np.ascontiguousarray(x).data)
    digest.update(np.ascontiguousarray(y).data)
    return digest.hexdigest()


def _labels_to_classes(y: np.ndarray) -> int:
    return int(y.max()) + 1 if len(y) else 0


def _root_path(root: str) -> Path:
    return Path(root or DOWNLOAD_DIR).expanduser()


def _shard_dir(src: _Source) -> Path | None:
    """The folder holding this dataset's Parquet shards: the root itself or ``root/<name>``."""
    candidates = [src.root] if src.name == "parquet" else [src.root, src.root / src.name]
    for folder in candidates:
        if split_files(folder, "train") and split_files(folder, "test"):
            return folder
    return None


def _array_file(src: _Source) -> bool:
    return src.name not in _GENERATED and is_array_file(src.root)


def _ssl_split(src: _Source) -> str:
    """The split SSL trains on: STL-10's and any converted set's unlabelled images when present."""
    if _array_file(src):
        try:
            return "unlabeled" if "unlabeled" in array_splits(src.root) else "train"
        except (OSError, ValueError) as exc:
            raise DataError(f"{src.field}: cannot read '{src.root}': {_one_line(exc)}") from None
    if src.name == "stl10":
        return "unlabeled"
    shards = _shard_dir(src)
    return "unlabeled" if shards is not None and split_files(shards, "unlabeled") else "train"


def _coarse(y: np.ndarray) -> np.ndarray:
    return np.where(y >= 0, CIFAR100_COARSE[np.clip(y, 0, None)], y)


def _from_parquet(src: _Source, folder: Path, split: str) -> _Raw:
    try:
        x, y, content = read_parquet_split_keyed(folder, split)
    except FileNotFoundError:
        raise DataError(f"{src.field}: no '{split}*.parquet' shards in '{folder}'") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{src.field}: cannot read split '{split}' in '{folder}': {_one_line(exc, 240)}") from None
    if src.name == "cifar100-20" and len(y) and y.max() >= 20:
        _check_labels(src, folder, split, y, len(CIFAR100_COARSE))  # fine labels, mapped next
        y = _coarse(y)
    return _Raw(x, y, _KNOWN_CLASSES.get(src.name) or _labels_to_classes(y), content)


def _check_labels(src: _Source, where: Path, split: str, y: np.ndarray, num_classes: int) -> None:
    """Labels must be classes ``0..num_classes-1`` or -1 (unlabelled): anything else would be
    scored as a wrong answer, or crash the kNN after the first epoch."""
    if not len(y):
        return
    low, high = int(y.min()), int(y.max())
    if low < -1:
        raise DataError(f"{src.field}: split '{split}' in '{where}' has label {low}; expected classes "
                        f"0..{max(num_classes - 1, 0)}, or -1 for unlabelled images")
    if high >= num_classes:
        raise DataError(f"{src.field}: split '{split}' in '{where}' has label {high}, but {src.name} has "
                        f"{num_classes} classes (0..{num_classes - 1}); use data.name=parquet for other label sets")


def _from_arrays(src: _Source, split: str) -> _Raw:
    try:
        x, y = read_array_split(src.root, split)
        content = hash_files([src.root])
    except (OSError, ValueError) as exc:
        raise DataError(f"{src.field}: cannot read split '{split}' of '{src.root}': {_one_line(exc)}") from None
    if src.name == "cifar100-20" and len(y) and y.max() >= 20:
        _check_labels(src, src.root, split, y, len(CIFAR100_COARSE))  # fine labels, mapped next
        y = _coarse(y)
    return _Raw(x, y, _KNOWN_CLASSES.get(src.name) or _labels_to_classes(y), content)


def _tv_cifar(cls: type) -> Callable[[str, str, bool], tuple[np.ndarray, np.ndarray]]:
    def load(root: str, split: str, download: bool) -> tuple[np.ndarray, np.ndarray]:
        ds = cls(root, train=split == "train", download=download)
        return ds.data, np.asarray(ds.targets)

    return load


def _tv_channels_first(cls: type) -> Callable[[str, str, bool], tuple[np.ndarray, np.ndarray]]:
    """STL-10 and SVHN keep ``(N, C, H, W)``; rrscale stores NHWC like every other source."""

    def load(root: str, split: str, download: bool) -> tuple[np.ndarray, np.ndarray]:
        ds = cls(root, split=split, download=download)
        return ds.data.transpose(0, 2, 3, 1), np.asarray(ds.labels)

    return load


_TORCHVISION = {
    "cifar10": _tv_cifar(tv.CIFAR10),
    "cifar100": _tv_cifar(tv.CIFAR100),
    "cifar100-20": _tv_cifar(tv.CIFAR100),
    "stl10": _tv_channels_first(tv.STL10),
    "svhn": _tv_channels_first(tv.SVHN),
}


def _from_torchvision(src: _Source, split: str) -> _Raw:
    try:
        x, y = _TORCHVISION[src.name](str(src.root), split, src.download)
    except (RuntimeError, OSError, ValueError) as exc:
        why = f"download failed: {_one_line(exc)}" if src.download else "download disabled"
        hint = " (e.g. ../shared/data/cifar10-mini)" if src.name == "cifar10" else ""
        raise DataError(
            f"{src.field}: no {_PRETTY[src.name]} found at '{src.root}' ({why}); put the torchvision files "
            f"or Parquet shards there, or set {src.field}=... / {DATA_ROOT_ENV}=...{hint}"
        ) from None
    x = np.ascontiguousarray(x, dtype=np.uint8)
    y = y.astype(np.int64)
    if src.name == "cifar100-20":
        y = _coarse(y)
    return _Raw(x, y, _KNOWN_CLASSES[src.name], _array_hash(x, y))


def _folder_images(src: _Source, split: str) -> tuple[list[Path], list[int], int]:
    """Image files of one split, their labels, and the class count (the train folder's classes)."""
    train_dir, split_dir = src.root / "train", src.root / split
    classes = sorted(d.name for d in train_dir.iterdir() if d.is_dir()) if train_dir.is_dir() else []
    if not classes or not split_dir.is_dir():
        raise DataError(
            f"{src.field}: no image folder at '{src.root}': expected '{train_dir}/<class>/<image>' "
            f"and '{src.root / 'test'}/<class>/<image>'"
        )
    if len(classes) < 2:
        raise DataError(f"{src.field}: '{train_dir}' has one class folder ({classes[0]}); expected at least 2 "
                        f"(the linear probe and kNN score class labels)")
    unknown = sorted(d.name for d in split_dir.iterdir() if d.is_dir() and d.name not in classes)
    if unknown:
        raise DataError(f"{src.field}: '{split_dir}' has classes missing from train: {', '.join(unknown)}")
    files: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        folder = split_dir / name
        if not folder.is_dir():
            continue
        found = sorted(p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
        files += found
        labels += [label] * len(found)
    if not files:
        raise DataError(f"{src.field}: no images ({', '.join(sorted(_IMAGE_SUFFIXES))}) under '{split_dir}'")
    return files, labels, len(classes)


def _from_folder(src: _Source, split: str) -> _Raw:
    files, labels, classes = _folder_images(src, split)
    names = [f"{p.parent.name}/{p.name}" for p in files]
    content = hash_files(files, names)

    def decode() -> tuple[np.ndarray, np.ndarray]:
        x = decode_images([p.read_bytes() for p in files], resize=True, names=names)
        return x, np.asarray(labels, dtype=np.int64)

    try:
        x, y = cached_arrays(content, split, decode)
    except (OSError, ValueError) as exc:
        where = src.root / split
        raise DataError(f"{src.field}: cannot read an image under '{where}': {_one_line(exc)}") from None
    return _Raw(x, y, classes, content)


def _generated(src: _Source, split: str) -> _Raw:
    """Train and test are independent draws (streams 0 and 1) from the same seed."""
    stream = 0 if split == "train" else 1
    n = src.size if split == "train" else max(200, src.size // 5)
    if src.name == "synthetic":
        x, y = make_synthetic(n, src.seed, stream)
    else:
        from rrscale.data.toy import make_circles, make_moons

        x, y = (make_moons if src.name == "moons" else make_circles)(n, 2 * src.seed + stream)
    return _Raw(x, y, _KNOWN_CLASSES.get(src.name, 2), _array_hash(x, y))


def _read(src: _Source, split: str) -> _Raw:
    if split not in SPLITS:
        raise DataError(f"split: expected one of {', '.join(SPLITS)} (got '{split}')")
    arrays = _array_file(src)
    shards = None if arrays or src.name in _GENERATED or src.name == "imagefolder" else _shard_dir(src)
    if split == "unlabeled" and src.name != "stl10" and shards is None and not arrays:
        raise DataError(f"data.name: '{src.name}' has no unlabeled split")
    if src.name in _GENERATED:
        return _generated(src, split)
    if arrays or shards is not None:
        raw = _from_arrays(src, split) if arrays else _from_parquet(src, shards, split)
        _check_labels(src, src.root if arrays else shards, split, raw.y, raw.num_classes)
        return raw
    if src.name == "imagefolder":
        return _from_folder(src, split)
    if src.name == "parquet":
        raise DataError(
            f"{src.field}: no Parquet shards at '{src.root}': expected train*.parquet and test*.parquet "
            f"(columns image = PNG bytes, label) or a .npz array file, e.g. from 'rrscale data convert'"
        )
    return _from_torchvision(src, split)


def channel_stats(x: np.ndarray, chunk: int = 2048) -> Stats:
    """Per-channel mean and std of uint8 NHWC images in [0, 1], in chunks to bound memory."""
    channels = x.shape[-1]
    total = np.zeros(channels)
    squares = np.zeros(channels)
    for start in range(0, len(x), chunk):
        block = x[start : start + chunk].reshape(-1, channels).astype(np.float32) / 255
        total += block.sum(0, dtype=np.float64)
        squares += np.square(block).sum(0, dtype=np.float64)
    count = x.size / channels
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean**2, 0.0))
    return tuple(round(float(v), 4) for v in mean), tuple(round(float(v), 4) for v in std)


def _stats(src: _Source, train: _Raw) -> Stats:
    """Published values where they exist, else computed from ``train``.

    File-backed sets cache the result by content; generated sets are small and regenerated on
    every run anyway, so they compute it and leave nothing on disk.
    """
    if src.name in FIXED_STATS:
        return FIXED_STATS[src.name]
    if train.x.ndim != 4:
        return (), ()
    if src.name in _GENERATED:
        return channel_stats(train.x)
    record = cached_json(train.content, "stats", lambda: dict(zip(("mean", "std"), channel_stats(train.x))))
    return tuple(record["mean"]), tuple(record["std"])


def _split(src: _Source, split: str, raw: _Raw, num_classes: int, stats: Stats) -> Split:
    return Split(torch.from_numpy(raw.x), torch.from_numpy(raw.y), num_classes, f"{src.name}/{split}", *stats)


def _check_name(name: str, field: str) -> None:
    if name not in DATASET_NAMES:
        raise DataError(f"{field}: unknown dataset '{name}'; expected one of {', '.join(DATASET_NAMES)}")


def load_split(name: str, root: str, split: str, download: bool = True) -> Split:
    """One split of one dataset; ``root`` empty means the download folder.

    Generated sets (synthetic, moons, circles) use seed 0 and 2,000 train images here;
    :func:`load_data` sizes and seeds them from the config.
    """
    _check_name(name, "data.name")
    src = _Source(name, _root_path(root), download, "data.root")
    raw = _read(src, split)
    train = raw if split == "train" else _read(src, "train")
    return _split(src, split, raw, raw.num_classes, _stats(src, train))


def stratified_indices(y: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of a seeded subset keeping each label's share (unlabelled -1 is one stratum)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    rng = np.random.default_rng(seed)
    keep = []
    for label in np.unique(y):
        members = np.flatnonzero(y == label)
        take = max(1, round(fraction * len(members)))
        keep.append(rng.choice(members, size=take, replace=False))
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, dtype=np.int64)


def _subset(raw: _Raw, fraction: float, seed: int) -> _Raw:
    if fraction >= 1.0:
        return raw
    rows = stratified_indices(raw.y, fraction, seed)
    return _Raw(raw.x[rows], raw.y[rows], raw.num_classes, raw.content)


def _labelled(src: _Source, train: _Raw, stats: Stats) -> tuple[Split, Split, list[tuple[str, str]]]:
    """Probe train/test splits with one class count, plus their (name, content) for the fingerprint."""
    test = _read(src, "test")
    classes = max(train.num_classes, test.num_classes)
    if classes < 2 and (train.y >= 0).any():
        raise DataError(f"{src.field}: '{src.root}' has labels of one class; expected at least 2 classes "
                        f"(the linear probe and kNN score them), or -1 everywhere for unlabelled data")
    pair = _split(src, "train", train, classes, stats), _split(src, "test", test, classes, stats)
    return pair[0], pair[1], [(pair[0].name, train.content), (pair[1].name, test.content)]


def load_data(cfg: DataConfig, seed: int = 0) -> DataBundle:
    """Load the SSL split and the probe splits described by ``cfg``.

    ``seed`` drives the generated sets and the ``data.fraction`` subset. The fraction applies
    to the SSL split, and to the probe's train split when it is that same split; test splits
    stay whole. Statistics always come from the whole train split.
    """
    _check_name(cfg.name, "data.name")
    root = resolve_data_root(cfg)
    src = _Source(cfg.name, _root_path(root), cfg.download, "data.root", cfg.synthetic_size, seed)
    ssl_split = _ssl_split(src)
    ssl_full = _read(src, ssl_split)
    labelled_full = ssl_full if ssl_split == "train" else _read(src, "train")
    stats = _stats(src, labelled_full)
    ssl = _subset(ssl_full, cfg.fraction, seed)
    labelled = ssl if ssl_split == "train" else labelled_full
    if cfg.probe_name:
        _check_name(cfg.probe_name, "data.probe_name")
        field = "data.probe_root" if cfg.probe_root else "data.root"
        proot = _root_path(cfg.probe_root or root)
        psrc = _Source(cfg.probe_name, proot, cfg.download, field, cfg.synthetic_size, seed)
        ptrain = _read(psrc, "train")
        probe_train, probe_test, probe_sources = _labelled(psrc, ptrain, _stats(psrc, ptrain))
        train = _split(src, ssl_split, ssl, labelled.num_classes, stats)
    else:
        probe_train, probe_test, probe_sources = _labelled(src, labelled, stats)
        classes = probe_train.num_classes
        train = probe_train if ssl is labelled else _split(src, ssl_split, ssl, classes, stats)
    sources = [(train.name, ssl.content), *probe_sources]
    blob = json.dumps({"sources": sources, "fraction": cfg.fraction, "seed": seed}).encode()
    return DataBundle(train, probe_train, probe_test, hashlib.sha256(blob).hexdigest()[:12])
