"""Data sources: Parquet shards, the decode cache, the synthetic set, subsets and error lines."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rrscale.config import DataConfig
from rrscale.data import parquet
from rrscale.data.cache import file_sha256
from rrscale.data.parquet import convert, read_parquet_split, write_shards
from rrscale.data.sources import (
    CIFAR100_COARSE,
    DataError,
    channel_stats,
    load_data,
    load_split,
    stratified_indices,
)
from rrscale.data.synthetic import NUM_CLASSES, make_synthetic

CIFAR10_MINI = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-mini"


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("RRSCALE_CACHE", str(cache))
    monkeypatch.delenv("RRSCALE_DATA_ROOT", raising=False)
    return cache


def _images(n: int, seed: int = 0, side: int = 8) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, side, side, 3), dtype=np.uint8), rng.integers(0, 3, n).astype(np.int64)


def test_write_shards_round_trip(tmp_path: Path) -> None:
    x, y = _images(25)
    paths = write_shards(x, y, tmp_path, "train", shard_size=10)
    assert [p.name for p in paths] == [f"train-0000{i}-of-00003.parquet" for i in range(3)]
    got_x, got_y = read_parquet_split(tmp_path, "train")
    np.testing.assert_array_equal(got_x, x)
    np.testing.assert_array_equal(got_y, y)
    assert got_y.dtype == np.int64
    assert [p.name for p in write_shards(x[:5], y[:5], tmp_path, "test")] == ["test.parquet"]


def test_write_shards_refuses_stale_shards(tmp_path: Path) -> None:
    x, y = _images(6)
    write_shards(x, y, tmp_path, "train")
    with pytest.raises(ValueError, match="already holds train.parquet"):
        write_shards(x, y, tmp_path, "train", shard_size=2)


def test_convert_round_trip(tmp_path: Path) -> None:
    cfg = DataConfig(name="synthetic", synthetic_size=500)
    dst = tmp_path / "shards"
    written = convert(cfg, dst, shard_size=200)
    names = [p.name for p in written]
    assert names == [f"train-0000{i}-of-00003.parquet" for i in range(3)] + ["test.parquet", "meta.json"]
    meta = json.loads((dst / "meta.json").read_text())
    assert meta["num_classes"] == 10 and meta["counts"]["train"]["rows"] == 500
    assert meta["counts"]["test"]["rows"] == 200
    assert all(meta["files"][p.name]["sha256"] == file_sha256(p) for p in written[:-1])

    original = load_data(cfg, seed=0)
    back = load_data(DataConfig(name="parquet", root=str(dst)))
    for a, b in ((original.train, back.train), (original.probe_test, back.probe_test)):
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert back.train.num_classes == 10
    assert back.train.mean == original.train.mean


def test_convert_refuses_vectors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="vector"):
        convert(DataConfig(name="moons", synthetic_size=20), tmp_path)


def test_synthetic_is_deterministic_balanced_and_fast() -> None:
    x, y = make_synthetic(300, seed=3)
    x2, y2 = make_synthetic(300, seed=3)
    assert x.shape == (300, 32, 32, 3) and x.dtype == np.uint8 and y.dtype == np.int64
    assert np.array_equal(x, x2) and np.array_equal(y, y2)
    assert not np.array_equal(x, make_synthetic(300, seed=4)[0])
    assert not np.array_equal(x, make_synthetic(300, seed=3, stream=1)[0])
    assert np.bincount(y).tolist() == [30] * NUM_CLASSES
    start = time.perf_counter()
    make_synthetic(2000, seed=0)
    assert time.perf_counter() - start < 2.0  # ~0.15 s on 2 cores; slack for loaded CI machines


def test_synthetic_classes_are_not_linear_in_pixels() -> None:
    """A ridge classifier on raw pixels beats chance but stays far from solving the task."""
    x, y = make_synthetic(1000, seed=0)
    xt, yt = make_synthetic(400, seed=0, stream=1)

    def features(a: np.ndarray) -> np.ndarray:
        f = a.reshape(len(a), -1).astype(np.float64) / 255
        return np.c_[f - f.mean(1, keepdims=True), np.ones(len(a))]

    a = features(x)
    dual = np.linalg.solve(a @ a.T + 100.0 * np.eye(len(a)), np.eye(NUM_CLASSES)[y])
    accuracy = float(((features(xt) @ (a.T @ dual)).argmax(1) == yt).mean())
    assert 0.12 < accuracy < 0.6


def test_load_synthetic_bundle() -> None:
    cfg = DataConfig(name="synthetic", synthetic_size=100)
    data = load_data(cfg, seed=5)
    assert data.train.x.shape == (100, 32, 32, 3) and data.probe_test.x.shape == (200, 32, 32, 3)
    assert data.probe_train is data.train and data.train.is_image and data.train.num_classes == 10
    assert data.train.name == "synthetic/train"
    assert data.train.mean == channel_stats(data.train.x.numpy())[0]
    assert data.fingerprint == load_data(cfg, seed=5).fingerprint
    assert data.fingerprint != load_data(cfg, seed=6).fingerprint
    assert data.fingerprint != load_data(cfg.model_copy(update={"fraction": 0.5}), seed=5).fingerprint


def test_load_moons_bundle() -> None:
    data = load_data(DataConfig(name="moons", synthetic_size=50), seed=1)
    assert data.train.x.shape == (50, 2) and data.train.x.dtype == torch.float32
    assert data.probe_test.x.shape == (200, 2) and not data.train.is_image
    assert data.train.mean == () and data.probe_train is data.train and data.train.num_classes == 2


def test_decode_cache_hit_does_not_decode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    x, y = _images(12)
    write_shards(x, y, tmp_path / "a", "train", shard_size=5)
    read_parquet_split(tmp_path / "a", "train")

    def refuse(*args: object, **kwargs: object) -> np.ndarray:
        raise AssertionError("decoded again")

    monkeypatch.setattr(parquet, "decode_images", refuse)
    got_x, got_y = read_parquet_split(tmp_path / "a", "train")
    np.testing.assert_array_equal(got_x, x)
    np.testing.assert_array_equal(got_y, y)
    # A copy elsewhere hits the same entry (content, not path, is the key) ...
    write_shards(x, y, tmp_path / "b", "train", shard_size=5)
    np.testing.assert_array_equal(read_parquet_split(tmp_path / "b", "train")[0], x)
    # ... while different content misses it.
    write_shards(x[::-1].copy(), y, tmp_path / "c", "train", shard_size=5)
    with pytest.raises(AssertionError, match="decoded again"):
        read_parquet_split(tmp_path / "c", "train")


def test_decode_cache_survives_damage(tmp_path: Path, _own_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    x, y = _images(7)
    write_shards(x, y, tmp_path, "train")
    read_parquet_split(tmp_path, "train")
    (entry,) = [d for d in _own_cache.iterdir() if d.name.endswith("-train")]
    (entry / "x.npy").write_bytes((entry / "x.npy").read_bytes()[:100])
    np.testing.assert_array_equal(read_parquet_split(tmp_path, "train")[0], x)
    np.testing.assert_array_equal(read_parquet_split(tmp_path, "train")[0], x)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("RRSCALE_CACHE", str(blocker / "cache"))
    np.testing.assert_array_equal(read_parquet_split(tmp_path, "train")[0], x)


def test_stratified_fraction_keeps_proportions() -> None:
    y = np.repeat(np.arange(3), [100, 50, 20])
    rows = stratified_indices(y, 0.1, seed=0)
    assert np.bincount(y[rows]).tolist() == [10, 5, 2]
    assert np.array_equal(rows, stratified_indices(y, 0.1, seed=0))
    assert not np.array_equal(rows, stratified_indices(y, 0.1, seed=1))

    data = load_data(DataConfig(name="synthetic", synthetic_size=200, fraction=0.25), seed=0)
    assert np.bincount(data.train.y.numpy()).tolist() == [5] * 10
    assert data.probe_train is data.train and len(data.probe_test.y) == 200


def test_cifar10_mini_loads() -> None:
    if not (CIFAR10_MINI / "train.parquet").exists():
        pytest.skip(f"{CIFAR10_MINI} not present")
    data = load_data(DataConfig(name="cifar10", root=str(CIFAR10_MINI), download=False))
    assert data.train.x.shape == (5000, 32, 32, 3) and data.train.x.dtype == torch.uint8
    assert data.probe_test.x.shape == (1000, 32, 32, 3)
    assert sorted(data.train.y.unique().tolist()) == list(range(10))
    assert data.train.num_classes == 10 and data.train.mean == (0.491, 0.482, 0.447)


def test_missing_root_is_one_line(tmp_path: Path) -> None:
    cfg = DataConfig(name="cifar10", root=str(tmp_path / "nothing"), download=False)
    with pytest.raises(DataError) as err:
        load_data(cfg)
    message = str(err.value)
    assert "\n" not in message and "data.root" in message and "RRSCALE_DATA_ROOT" in message
    with pytest.raises(DataError, match="data.root"):
        load_data(DataConfig(name="parquet", root=str(tmp_path)))
    with pytest.raises(DataError, match="unlabeled"):
        load_split("svhn", str(tmp_path), "unlabeled", download=False)


def _png(path: Path, size: tuple[int, int], value: int, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode == "L" else (value, 255 - value, 7)).save(path)


def test_imagefolder(tmp_path: Path) -> None:
    for split, count in (("train", 3), ("test", 2)):
        for label, name in enumerate(("cat", "dog")):
            for i in range(count):
                _png(tmp_path / split / name / f"{i}.png", (8, 6), 40 * label + i)
    _png(tmp_path / "train" / "dog" / "big.png", (16, 12), 200)
    _png(tmp_path / "train" / "dog" / "gray.png", (8, 6), 90, mode="L")
    (tmp_path / "train" / "dog" / "notes.txt").write_text("not an image")
    data = load_data(DataConfig(name="imagefolder", root=str(tmp_path)))
    assert data.train.x.shape == (8, 6, 8, 3)
    assert data.train.y.tolist() == [0, 0, 0, 1, 1, 1, 1, 1]
    assert data.probe_test.y.tolist() == [0, 0, 1, 1] and data.train.num_classes == 2
    # dog files in sorted order: 0, 1, 2, big (resized to 8x6), gray (converted to RGB)
    assert data.train.x[6].reshape(-1, 3).unique(dim=0).tolist() == [[200, 55, 7]]
    assert data.train.x[7, 0, 0].tolist() == [90, 90, 90]
    assert len(data.train.mean) == 3


def test_cross_dataset_probe(tmp_path: Path) -> None:
    x, y = _images(30, seed=1)
    write_shards(x, y, tmp_path, "train")
    write_shards(x[:9], y[:9], tmp_path, "test")
    cfg = DataConfig(name="synthetic", synthetic_size=50, probe_name="parquet", probe_root=str(tmp_path))
    data = load_data(cfg, seed=0)
    assert data.train.name == "synthetic/train" and data.probe_train.name == "parquet/train"
    np.testing.assert_array_equal(data.probe_train.x.numpy(), x)
    assert data.probe_test.x.shape[0] == 9 and data.probe_train.num_classes == 3
    assert data.train.num_classes == 10
    assert data.fingerprint != load_data(cfg.model_copy(update={"probe_name": None}), seed=0).fingerprint
    with pytest.raises(DataError, match="data.probe_root"):
        load_data(cfg.model_copy(update={"probe_root": str(tmp_path / "nothing")}))


def test_cifar100_coarse_labels(tmp_path: Path) -> None:
    assert np.bincount(CIFAR100_COARSE).tolist() == [5] * 20
    x, _ = _images(100, side=4)
    fine = np.arange(100)
    write_shards(x, fine, tmp_path, "train")
    write_shards(x, fine, tmp_path, "test")
    data = load_data(DataConfig(name="cifar100-20", root=str(tmp_path)))
    assert data.train.y.tolist() == CIFAR100_COARSE.tolist() and data.train.num_classes == 20
    assert data.train.mean == (0.507, 0.487, 0.441)
