"""The CLI surface: help that teaches, doctor, data convert."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from rrscale.cli import main


@pytest.mark.parametrize("cmd", [[], ["train"], ["probe"], ["tune"], ["runs"], ["data", "convert"], ["doctor"]])
def test_help_for_every_command(cmd: list[str]) -> None:
    res = subprocess.run([sys.executable, "-m", "rrscale.cli", *cmd, "--help"], capture_output=True, text=True)
    assert res.returncode == 0
    assert "usage: rrscale" in res.stdout


def test_train_help_teaches_data_location() -> None:
    res = subprocess.run([sys.executable, "-m", "rrscale.cli", "train", "--help"], capture_output=True, text=True)
    assert "RRSCALE_DATA_ROOT" in res.stdout and "--set" in res.stdout and "examples:" in res.stdout


def test_doctor_lists_versions(capsys) -> None:
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    for name in ("torch", "ray", "mlflow", "optuna", "RRSCALE_DATA_ROOT"):
        assert name in out


def test_data_convert_synthetic_round_trip(tmp_path: Path) -> None:
    from rrscale.data.parquet import read_parquet_split

    assert main(["data", "convert", "synthetic", str(tmp_path / "pq"), "--shard-size", "700"]) == 0
    x, y = read_parquet_split(tmp_path / "pq", "train")
    assert x.shape[1:] == (32, 32, 3) and len(x) == len(y) == 2000
    assert len(list((tmp_path / "pq").glob("train-*.parquet"))) == 3


def test_data_convert_bad_source_is_one_line(tmp_path: Path, capsys) -> None:
    assert main(["data", "convert", "imagenet:/x", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "data.name" in err
    assert not (tmp_path / "out").exists()
