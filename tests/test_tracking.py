"""The MLflow layer against a real sqlite store in a temp folder (nothing mocked)."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from rrscale.config import load_config, set_dotted  # noqa: E402
from rrscale.tracking import links  # noqa: E402
from rrscale.tracking import mlflow as trk  # noqa: E402
from rrscale.tracking import report as reports  # noqa: E402
from rrscale.tracking import runs, table  # noqa: E402
from rrscale.tracking.naming import sweep_params  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EXPERIMENT = "rr-test"

SEARCH_YAML = """\
data: {name: synthetic}
train: {epochs: 3}
search:
  method.K: {choice: [4, 8, 16, 32]}
  method.aggregation: {choice: [cat, sum, mean]}
  method.head_width: {choice: [64, 128, 256]}
  train.lr: {loguniform: [1.0e-4, 1.0e-2]}
tune: {metric: probe_top1, mode: max}
mlflow: {experiment: rr-test}
"""

# name, K, aggregation, head width, lr, probe_top1, train seconds, status
TRIALS = [
    ("trial_0", 8, "sum", 128, 1e-3, 0.40, 10.0, "FINISHED"),
    ("trial_1", 16, "cat", 256, 3e-3, 0.55, 20.0, "FINISHED"),
    ("trial_2", 32, "cat", 256, 1e-4, 0.61, 40.0, "TERMINATED"),  # Ray's word for FINISHED
    ("trial_3", 4, "mean", 64, 1e-2, 0.20, 5.0, "EARLY_STOPPED"),  # ASHA stopped it after epoch 1
]
RANKED = ["trial_2", "trial_1", "trial_0", "trial_3"]
EPOCHS = 3


def _search(uri: str, flt: str) -> Any:
    """``mlflow.search_runs`` (a DataFrame) reads the tracking URI from the environment."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        return mlflow.search_runs(experiment_names=[EXPERIMENT], filter_string=flt)


def _children(uri: str, parent: str) -> Any:
    return _search(uri, f"tags.mlflow.parentRunId = '{parent}'")


def run_sweep(root: Path, uri: str, experiment: str = EXPERIMENT,
              sweep_name: str = "sweep-a") -> dict[str, Any]:
    """What the Tune driver does: one parent, four trials with epochs, checkpoints and ends."""
    root.mkdir(parents=True, exist_ok=True)
    yaml_file = root / "search.yaml"
    yaml_file.write_text(SEARCH_YAML)
    cfg = load_config(yaml_file)
    base = cfg.model_dump(mode="json", exclude_none=True)
    space = {k: v.model_dump(mode="json", by_alias=True, exclude_defaults=True) for k, v in cfg.search.items()}
    parent = trk.start_sweep(experiment, uri, sweep_name, yaml_file, sweep_params(space, {"metric": "probe_top1"}),
                             resume=False, description="a test sweep")
    assert parent
    assert links.publish_comparison_view(parent, uri).endswith(f"viewStateShareKey=rrscale-{sweep_name}")
    trials = {}
    for name, k, agg, width, lr, probe, secs, status in TRIALS:
        trial_cfg = json.loads(json.dumps(base))
        trial_cfg.pop("search")
        for key, val in (("method.K", k), ("method.aggregation", agg), ("method.head_width", width),
                         ("train.lr", lr)):
            set_dotted(trial_cfg, key, val)
        trial_cfg["notes"] = "x" * 2000  # longer than MLflow's historical 500-character limit
        tags = {"rrscale.config_hash": f"hash-{name}", "rrscale.seed": 1,
                "rrscale.data_fingerprint": "fp-123", "rrscale.trial_id": name}
        run_id = trk.start_trial(parent, name, trial_cfg, tags)
        assert run_id
        stopped = status == "EARLY_STOPPED"
        for epoch in range(1, (1 if stopped else EPOCHS) + 1):
            metrics = {"loss": 1.0 / epoch, "knn_top1": probe * epoch / EPOCHS, "images_per_s": 900.0,
                       "note": "not a number", "done": False, "nested": {"a": 1}, "odd key$/../x": 1.0}
            trk.log_epoch(run_id, metrics, step=epoch)
        ckpt = root / f"ckpt-{name}"
        ckpt.mkdir()
        (ckpt / "backbone.pt").write_bytes(b"weights" * 100)
        summary = {"probe_top1": probe, "knn_top1": probe - 0.05, "nmi": probe / 2, "acc": probe * 0.9,
                   "images_per_s": 1000.0 / secs, "seconds": secs, "cpu_seconds": 2 * secs, "status": "ok",
                   "epochs": EPOCHS, "seed": 1, "gpu_seconds": 0.0, "device": "cpu", "history": [{"epoch": 1}]}
        if stopped:  # what the tracker ends a stopped trial with: costs and the epoch it reached
            summary = {"seconds": secs, "cpu_seconds": 2 * secs, "stopped_at_epoch": 1}
        trk.end_trial(run_id, summary, status, ckpt)
        trials[name] = run_id
    return {"parent": parent, "trials": trials, "yaml": yaml_file, "base": base}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("mlflow-store")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)  # anything written to the cwd by mistake stays in the temp folder
        mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.delenv("MLFLOW_RUN_ID", raising=False)
        uri = f"sqlite:///{root / 'mlflow.db'}"
        info = run_sweep(root, uri)
        exp_id = MlflowClient(uri).get_experiment_by_name(EXPERIMENT).experiment_id
        yield {"root": root, "uri": uri, "exp_id": exp_id, **info}


