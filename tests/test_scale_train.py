"""Ray Train (V2) around the one loop: DDP workers, summary parity with the local path,
worker failover from the last checkpoint, and divergence ending as "failed" without retries."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
import yaml

from rrscale.cli import main
from tests.scale_fixtures import TINY, RayEnv, _results, ray_env, sweep_yaml, write_yaml  # noqa: F401


def _tiny(tmp: Path, name: str = "exp", **sections: dict) -> Path:
    data = {k: dict(v) for k, v in TINY.items()}
    for key, value in sections.items():
        data.setdefault(key, {}).update(value)
    return write_yaml(tmp / f"{name}.yaml", data)


def _epochs(path: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.timeout(300, method="thread")
def test_two_workers_summary_matches_local_and_a_killed_worker_resumes(ray_env: RayEnv,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """``rrscale train --workers 2``; rank 1 dies (os._exit) at epoch 2 on the first attempt:
    Ray Train restarts the group from the last checkpoint and the run still trains 3 epochs."""
    cfg = _tiny(ray_env.tmp, train={"epochs": 3}, scaling={"max_failures": 2})
    marker = ray_env.tmp / "crashed.json"
    monkeypatch.setenv("RRSCALE_TEST_CRASH", f"rank=1,epoch=2,marker={marker}")
    out = ray_env.tmp / "ray_run"
    assert main(["train", str(cfg), "--workers", "2", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert json.loads(marker.read_text())["rank"] == 1  # the worker really died
    assert summary["status"] == "ok" and summary["epochs"] == 3 and summary["workers"] == 2
    assert [h["epoch"] for h in summary["history"]] == [1, 2, 3]
    assert all(0.0 <= h["online_probe_top1"] <= 1.0 for h in summary["history"])  # the probe under DDP
    seen = _epochs(out / "metrics.jsonl")
    assert seen == [1, 2, 3], seen  # resumed, not restarted; epochs redone after the restart replace their lines
    assert [w["rank"] for w in summary["worker_nodes"]] == [0, 1]
    assert (out / "checkpoint.pt").exists() and (out / "config.json").exists()
    assert 0.0 <= summary["probe_top1"] <= 1.0

    # same keys as the local path's summary.json (plus what only Ray knows)
    monkeypatch.delenv("RRSCALE_TEST_CRASH")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        local = ray_env.tmp / "local_run"
        assert main(["train", str(cfg), "--workers", "0", "--out", str(local)]) == 0
    finally:
        torch.set_num_threads(threads)
    local_keys = set(json.loads((local / "summary.json").read_text()))
    assert local_keys <= set(summary), local_keys - set(summary)
    assert set(summary) - local_keys <= {"worker_nodes", "ray_run"}


@pytest.mark.slow
@pytest.mark.timeout(300, method="thread")
def test_a_killed_worker_mid_trial_resumes_from_its_checkpoint(ray_env: RayEnv,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A 2-worker trial (a TorchTrainer inside the Tune trial): rank 0 dies at epoch 2."""
    marker = ray_env.tmp / "crashed.json"
    monkeypatch.setenv("RRSCALE_TEST_CRASH", f"rank=0,epoch=2,marker={marker}")
    path = sweep_yaml(ray_env.tmp, "trainer", search={"train.lr": {"loguniform": [5e-4, 2e-3]}},
                      train={"epochs": 3}, scaling={"num_workers": 2, "cpus_per_worker": 1, "max_failures": 2},
                      tune={"num_samples": 1, "scheduler": "none"})
    assert main(["tune", str(path)]) == 0
    assert marker.exists()
    sweep = ray_env.tmp / "ray_results" / "trainer"
    rows = json.loads((sweep / "sweep.json").read_text())["rows"]
    assert len(rows) == 1 and rows[0]["status"] == "finished" and rows[0]["epochs"] == 3
    results = _results(sweep / rows[0]["trial_id"])
    final = results[-1]
    assert final["final"] and final["epochs"] == 3 and len(final["worker_nodes"].split(",")) == 2
    epochs = [r["epoch"] for r in results if not r.get("final")]
    assert epochs.count(1) == 1 and epochs[-1] == 3, epochs  # epoch 1 came from the checkpoint
    # the Train run is named after the trial id, under the sweep's storage
    assert (sweep / "train" / rows[0]["trial_id"]).is_dir()


@pytest.mark.slow
@pytest.mark.timeout(300, method="thread")
def test_divergence_on_two_workers_ends_failed_without_retrying_forever(ray_env: RayEnv) -> None:
    gedi = {"name": "gedi", "clusters": 10, "projector_width": 32, "lambda_gen": 0.0, "divergence_limit": 1e-6}
    data = yaml.safe_load(_tiny(ray_env.tmp).read_text())
    data["method"] = gedi
    data["scaling"] = {"max_failures": 5}
    cfg = write_yaml(ray_env.tmp / "gedi.yaml", data)
    out = ray_env.tmp / "diverged"
    tic = time.time()
    assert main(["train", str(cfg), "--workers", "2", "--out", str(out)]) == 3
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed" and "diverged" in summary["error"]
    assert time.time() - tic < 200  # one restart to read the marker, not five retrained runs
    markers = list((out / "ray").glob("*/rrscale-failed.json"))
    assert len(markers) == 1
