"""Parquet image shards: the one on-disk format every rrscale dataset can be converted to.

Layout (the same as ``shared/data/cifar10``): column ``image`` holds PNG bytes, column
``label`` an integer class (-1 for unlabelled rows), zstd compression. A split is every file
matching ``{split}*.parquet`` in sorted order, so ``train.parquet`` and
``train-00000-of-00005.parquet`` ... are both one split. PNG keeps the pixels exact while
shrinking them, and a self-describing columnar file needs no pickle and no torchvision to read.

Decoding runs in a small thread pool: Pillow releases the GIL inside its decoder (2 threads:
2.9 s -> 2.1 s for 60,000 CIFAR images), and threads, unlike forked processes, are safe inside
Ray workers and after torch has started its own threads.

pyarrow is imported by the functions that read or write shards, not by this module: the data
sources import it, and a machine with only torch and numpy (the GPU suite's) must be able to
load generated data and array files without pyarrow.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, UnidentifiedImageError

from rrscale.data.arrays import is_array_file, write_arrays
from rrscale.data.cache import cached_arrays, file_sha256, hash_files

if TYPE_CHECKING:
    import pyarrow as pa

    from rrscale.config import DataConfig

IMAGE_COLUMN = "image"
LABEL_COLUMN = "label"
_THREADS = max(1, min(4, os.cpu_count() or 1))


def split_files(root: str | Path, split: str) -> list[Path]:
    return sorted(Path(root).glob(f"{split}*.parquet"))


def _threaded(n: int, work: Callable[[int, int], None]) -> None:
    """Run ``work(start, stop)`` over ``range(n)`` in one contiguous chunk per thread."""
    bounds = np.linspace(0, n, _THREADS + 1).astype(int)
    with ThreadPoolExecutor(_THREADS) as pool:
        list(pool.map(work, bounds[:-1], bounds[1:]))


def _rgb(blob: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(blob))
    return img if img.mode == "RGB" else img.convert("RGB")


def decode_images(
    blobs: Sequence[bytes], resize: bool = False, names: Sequence[str] | None = None
) -> np.ndarray:
    """Encoded images -> ``(N, H, W, 3)`` uint8, always RGB so every backbone sees 3 channels.

    ``(H, W)`` is the first image's size. Other sizes are an error, or with ``resize`` are
    resized to it (bilinear), which is what a folder of mixed-size photos needs. ``names``
    label the images in error messages (default: their index).
    """
    if not blobs:
        raise ValueError("no images to decode")

    def load(i: int) -> Image.Image:
        try:
            return _rgb(blobs[i])
        except (OSError, Image.DecompressionBombError) as exc:
            # Pillow's own text names the in-memory buffer (<_io.BytesIO object at 0x...>), not the file.
            why = "not an image format Pillow reads" if isinstance(exc, UnidentifiedImageError) else str(exc)
            raise ValueError(f"{names[i] if names else f'image {i}'}: {why}") from None

    width, height = load(0).size
    out = np.empty((len(blobs), height, width, 3), dtype=np.uint8)

    def work(start: int, stop: int) -> None:
        for i in range(start, stop):
            img = load(i)
            if img.size != (width, height):
                if not resize:
                    what = names[i] if names else f"image {i}"
                    raise ValueError(f"{what} is {img.size[0]}x{img.size[1]}, the first is {width}x{height}")
                img = img.resize((width, height), Image.Resampling.BILINEAR)
            out[i] = np.asarray(img)

    _threaded(len(blobs), work)
    return out


def _read_table(path: Path) -> pa.Table:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pq.read_schema(path)
    missing = [c for c in (IMAGE_COLUMN, LABEL_COLUMN) if c not in schema.names]
    if missing:
        raise ValueError(f"'{path}' has no column {', '.join(missing)} (columns: {', '.join(schema.names)})")
    image, label = schema.field(IMAGE_COLUMN).type, schema.field(LABEL_COLUMN).type
    if not (pa.types.is_binary(image) or pa.types.is_large_binary(image) or pa.types.is_fixed_size_binary(image)):
        raise ValueError(f"'{path}' column '{IMAGE_COLUMN}' is {image}; expected binary (encoded PNG/JPEG bytes)")
    if not pa.types.is_integer(label):
        raise ValueError(f"'{path}' column '{LABEL_COLUMN}' is {label}; expected integer classes (-1 = unlabelled)")
    return pq.read_table(path, columns=[IMAGE_COLUMN, LABEL_COLUMN])


def _decode_files(files: Sequence[Path]) -> tuple[np.ndarray, np.ndarray]:
    import pyarrow as pa

    with ThreadPoolExecutor(_THREADS) as pool:
        table = pa.concat_tables(list(pool.map(_read_table, files)), promote_options="permissive")
    labels = table.column(LABEL_COLUMN).fill_null(-1).to_numpy().astype(np.int64)
    return decode_images(table.column(IMAGE_COLUMN).to_pylist()), labels


def read_parquet_split_keyed(root: str | Path, split: str) -> tuple[np.ndarray, np.ndarray, str]:
    """:func:`read_parquet_split` plus the files' content hash, which identifies the data."""
    files = split_files(root, split)
    if not files:
        raise FileNotFoundError(f"no '{split}*.parquet' in '{root}'")
    content = hash_files(files)
    x, y = cached_arrays(content, split, lambda: _decode_files(files))
    return x, y, content


