"""Array files (.npz/.npy): the data format a machine without pyarrow can read."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from rrscale.cli import main
from rrscale.config import DataConfig
from rrscale.data.arrays import dataset_name, read_array_split, write_arrays
from rrscale.data.parquet import convert
from rrscale.data.sources import FIXED_STATS, DataError, load_data


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RRSCALE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("RRSCALE_DATA_ROOT", raising=False)


def _split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8), rng.integers(0, 4, n)


def test_npz_round_trip_and_checks(tmp_path: Path) -> None:
    train, test = _split(30, 0), _split(10, 1)
    path = write_arrays(tmp_path / "set.npz", {"train": train, "test": test}, "cifar10")
    assert dataset_name(path) == "cifar10"
    x, y = read_array_split(path, "test")
    np.testing.assert_array_equal(x, test[0])
    np.testing.assert_array_equal(y, test[1])
    assert y.dtype == np.int64
    with pytest.raises(ValueError, match="no array 'x_unlabeled'.*x_train"):
        read_array_split(path, "unlabeled")
    with pytest.raises(ValueError, match="uint8"):
        write_arrays(tmp_path / "bad.npz", {"train": (train[0].astype(np.float32), train[1]), "test": test}, "x")
    with pytest.raises(ValueError, match="30 integer labels"):
        write_arrays(tmp_path / "bad.npz", {"train": (train[0], train[1][:5]), "test": test}, "x")
    with pytest.raises(ValueError, match="missing test"):
        write_arrays(tmp_path / "bad.npz", {"train": train}, "x")
    with pytest.raises(ValueError, match=r"end in \.npz"):
        write_arrays(tmp_path / "bad.npy", {"train": train, "test": test}, "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set.npz"]  # nothing half-written


def test_load_data_from_npz_and_npy(tmp_path: Path) -> None:
    train, test = _split(40, 0), _split(12, 1)
    path = write_arrays(tmp_path / "set.npz", {"train": train, "test": test}, "cifar10")
    named = load_data(DataConfig(name="cifar10", root=str(path)))
    assert torch.equal(named.train.x, torch.from_numpy(train[0])) and torch.equal(named.probe_test.y,
                                                                                 torch.from_numpy(test[1]))
    assert (named.train.mean, named.train.std) == FIXED_STATS["cifar10"] and named.train.num_classes == 10
    generic = load_data(DataConfig(name="parquet", root=str(path)))
    assert generic.train.num_classes == 4 and generic.train.mean != FIXED_STATS["cifar10"][0]
    assert generic.fingerprint == load_data(DataConfig(name="parquet", root=str(path))).fingerprint

    np.save(tmp_path / "images.npy", train[0])
    bare = load_data(DataConfig(name="parquet", root=str(tmp_path / "images.npy")))
    assert len(bare.train.x) == 40 and bool((bare.train.y == -1).all()) and len(bare.probe_test.x) == 40

    with pytest.raises(DataError, match="data.root: cannot read split 'train'.*expected uint8"):
        np.save(tmp_path / "floats.npy", train[0].astype(np.float32))
        load_data(DataConfig(name="parquet", root=str(tmp_path / "floats.npy")))
    with pytest.raises(DataError, match="data.root"):
        load_data(DataConfig(name="cifar10", root=str(tmp_path / "missing.npz")))


def test_convert_to_npz_matches_the_source(tmp_path: Path) -> None:
    cfg = DataConfig(name="synthetic", synthetic_size=300)
    [path] = convert(cfg, tmp_path / "synthetic.npz")
    original, back = load_data(cfg), load_data(DataConfig(name="parquet", root=str(path)))
    for a, b in ((original.train, back.train), (original.probe_test, back.probe_test)):
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert dataset_name(path) == "synthetic"


def test_cli_convert_npz_with_fraction_and_bad_input(tmp_path: Path, capsys) -> None:
    assert main(["data", "convert", "synthetic", str(tmp_path / "half.npz"), "--fraction", "0.5"]) == 0
    assert len(read_array_split(tmp_path / "half.npz", "train")[0]) == 1000  # of 2,000, stratified
    assert len(read_array_split(tmp_path / "half.npz", "test")[0]) == 400  # test stays whole
    capsys.readouterr()
    for argv, key in ((["synthetic", str(tmp_path / "x.npy")], "DST"),
                      (["synthetic", str(tmp_path / "y.npz"), "--fraction", "0"], "--fraction")):
        assert main(["data", "convert", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and key in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["half.npz"]
