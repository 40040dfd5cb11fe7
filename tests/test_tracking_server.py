"""The MLflow layer against a real ``mlflow server`` (HTTP, proxied artifacts) on 127.0.0.1.

The server takes ~15-20 s to start on a shared 2-core machine, hence ``slow``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from mlflow.tracking import MlflowClient  # noqa: E402

from rrscale.tracking import mlflow as trk  # noqa: E402
from rrscale.tracking import report as reports  # noqa: E402
from rrscale.tracking import runs  # noqa: E402
from tests.test_tracking import EPOCHS, RANKED, _table_lines, run_sweep  # noqa: E402
from tests.tracking_fixtures import mlflow_server  # noqa: E402,F401

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def test_sweep_through_the_server(mlflow_server: str, tmp_path: Path,  # noqa: F811
                                  monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    uri = mlflow_server
    assert uri.startswith("http://127.0.0.1:")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")  # a dead server fails the test fast
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    trk.forget_failures()

    info = run_sweep(tmp_path, uri, experiment="rr-server", sweep_name="server-sweep")
    parent = info["parent"]
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("rr-server")
    kids = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    assert sorted(r.info.run_name for r in kids) == sorted(RANKED)
    assert {r.info.status for r in kids} == {"FINISHED"}
    assert {r.data.tags["rrscale.status"] for r in kids} == {"finished", "stopped early"}
    best = next(r for r in kids if r.info.run_name == "trial_2")
    assert best.data.metrics["probe_top1"] == pytest.approx(0.61)
    assert best.data.params["method.K"] == "32"
    assert best.data.tags["rrscale.trial_id"] == "trial_2"
    assert len(client.get_metric_history(best.info.run_id, "epoch/loss")) == EPOCHS
    # artifacts go through the server's proxy (mlflow-artifacts:/), not a local path
    assert best.info.artifact_uri.startswith("mlflow-artifacts:")
    local = client.download_artifacts(best.info.run_id, "checkpoint/backbone.pt", str(tmp_path))
    assert Path(local).read_bytes() == b"weights" * 100
    assert "search.yaml" in [a.path for a in client.list_artifacts(parent)]

    # resume and idempotency through HTTP
    again = trk.start_sweep("rr-server", uri, "server-sweep", info["yaml"], info["base"], resume=True)
    assert again == parent
    assert trk.start_trial(parent, "trial_1", {}, {}) == info["trials"]["trial_1"]
    trk.end_trial(info["trials"]["trial_1"], {}, "FINISHED", None)

    # rrscale runs against the server, then the report and the sweep's end
    assert runs.main("rr-server", tracking_uri=uri, report=tmp_path / "r.html") == 0
    out = capsys.readouterr().out
    rows = [ln.split()[1] for ln in _table_lines(out)[3:] if ln.strip()[:1].isdigit()]
    assert rows == RANKED
    assert f"compare in MLflow: {uri}/#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning" in out
    trk.finish_sweep(parent, {"best_probe_top1": 0.61}, {"method": {"K": 32}}, [])
    assert reports.attach_report(parent, uri)[0] == "report.html"
    run = client.get_run(parent)
    assert run.info.status == "FINISHED" and run.data.tags["rrscale.status"] == "finished"
    names = {a.path for a in client.list_artifacts(parent)}
    assert {"report.html", "best_config.json", "plots"} <= names
