"""Shared fixtures of the Ray tests: an isolated environment per test, tiny synthetic sweeps.

Every test gets its own short ``RAY_TMPDIR`` (Unix socket paths must stay under 108 bytes),
its own dashboard port, a random Ray token in ``RAY_AUTH_TOKEN`` (so nothing is written to
``~/.ray``), MLflow in a sqlite file under ``tmp_path``, and no ``RAY_ADDRESS``. Afterwards Ray
is shut down and any process still running from *this test's* temp dir is ended by its pid.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

#: A training config that trains and probes in seconds on one CPU core.
TINY: dict[str, Any] = {
    "data": {"name": "synthetic", "synthetic_size": 200, "knn_subset": 200},
    "backbone": {"name": "conv4"},
    "method": {"name": "relational", "K": 2, "head_width": 32},
    "train": {"epochs": 2, "batch_size": 32, "progress": False, "knn_every": 1},
    "probe": {"epochs": 5, "knn_k": 20},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RayEnv:
    tmp: Path  # the test's tmp_path
    ray_tmp: Path  # RAY_TMPDIR (short)
    token: str
    dashboard_port: int
    mlflow_db: Path

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.mlflow_db}"

    def env(self, **extra: str) -> dict[str, str]:
        """The environment for a subprocess (``rrscale`` CLI, ``ray start``...)."""
        env = dict(os.environ)
        env.update(extra)
        paths = [str(REPO), *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]]
        env["PYTHONPATH"] = os.pathsep.join(paths)
        return env

    def session_dirs(self) -> list[Path]:
        root = self.ray_tmp / "ray"
        return sorted(root.glob("session_2*")) if root.exists() else []


def _our_pids(markers: list[str]) -> list[int]:
    """Pids of processes that hold one of ``markers`` (this test's own temp dirs or random Ray
    token, which no other process on the machine has) in their command line, environment,
    working directory or open files. Ray renames its processes and may overwrite their command
    line and environment with the title, so the open log files in the test's Ray temp dir and
    the working directory are what identify those."""
    needles = [m for m in markers if m]
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            blob = ((proc / "cmdline").read_bytes() + b"\0" + (proc / "environ").read_bytes()).decode(errors="replace")
            links = [os.readlink(proc / "cwd")]
            links += [os.readlink(fd) for fd in (proc / "fd").iterdir()]
        except OSError:
            continue
        if any(n in blob for n in needles) or any(link.startswith(n) for link in links for n in needles
                                                  if n.startswith("/")):
            pids.append(int(proc.name))
    return pids


def end_processes(*markers: str) -> None:
    """End (TERM, then KILL) the processes this test started, found by :func:`_our_pids`."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = _our_pids(list(markers))
        for pid in pids:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        if not pids:
            return
        if sig == signal.SIGTERM:
            deadline = time.time() + 10
            while time.time() < deadline and _our_pids(list(markers)):
                time.sleep(0.5)


@pytest.fixture
def ray_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[RayEnv]:
    ray_tmp = Path(tempfile.mkdtemp(prefix="rr", dir="/tmp"))
    env = RayEnv(tmp=tmp_path, ray_tmp=ray_tmp, token=secrets.token_hex(16), dashboard_port=free_port(),
                 mlflow_db=tmp_path / "mlflow.db")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(ray_tmp))
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", env.token)
    monkeypatch.setenv("RRSCALE_DASHBOARD_PORT", str(env.dashboard_port))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env.tracking_uri)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("RRSCALE_TUNE_VERBOSE", "0")
    monkeypatch.setenv("RAY_DEDUP_LOGS", "0")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    monkeypatch.chdir(tmp_path)
    try:
        yield env
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        end_processes(str(ray_tmp), str(tmp_path), f"RAY_AUTH_TOKEN={env.token}")
        shutil.rmtree(ray_tmp, ignore_errors=True)


def write_yaml(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def sweep_yaml(tmp: Path, name: str = "sweep", *, search: dict | None = None, tune: dict | None = None,
               **sections: Any) -> Path:
    """A sweep file under ``tmp``: TINY + sections, a small search, storage under ``tmp``."""
    data: dict[str, Any] = {k: dict(v) for k, v in TINY.items()}
    for key, value in sections.items():
        data.setdefault(key, {}).update(value)
    data["search"] = search if search is not None else {
        "method.K": {"choice": [2, 3]},
        "train.lr": {"loguniform": [3.0e-4, 3.0e-3]},
    }
    data["tune"] = {"name": name, "num_samples": 4, "metric": "probe_top1", "mode": "max",
                    "scheduler": "asha", "schedule_metric": "knn_top1", "grace_period": 1,
                    "reduction_factor": 2, "cpus_per_trial": 1, "seed": 0, "num_cpus": 2,
                    "storage_path": str(tmp / "ray_results"), "dashboard": True, **(tune or {})}
    data["mlflow"] = {"experiment": "rrscale-tests"}
    return write_yaml(tmp / f"{name}.yaml", data)


def run_cli(env: RayEnv, *args: str, timeout: float = 300, **extra_env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rrscale.cli", *args], cwd=env.tmp, env=env.env(**extra_env),
                          capture_output=True, text=True, timeout=timeout)


def mlflow_available() -> bool:
    return (REPO / "rrscale" / "tracking" / "mlflow.py").exists()


def sweep_runs(tracking_uri: str, experiment: str = "rrscale-tests") -> tuple[list[Any], list[Any]]:
    """(parent runs, child runs) of ``experiment`` in the MLflow store at ``tracking_uri``."""
    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return parents, children


def _results(trial_dir: Path) -> list[dict[str, Any]]:
    """The result.json lines Tune wrote for one trial."""
    import json

    path = trial_dir / "result.json"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
