"""A real two-node Ray cluster on this machine (jobs/local_cluster.sh: a head and a second
node, each its own `ray start` with --num-cpus=1), a sweep submitted with `ray job submit --
rrscale tune ...` whose trial trains on 2 DDP workers: one lands on each node."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.scale_fixtures import REPO, RayEnv, _results, free_port, ray_env, sweep_yaml  # noqa: F401

SCRIPT = REPO / "jobs" / "local_cluster.sh"


_GCS_PORT = free_port()


def _script(env: RayEnv, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    extra = {"RRSCALE_CLUSTER_DIR": str(env.ray_tmp), "RRSCALE_GCS_PORT": str(_GCS_PORT),
             "RRSCALE_DASHBOARD_PORT": str(env.dashboard_port), "RAY": str(Path(sys.executable).parent / "ray")}
    return subprocess.run(["bash", str(SCRIPT), *args], env=env.env(**extra), cwd=env.tmp,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.timeout(420, method="thread")
def test_two_node_cluster_runs_the_two_workers_on_both_nodes(ray_env: RayEnv) -> None:
    started = _script(ray_env, "start")
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        status = _script(ray_env, "status")
        assert "2.0 CPU" in status.stdout or "0.0/2.0 CPU" in status.stdout, status.stdout[-2000:]
        storage = ray_env.tmp / "shared"  # one machine: a tmp path is storage both nodes see
        path = sweep_yaml(ray_env.tmp, "multinode", search={"train.lr": {"loguniform": [5e-4, 2e-3]}},
                          scaling={"num_workers": 2, "cpus_per_worker": 1},
                          tune={"num_samples": 1, "scheduler": "none", "storage_path": str(storage)})
        job = _script(ray_env, "submit", "--", sys.executable, "-m", "rrscale.cli", "tune", str(path),
                      timeout=360)
        assert job.returncode == 0, (job.stdout + job.stderr)[-4000:]
        assert "succeeded" in job.stdout + job.stderr
        sweep = storage / "multinode"
        rows = json.loads((sweep / "sweep.json").read_text())["rows"]
        assert len(rows) == 1 and rows[0]["status"] == "finished"
        final = _results(sweep / rows[0]["trial_id"])[-1]
        nodes = final["worker_nodes"].split(",")
        assert final["workers"] == 2 and len(nodes) == 2
        assert len(set(nodes)) == 2, nodes  # rank 0 and rank 1 ran on different raylets
        # the Train run of the trial (named after it) checkpointed into the shared storage
        assert list((sweep / "train" / rows[0]["trial_id"]).glob("checkpoint_*"))
    finally:
        stopped = _script(ray_env, "stop")
        assert stopped.returncode == 0, stopped.stderr