def read_parquet_split(root: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)``: uint8 ``(N, H, W, 3)`` images and int64 labels of one split.

    Decoded once per file content; later calls load the arrays from the decode cache.
    Raises ``FileNotFoundError`` when no file matches and ``ValueError`` for unreadable files.
    """
    x, y, _ = read_parquet_split_keyed(root, split)
    return x, y


def _encode_png(x: np.ndarray) -> list[bytes]:
    blobs: list[bytes] = [b""] * len(x)

    def work(start: int, stop: int) -> None:
        for i in range(start, stop):
            buf = io.BytesIO()
            Image.fromarray(x[i]).save(buf, format="PNG")
            blobs[i] = buf.getvalue()

    _threaded(len(x), work)
    return blobs


def _shard_names(split: str, count: int) -> list[str]:
    if count == 1:
        return [f"{split}.parquet"]
    return [f"{split}-{i:05d}-of-{count:05d}.parquet" for i in range(count)]


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Write next to ``path`` under a name no split glob matches, then rename into place."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_table(table: pa.Table, path: Path) -> None:
    import pyarrow.parquet as pq

    pq.write_table(table, path, compression="zstd", row_group_size=len(table))


def write_shards(x: np.ndarray, y: np.ndarray, dst: Path, split: str, shard_size: int = 10000) -> list[Path]:
    """Write one split as PNG + label shards and return their paths.

    One shard is named ``{split}.parquet``, several ``{split}-00000-of-0000N.parquet``. Other
    files already matching ``{split}*.parquet`` in ``dst`` would silently join the split on
    reading, so they are refused rather than mixed in.
    """
    if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != np.uint8:
        raise ValueError(f"write_shards needs uint8 (N, H, W, 3) images, got {x.dtype} {tuple(x.shape)}")
    if len(x) == 0 or len(x) != len(y):
        raise ValueError(f"write_shards needs as many labels as images (>0), got {len(x)} and {len(y)}")
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    dst = Path(dst)
    count = -(-len(x) // shard_size)
    paths = [dst / name for name in _shard_names(split, count)]
    stale = sorted(set(split_files(dst, split)) - set(paths))
    if stale:
        raise ValueError(
            f"'{dst}' already holds {', '.join(p.name for p in stale)}; remove them or choose another folder"
        )
    import pyarrow as pa

    dst.mkdir(parents=True, exist_ok=True)
    label_type = pa.int8() if -128 <= int(y.min()) and int(y.max()) <= 127 else pa.int32()
    for i, path in enumerate(paths):
        rows = slice(i * shard_size, (i + 1) * shard_size)
        table = pa.table(
            {
                IMAGE_COLUMN: pa.array(_encode_png(x[rows]), type=pa.binary()),
                LABEL_COLUMN: pa.array(np.asarray(y[rows]), type=label_type),
            }
        )
        _write_atomic(path, partial(_write_table, table))
    return paths


def convert(cfg: DataConfig, dst: str | Path, shard_size: int = 10000) -> list[Path]:
    """Write any image dataset as Parquet shards plus ``meta.json``, or as one ``.npz`` when
    ``dst`` ends in ``.npz`` (:mod:`rrscale.data.arrays`); return the files written.

    Splits: ``train`` and ``test`` (labelled), and ``unlabeled`` when the dataset trains on a
    separate unlabelled split (STL-10). ``data.fraction`` is honoured (seed 0), which makes a
    stratified mini copy; ``probe_name`` is ignored. ``meta.json`` (counts, classes, per-file
    sha256) comes last in the returned list.
    """
    # sources reads shards through this module, so it can only be imported at call time.
    from rrscale.data.sources import DataError, load_data

    dst = Path(dst)
    bundle = load_data(cfg.model_copy(update={"probe_name": None}), seed=0)
    if not bundle.train.is_image:
        raise DataError(f"data.name: '{cfg.name}' is a vector toy set; only image datasets convert")
    splits = {"train": bundle.probe_train, "test": bundle.probe_test}
    if bundle.train is not bundle.probe_train:
        splits = {"unlabeled": bundle.train, **splits}
    if is_array_file(dst):
        arrays = {split: (data.x.numpy(), data.y.numpy()) for split, data in splits.items()}
        try:
            return [write_arrays(dst, arrays, cfg.name)]
        except (OSError, ValueError) as exc:
            raise DataError(f"convert: cannot write '{dst}': {exc}") from None
    written: list[Path] = []
    counts: dict[str, dict[str, object]] = {}
    files: dict[str, dict[str, object]] = {}
    for split, data in splits.items():
        y = data.y.numpy()
        try:
            paths = write_shards(data.x.numpy(), y, dst, split, shard_size)
        except (OSError, ValueError) as exc:
            raise DataError(f"convert: cannot write '{dst}': {exc}") from None
        per_class = np.bincount(y[y >= 0], minlength=data.num_classes).tolist()
        counts[split] = {"rows": len(y), "per_class": per_class}
        for path in paths:
            size = path.stat().st_size
            files[path.name] = {"split": split, "sha256": file_sha256(path), "bytes": size}
        written += paths
    meta = {
        "name": cfg.name,
        "num_classes": bundle.probe_train.num_classes,
        "image_shape": list(bundle.train.x.shape[1:]),
        "fraction": cfg.fraction,
        "counts": counts,
        "files": files,
    }
    meta_path = dst / "meta.json"
    _write_atomic(meta_path, lambda tmp: tmp.write_text(json.dumps(meta, indent=1) + "\n"))
    return written + [meta_path]