def test_resolve_tracking_uri(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert trk.resolve_tracking_uri("") == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://example:5000")
    assert trk.resolve_tracking_uri("") == "http://example:5000"
    assert trk.resolve_tracking_uri("sqlite:////x/y.db") == "sqlite:////x/y.db"
    assert trk.sqlite_path("sqlite:////x/y.db") == Path("/x/y.db")


def test_parent_and_nested_children(store: dict[str, Any]) -> None:
    uri, parent = store["uri"], store["parent"]
    kids = _children(uri, parent)
    assert len(kids) == 4
    assert sorted(kids["tags.mlflow.runName"]) == sorted(store["trials"])
    assert set(kids["tags.rrscale.trial_id"]) == set(store["trials"])
    assert set(kids["tags.rrscale.sweep"]) == {"sweep-a"}
    assert set(kids["tags.mlflow.source.name"]) == {"rrscale tune"} and all(kids["tags.mlflow.user"])
    parents = _search(uri, "tags.`rrscale.role` = 'sweep'")
    assert list(parents["run_id"]) == [parent]

    client = MlflowClient(uri)
    prun = client.get_run(parent)
    assert prun.info.run_name == "sweep-a"
    assert prun.data.tags["rrscale.sweep"] == "sweep-a"
    assert prun.data.tags["rrscale.version"]
    assert prun.data.tags["rrscale.git_sha"] and prun.data.tags["mlflow.user"]
    assert prun.data.tags["mlflow.note.content"] == "a test sweep"
    # the search space itself, not the base values no trial used
    assert prun.data.params["search.method.K"] == "choice[4, 8, 16, 32]"
    assert prun.data.params["search.train.lr"] == "loguniform[0.0001, 0.01]"
    assert prun.data.params["tune.metric"] == "probe_top1"
    assert "train.epochs" not in prun.data.params and "method.K" not in prun.data.params
    assert "search.yaml" in [a.path for a in client.list_artifacts(parent)]


def test_trial_params_metrics_artifacts_tags(store: dict[str, Any]) -> None:
    client = MlflowClient(store["uri"])
    statuses = {}
    for name, k, agg, width, lr, probe, secs, status in TRIALS:
        run = client.get_run(store["trials"][name])
        p, m, t = run.data.params, run.data.metrics, run.data.tags
        stopped = status == "EARLY_STOPPED"
        assert p["method.K"] == str(k) and p["method.aggregation"] == agg
        assert p["method.head_width"] == str(width) and float(p["train.lr"]) == lr
        assert p["data.name"] == "synthetic"
        assert len(p["notes"]) == trk.PARAM_VALUE_LIMIT and p["notes"].endswith("...")
        assert m["cost/cpu_seconds"] == pytest.approx(2 * secs) and m["cost/seconds"] == pytest.approx(secs)
        assert "gpu_seconds" not in str(m)  # no GPU, no GPU seconds
        assert "note" not in m and "done" not in m and "nested" not in m and "history" not in m
        assert "epoch" not in m and "epochs" not in m and "seed" not in m  # constants are not metrics
        assert m["epoch/odd key_/x"] == 1.0  # sanitised into a name MLflow accepts
        hist = client.get_metric_history(run.info.run_id, "epoch/loss")
        assert [h.step for h in sorted(hist, key=lambda h: h.step)] == ([1] if stopped else [1, 2, 3])
        # one value per epoch: the run's final kNN has its own name, no second point on the curve
        assert len(client.get_metric_history(run.info.run_id, "epoch/knn_top1")) == (1 if stopped else EPOCHS)
        if stopped:
            assert "probe_top1" not in m and "knn_top1" not in m
            assert t["rrscale.status"] == "stopped early" and t["rrscale.stopped_at_epoch"] == "1"
        else:
            assert m["probe_top1"] == pytest.approx(probe) and m["knn_top1"] == pytest.approx(probe - 0.05)
            assert [h.step for h in client.get_metric_history(run.info.run_id, "probe_top1")] == [0]
            assert m["cost/images_per_s"] == pytest.approx(1000.0 / secs) and "images_per_s" not in m
            assert t["rrscale.status"] == "finished" and t["rrscale.epochs"] == "3" and t["rrscale.device"] == "cpu"
        assert t["mlflow.parentRunId"] == store["parent"]
        assert t["rrscale.config_hash"] == f"hash-{name}" and t["rrscale.seed"] == "1"
        assert t["rrscale.data_fingerprint"] == "fp-123" and t["rrscale.git_sha"]
        arts = [a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")]
        assert arts == ["checkpoint/backbone.pt"]
        statuses[name] = run.info.status
    # ASHA's stop is not a crash: FINISHED, with the outcome in rrscale.status (as Ray's MLflow logger does)
    assert set(statuses.values()) == {"FINISHED"}


def test_dataset_inputs_and_descriptions(store: dict[str, Any]) -> None:
    client = MlflowClient(store["uri"])
    run_id = store["trials"]["trial_0"]
    trk.log_dataset(run_id, "synthetic", "fp-123", "generated", profile={"fraction": 1.0})
    trk.log_dataset(run_id, "synthetic", "fp-123", "generated")  # the same dataset again: one input
    inputs = client.get_run(run_id).inputs.dataset_inputs
    assert [(d.dataset.name, d.dataset.digest) for d in inputs] == [("synthetic", "fp-123")]
    assert {t.key: t.value for t in inputs[0].tags}["mlflow.data.context"] == "training"
    trk.set_tags(run_id, {"mlflow.note.content": "K=8 — finished"})
    assert client.get_run(run_id).data.tags["mlflow.note.content"] == "K=8 — finished"


def test_start_trial_is_idempotent(store: dict[str, Any]) -> None:
    uri, parent = store["uri"], store["parent"]
    first = store["trials"]["trial_0"]
    again = trk.start_trial(parent, "trial_0", {"method": {"K": 8}, "extra": 1},
                            {"rrscale.trial_id": "trial_0"})
    assert again == first
    assert len(_children(uri, parent)) == 4
    client = MlflowClient(uri)
    assert client.get_run(first).data.params["extra"] == "1"  # new params are added, old ones kept
    trk.end_trial(again, {}, "FINISHED", None)
    assert client.get_run(first).info.status == "FINISHED"


def test_resume_returns_the_same_parent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'resume.db'}"
    yaml_file = tmp_path / "s.yaml"
    yaml_file.write_text("train: {epochs: 1}\n")
    cfg = {"train": {"epochs": 1, "lr": 0.001}}
    first = trk.start_sweep("resume-exp", uri, "sw", yaml_file, cfg, resume=False)
    child = trk.start_trial(first, "t1", cfg, {})
    trk.finish_sweep(first, {}, {}, [], status="KILLED")  # the driver was interrupted
    client = MlflowClient(uri)
    assert client.get_run(first).info.status == "KILLED"
    again = trk.start_sweep("resume-exp", uri, "sw", yaml_file, {**cfg, "new": 2}, resume=True)
    assert again == first
    run = client.get_run(first)
    assert run.info.status == "RUNNING" and run.data.params["new"] == "2"
    assert trk.start_trial(again, "t1", cfg, {}) == child
    other = trk.start_sweep("resume-exp", uri, "other-sweep", yaml_file, cfg, resume=True)
    assert other and other != first
    # no resume: a fresh parent even with the same sweep name
    assert trk.start_sweep("resume-exp", uri, "sw", yaml_file, cfg, resume=False) not in ("", first)
    assert all(r.info.artifact_uri.startswith((tmp_path / "mlartifacts").as_uri())
               for r in client.search_runs([run.info.experiment_id]))
    assert not (tmp_path / "mlruns").exists()


def test_empty_ids_do_nothing() -> None:
    assert trk.start_trial("", "t", {}, {}) == ""
    trk.log_epoch("", {"x": 1.0}, 1)
    trk.end_trial("", {"probe_top1": 1.0}, "FINISHED", None)
    trk.finish_sweep("", {}, {}, [])


def test_tracking_failures_do_not_raise(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    caplog.set_level(logging.WARNING, logger="rrscale.tracking")
    dead = "http://127.0.0.1:1"
    tic = time.monotonic()
    assert trk.start_sweep("x", dead, "s", tmp_path / "missing.yaml", {"a": 1}, resume=True) == ""
    # run ids known to be on a dead server: every call returns quietly
    trk.log_epoch("0123abcd", {"loss": 1.0}, 1, tracking_uri=dead)
    trk.end_trial("0123abcd", {"probe_top1": 0.5}, "FINISHED", tmp_path, tracking_uri=dead)
    trk.finish_sweep("0123abcd", {"best": 1.0}, {"a": 1}, [tmp_path / "nope.html"], tracking_uri=dead)
    assert trk.start_trial("0123abcd", "t", {"a": 1}, {}, tracking_uri=dead) == ""
    assert time.monotonic() - tic < 30
    assert [r.getMessage() for r in caplog.records if dead in r.getMessage() and "unreachable" in r.getMessage()]
    # a store that cannot be created, and a run id that does not exist in a working store
    (tmp_path / "a-file").write_text("not a folder")
    bad_sqlite = f"sqlite:///{tmp_path / 'a-file' / 'x.db'}"
    assert trk.start_sweep("x", bad_sqlite, "s", tmp_path / "missing.yaml", {}, resume=False) == ""
    good = f"sqlite:///{tmp_path / 'ok.db'}"
    # a server that does not answer is marked down: later calls are skipped at once, silently
    caplog.clear()
    assert trk.start_sweep("x", dead, "s", tmp_path / "missing.yaml", {}, resume=False) == ""
    assert len([r for r in caplog.records if "unreachable" in r.getMessage()]) == 1
    caplog.clear()
    trk.log_epoch("0123abcd", {"loss": 1.0}, 2, tracking_uri=dead)
    trk.end_trial("0123abcd", {"probe_top1": 0.5}, "FINISHED", None, tracking_uri=dead)
    assert not caplog.records
    trk.forget_failures()
    assert trk.start_trial("f" * 32, "t", {}, {}, tracking_uri=good) == ""
    trk.end_trial("f" * 32, {"probe_top1": 1.0}, "weird-status", None, tracking_uri=good)


def _table_lines(out: str) -> list[str]:
    """The ranked table of ``rrscale runs``' output (after the list of sweeps)."""
    lines = out.splitlines()
    return lines[next(i for i, ln in enumerate(lines) if "ranked by" in ln):]


def test_runs_table_ranked_best_first(store: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    assert runs.main(EXPERIMENT, tracking_uri=store["uri"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"experiment '{EXPERIMENT}': 1 sweep(s), latest first"
    lines = _table_lines(out)
    assert "ranked by probe_top1 (max)" in lines[0]
    header = lines[1].split()
    for col in ("K", "aggregation", "head_width", "lr", "probe_top1", "knn_top1", "epochs", "status"):
        assert col in header
    assert "data.name" not in out and "notes" not in header  # constant params are not columns
    rows = [ln for ln in lines[3:] if ln.strip() and ln.split()[0].isdigit()]
    assert [r.split()[1] for r in rows] == RANKED
    assert rows[0].split()[0] == "1" and "0.6100" in rows[0] and rows[-1].endswith("1  stopped early")
    assert f"#/experiments/{store['exp_id']}/runs?workflowType=machine_learning&viewStateShareKey=rrscale-sweep-a" in out
    assert f"mlflow ui --backend-store-uri {store['uri']}" in out
    view = json.loads(MlflowClient(store["uri"]).get_experiment(store["exp_id"]).tags[
        "mlflow.sharedViewState.rrscale-sweep-a"])
    assert view["columnOrder"][1] == "metrics.`probe_top1`" and "params.`method.K`" in view["selectedColumns"]
    # --top, the default experiment (the latest sweep) and the rich table on a terminal
    assert runs.main(None, tracking_uri=store["uri"], top=2) == 0
    out = capsys.readouterr().out
    assert "top 2 of 4" in out and "trial_0" not in out


def test_runs_rich_table_on_a_tty(store: dict[str, Any], capsys: pytest.CaptureFixture[str],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(table, "use_rich", lambda: True)
    monkeypatch.setenv("COLUMNS", "200")
    assert runs.main(EXPERIMENT, tracking_uri=store["uri"]) == 0
    out = capsys.readouterr().out
    pos = [out.index(name) for name in RANKED]
    assert pos == sorted(pos)


def test_runs_lists_every_sweep_and_picks_one(store: dict[str, Any], tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    uri = f"sqlite:///{tmp_path / 'two.db'}"
    first = run_sweep(tmp_path / "a", uri, experiment="two", sweep_name="older")
    second = run_sweep(tmp_path / "b", uri, experiment="two", sweep_name="newer")
    trk.finish_sweep(first["parent"], {}, {}, [], status="FINISHED")
    assert runs.main("two", tracking_uri=uri) == 0
    out = capsys.readouterr().out
    listed = out.splitlines()[:5]
    assert listed[0] == "experiment 'two': 2 sweep(s), latest first"
    assert listed[3].split()[:2] == ["*", "newer"] and listed[4].split()[0] == "older"
    assert "running" in listed[3] and "finished" in listed[4].split()[3]
    for line in listed[3:5]:
        assert "4 (3 finished, 1 stopped early)" in line and "probe_top1 0.6100 (trial_2)" in line
    assert "sweep 'newer'" in out
    assert runs.main("two", tracking_uri=uri, sweep="older") == 0
    out = capsys.readouterr().out
    assert "sweep 'older'" in out and out.splitlines()[4].split()[:2] == ["*", "older"]
    assert runs.main("two", tracking_uri=uri, sweep="nope") == 2
    err = capsys.readouterr().err
    assert "no sweep named 'nope'" in err and "known: newer, older" in err
    # a sweep whose driver died: its trials still RUNNING in MLflow read "interrupted"
    cut = trk.start_trial(second["parent"], "trial_9", {"method": {"K": 2}}, {})
    trk.finish_sweep(second["parent"], {}, {}, [], status="KILLED")
    assert runs.main("two", tracking_uri=uri, sweep="newer") == 0
    out = capsys.readouterr().out
    assert cut and "1 interrupted" in out.splitlines()[3]
    assert any(ln.split()[1] == "trial_9" and ln.endswith("interrupted") for ln in _table_lines(out)[3:] if ln.strip())


def test_runs_plots_and_report(store: dict[str, Any], tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    plots, report = tmp_path / "plots", tmp_path / "out" / "sweep.html"
    assert runs.main(EXPERIMENT, tracking_uri=store["uri"], plots=plots, report=report) == 0
    out = capsys.readouterr().out
    names = sorted(p.name for p in plots.iterdir())
    assert names == ["curves.png", "pareto.png", "score_vs_K.png", "score_vs_aggregation.png",
                     "score_vs_head_width.png", "score_vs_lr.png"]
    for p in plots.iterdir():
        data = p.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000, p
    text = report.read_text()
    assert text.startswith("<!doctype html>") and "<table class=\"trials\">" in text
    assert text.count("data:image/png;base64,") == 6
    assert all(name in text for name in RANKED)
    pos = [text.index(f">{name}<") for name in RANKED]
    assert pos == sorted(pos)
    assert "sweep-a" in text and store["parent"] in text and "best config" in text
    # every trial links to its MLflow run; the sweep to the comparison view
    for name, run_id in store["trials"].items():
        assert f'/#/experiments/{store["exp_id"]}/runs/{run_id}"' in text
    assert "viewStateShareKey=rrscale-sweep-a" in text and "stopped early" in text
    assert "no Optuna study recorded" in text  # this hand-made sweep has none
    assert "attached to MLflow run" in out
    client = MlflowClient(store["uri"])
    assert "report.html" in [a.path for a in client.list_artifacts(store["parent"])]
    with open(client.download_artifacts(store["parent"], "report.html", str(tmp_path))) as f:
        assert f.read() == text


def test_attach_report_and_finish_sweep(store: dict[str, Any], tmp_path: Path) -> None:
    uri, parent = store["uri"], store["parent"]
    best = MlflowClient(uri).get_run(store["trials"]["trial_2"]).data.params
    best_cfg = {"method": {"K": 32, "aggregation": "cat"}, "train": {"lr": float(best["train.lr"])}}
    trk.finish_sweep(parent, {"best_probe_top1": 0.61, "trials": 4, "best_trial": "trial_2"}, best_cfg, [])
    attached = reports.attach_report(parent, uri)
    assert attached[0] == "report.html" and "plots/curves.png" in attached
    client = MlflowClient(uri)
    run = client.get_run(parent)
    assert run.info.status == "FINISHED" and run.data.tags["rrscale.status"] == "finished"
    assert run.data.metrics["best_probe_top1"] == pytest.approx(0.61)
    assert run.data.tags["summary.best_trial"] == "trial_2"
    assert not [k for k in run.data.params if k.startswith("best.")]  # best_config.json holds it
    top = {a.path for a in client.list_artifacts(parent)}
    assert {"best_config.json", "report.html", "search.yaml", "plots"} <= top
    assert {"plots/pareto.png", "plots/curves.png"} <= {a.path for a in client.list_artifacts(parent, "plots")}
    # the report written after the fact shows the logged best config and the parent's status
    report = tmp_path / "after.html"
    assert runs.main(EXPERIMENT, tracking_uri=uri, report=report) == 0
    text = report.read_text()
    assert "best_config.json of the sweep run" in text and "finished" in text
    assert reports.attach_report("f" * 32, uri) == []  # an unknown run: a warning, no exception


def test_unknown_experiment_exit_2(store: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    assert runs.main("nope", tracking_uri=store["uri"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "unknown MLflow experiment 'nope'" in err and EXPERIMENT in err and "Default" in err


def test_no_runs_is_a_friendly_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert runs.main(None) == 0  # default store ./mlflow.db does not exist: not created either
    assert "no MLflow runs yet" in capsys.readouterr().out
    assert not (tmp_path / "mlflow.db").exists()
    assert runs.main("anything") == 2
    uri = f"sqlite:///{tmp_path / 'empty.db'}"
    MlflowClient(uri).create_experiment("empty", artifact_location=(tmp_path / "a").as_uri())
    assert runs.main("empty", tracking_uri=uri) == 0
    assert "no trial runs yet" in capsys.readouterr().out
    assert runs.main(None, tracking_uri=uri) == 0
    assert "no MLflow runs yet" in capsys.readouterr().out
