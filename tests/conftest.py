"""Test-wide environment: no telemetry, caches and stores under temporary folders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CIFAR10_MINI = SHARED_DATA / "cifar10-mini"
CIFAR10_FULL = SHARED_DATA / "cifar10"

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")
# Ray tests run trial processes beside pytest on 2 cores; OpenMP spin-waiting with 2 threads
# per process then slows small CPU kernels by 10-70x (measured), so every test process uses 1.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def _decode_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """One decode cache per test session, never the user's ~/.cache."""
    os.environ["RRSCALE_CACHE"] = str(tmp_path_factory.mktemp("rrscale-cache"))


@pytest.fixture
def cifar10_mini() -> Path:
    if not (CIFAR10_MINI / "train.parquet").exists():
        pytest.skip(f"{CIFAR10_MINI} not present")
    return CIFAR10_MINI
