"""rrscale tune: bad input refused before anything starts, real sweeps on a local Ray, resume,
ASHA, divergence, and the dashboard's token. Real Ray, Optuna and MLflow; no mocks."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml

from rrscale.cli import main
from rrscale.tracking.naming import short_number
from tests.scale_fixtures import (
    TINY,
    RayEnv,
    _results,
    mlflow_available,
    ray_env,  # noqa: F401  (fixture)
    run_cli,
    sweep_runs,
    sweep_yaml,
    write_yaml,
)

# ----------------------------------------------------------------------------- bad input


def _bad(tmp: Path, patch: dict[str, Any]) -> Path:
    data: dict[str, Any] = yaml.safe_load(sweep_yaml(tmp, "bad").read_text())
    for section, value in patch.items():
        if value is None:
            data.pop(section, None)
        elif isinstance(value, dict) and isinstance(data.get(section), dict) and section != "search":
            data[section].update(value)
        else:
            data[section] = value
    return write_yaml(tmp / "bad.yaml", data)


BAD = [
    ({"search": {}}, "search: expected at least one axis"),
    ({"search": None}, "search: expected at least one axis"),
    ({"search": {"method.K": {"choice": [1, 2]}}}, "search.method.K: value 1 is invalid"),
    ({"search": {"train.lr": {"loguniform": [0, 1e-3]}}}, "search.train.lr"),
    ({"search": {"method.K": {"uniform": [8, 2]}}}, "search.method.K"),
    ({"search": {"method.K": {"choice": [[2], [4]]}}}, "search.method.K: value [2] is invalid"),
    ({"search": {"tune.num_samples": {"choice": [1, 2]}}}, "search.tune.num_samples: expected a dotted training key"),
    ({"search": {"method.nonsense": {"choice": [1, 2]}}}, "search.method.nonsense"),
    ({"tune": {"metric": "accuracy"}}, "tune.metric: expected one of"),
    ({"tune": {"metric": "nmi"}}, "tune.metric: expected one of"),  # a GEDI metric in an RR sweep
    ({"tune": {"mode": "min"}}, "tune.mode: expected 'max' for tune.metric probe_top1"),
    ({"tune": {"schedule_metric": "probe_top1"}}, "tune.schedule_metric: expected a metric reported every epoch"),
    ({"tune": {"num_samples": 0}}, "tune.num_samples"),
    ({"tune": {"max_concurrent_trials": 5}}, "tune.max_concurrent_trials: expected at most 2"),
    ({"tune": {"cpus_per_trial": 3}}, "tune.cpus_per_trial: expected at most 2"),
    ({"tune": {"gpus_per_trial": 0.25}}, "tune.gpus_per_trial: expected 0: no CUDA GPU"),
    ({"tune": {"grace_period": 2}}, "tune.grace_period: expected fewer than train.epochs"),
    ({"tune": {"reduction_factor": 1}}, "tune.reduction_factor"),
    ({"tune": {"name": "a/b"}}, "tune.name: expected letters"),
    ({"tune": {"schedulr": "asha"}}, "tune.schedulr: unknown key"),
    ({"scaling": {"use_gpu": True}}, "scaling.use_gpu: expected false"),
    ({"scaling": {"num_workers": 2, "cpus_per_worker": 2}}, "scaling.cpus_per_worker: expected num_workers x"),
    ({"scaling": {"num_workers": -1}}, "scaling.num_workers"),
    ({"scaling": {"max_failures": "many"}}, "scaling.max_failures"),
    ({"train": {"knn_every": 2, "epochs": 2, "batch_size": 32, "progress": False}}, "train.knn_every: expected 1"),
    ({"probe": {"epochs": 0}}, "probe.epochs: expected at least 1"),
]


@pytest.mark.timeout(60, method="thread")
@pytest.mark.parametrize(("patch", "expected"), BAD, ids=[e.split(":")[0] + f"-{i}" for i, (_, e) in enumerate(BAD)])
def test_bad_sweep_file_is_one_line_exit_2_and_starts_nothing(
    ray_env: RayEnv, capsys: pytest.CaptureFixture[str], patch: dict, expected: str
) -> None:
    import ray

    path = _bad(ray_env.tmp, patch)
    rc = main(["tune", str(path)])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"rrscale: error: {path}") and expected in err, err
    assert not ray.is_initialized()
    assert ray_env.session_dirs() == []
    assert not ray_env.mlflow_db.exists() and not (ray_env.tmp / "mlflow.db").exists()
    assert not (ray_env.tmp / "ray_results").exists()


@pytest.mark.timeout(120, method="thread")
def test_bad_input_through_the_real_cli(ray_env: RayEnv) -> None:
    """The installed entry point, not just main(): exit 2, one stderr line, nothing started."""
    bad = _bad(ray_env.tmp, {"tune": {"metric": "accuracy"}})
    for args in (["tune", str(bad)], ["tune", str(sweep_yaml(ray_env.tmp, "never_ran")), "--resume"],
                 ["tune", str(bad), "--set", "tune.metric=probe_top1", "--set", "search.method.K.choice=[1]"]):
        proc = run_cli(ray_env, *args, timeout=100)
        assert proc.returncode == 2, (args, proc.stderr[-2000:])
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("rrscale: error: "), proc.stderr[-2000:]
    assert ray_env.session_dirs() == []
    assert not ray_env.mlflow_db.exists() and not (ray_env.tmp / "mlflow.db").exists()


def test_shipped_search_spaces_pass_check_tune_config() -> None:
    from rrscale.config import load_config
    from rrscale.scale.tune import check_tune_config

    root = Path(__file__).resolve().parents[1] / "search_spaces"
    for name in ("cifar.yaml", "cifar100.yaml", "quickstart.yaml"):
        check_tune_config(load_config(root / name), root / name)


# ----------------------------------------------------------------------------- sweeps


def _sweep_dir(env: RayEnv, name: str) -> Path:
    return env.tmp / "ray_results" / name


def _rows(env: RayEnv, name: str) -> list[dict[str, Any]]:
    return json.loads((_sweep_dir(env, name) / "sweep.json").read_text())["rows"]


def _study(env: RayEnv, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{_sweep_dir(env, name) / 'optuna.db'}")


@pytest.mark.timeout(300, method="thread")
def test_four_trial_sweep_optuna_proposes_and_every_trial_reports_probe_top1(ray_env: RayEnv) -> None:
    path = sweep_yaml(ray_env.tmp, "four", tune={"scheduler": "none"},
                      search={"method.K": {"choice": [2, 3]}, "train.lr": {"loguniform": [3e-4, 3e-3]},
                              "method.aggregation": {"choice": ["cat", "max"]}})
    assert main(["tune", str(path)]) == 0
    rows = _rows(ray_env, "four")
    assert len(rows) == 4 and len({r["trial_id"] for r in rows}) == 4
    assert all(r["status"] == "finished" for r in rows)
    # Optuna proposed every trial: the study holds exactly them, with the sampled values
    study = _study(ray_env, "four")
    assert len(study.trials) == 4
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    sampled = sorted((r["method.K"], r["method.aggregation"], round(r["train.lr"], 12)) for r in rows)
    proposed = sorted((t.params["method.K"], t.params["method.aggregation"], round(t.params["train.lr"], 12))
                      for t in study.trials)
    assert sampled == proposed
    for t in study.trials:
        assert set(t.distributions) == {"method.K", "train.lr", "method.aggregation"}
        assert t.distributions["train.lr"].log and 3e-4 <= t.params["train.lr"] <= 3e-3
    # every trial's final report carries the real linear probe, and Optuna got exactly it
    by_value = sorted(t.value for t in study.trials)
    for r in rows:
        final = _results(_sweep_dir(ray_env, "four") / r["trial_id"])[-1]
        assert final["final"] is True and final["metric_source"] == "probe_top1"
        assert 0.0 <= final["probe_top1"] <= 1.0 and final["epochs"] == TINY["train"]["epochs"]
    assert by_value == sorted(r["probe_top1"] for r in rows)
    # Optuna names the objective, and each trial leads to its Tune trial and MLflow run
    assert study.metric_names == ["probe_top1"]
    assert {t.user_attrs["tune_trial_id"] for t in study.trials} == {r["trial_id"] for r in rows}
    if mlflow_available():
        import mlflow

        parents, children = sweep_runs(ray_env.tracking_uri)
        assert len(parents) == 1 and len(children) == 4
        parent = parents[0]
        assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
        assert {c.data.tags["rrscale.trial_id"] for c in children} == {r["trial_id"] for r in rows}
        assert all("probe_top1" in c.data.metrics and c.info.status == "FINISHED" for c in children)
        by_run = {c.info.run_id: c for c in children}
        assert {t.user_attrs["mlflow_run_id"] for t in study.trials} == set(by_run)
        for t in study.trials:
            child = by_run[t.user_attrs["mlflow_run_id"]]
            trial_id = t.user_attrs["tune_trial_id"]
            assert child.data.tags["rrscale.trial_id"] == trial_id
            k, agg, lr = t.params["method.K"], t.params["method.aggregation"], short_number(t.params["train.lr"])
            assert child.info.run_name == f"K{k}-lr{lr}-{agg} · {trial_id}"  # sampled values, YAML order
            note = child.data.tags["mlflow.note.content"]
            assert note.startswith(f"K={k}, lr={lr}, aggregation={agg} — finished 2 epochs: probe_top1 0.")
            assert child.data.tags["rrscale.status"] == "finished"
            assert child.data.metrics["probe_top1"] == t.value  # the same plain float everywhere
            assert repr(t.value) == repr(round(t.value, 6))  # a count over the test set, no float32 noise
            assert "epoch/knn_top1" in child.data.metrics and "epoch" not in child.data.metrics
            assert "gpu_seconds" not in str(child.data.metrics) and "cost/cpu_seconds" in child.data.metrics
            datasets = child.inputs.dataset_inputs
            assert [d.dataset.name for d in datasets] == ["synthetic"] and datasets[0].dataset.digest
        assert parent.data.params["search.method.K"] == "choice[2, 3]" and "method.K" not in parent.data.params
        client = mlflow.tracking.MlflowClient(ray_env.tracking_uri)
        parent = client.get_run(parent.info.run_id)
        assert parent.data.tags["rrscale.optuna_storage"].endswith("four/optuna.db")
        assert [d.dataset.name for d in parent.inputs.dataset_inputs] == ["synthetic"]
        assert {"report.html", "plots"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
        view = client.get_experiment(parent.info.experiment_id).tags["mlflow.sharedViewState.rrscale-four"]
        assert json.loads(view)["columnOrder"][1] == "metrics.`probe_top1`"


@pytest.mark.timeout(300, method="thread")
def test_asha_stops_a_poor_trial_early_and_optuna_hears_pruned(ray_env: RayEnv) -> None:
    # lr 3.0 with Adam wrecks the features within an epoch: a trial built to be poor
    path = sweep_yaml(ray_env.tmp, "asha", search={"train.lr": {"choice": [1e-3, 3.0]}},
                      train={"epochs": 4}, tune={"num_samples": 4, "seed": 2})
    assert main(["tune", str(path)]) == 0
    rows = _rows(ray_env, "asha")
    assert len(rows) == 4
    stopped = [r for r in rows if r["status"] == "stopped early"]
    assert stopped, rows
    for r in stopped:
        results = _results(_sweep_dir(ray_env, "asha") / r["trial_id"])
        assert results[-1]["epoch"] < 4 and not any(x["final"] for x in results)
    finished = [r for r in rows if r["status"] == "finished"]
    assert finished and all(isinstance(r["probe_top1"], float) for r in finished)
    study = _study(ray_env, "asha")
    states = sorted(t.state.name for t in study.trials)
    assert states.count("PRUNED") == len(stopped) and states.count("COMPLETE") == len(finished)
    assert {r["trial_id"] for r in rows} >= {r["trial_id"] for r in stopped}
    if mlflow_available():
        _, children = sweep_runs(ray_env.tracking_uri)
        by_trial = {c.data.tags["rrscale.trial_id"]: c for c in children}
        for r in stopped:  # MLflow never shows the kNN stand-in under probe_top1
            run = by_trial[r["trial_id"]]
            assert run.info.status == "FINISHED" and run.data.tags["rrscale.status"] == "stopped early"
            assert "probe_top1" not in run.data.metrics
            assert "stopped early by ASHA after epoch" in run.data.tags["mlflow.note.content"]


@pytest.mark.slow
@pytest.mark.timeout(300, method="thread")
def test_a_diverging_trial_fails_once_and_is_not_retried(ray_env: RayEnv) -> None:
    """A failure that another attempt cannot fix (divergence) ends the trial "failed" in one
    line: no retries although scaling.max_failures allows 3, no traceback on the console."""
    gedi = {"name": "gedi", "clusters": 10, "projector_width": 32, "lambda_gen": 0.0, "divergence_limit": 1e-6}
    data = yaml.safe_load(sweep_yaml(ray_env.tmp, "div").read_text())
    data["method"] = gedi
    data["search"] = {"method.tau": {"loguniform": [0.05, 0.5]}}
    data["tune"].update({"num_samples": 1, "metric": "nmi", "scheduler": "none"})
    data["scaling"] = {"max_failures": 3}
    path = write_yaml(ray_env.tmp / "div.yaml", data)
    tic = time.time()
    proc = run_cli(ray_env, "tune", str(path), timeout=240)
    assert proc.returncode == 3, proc.stderr[-3000:]  # every trial failed
    assert "Traceback" not in proc.stdout + proc.stderr
    failed = [ln for ln in proc.stdout.splitlines() if ln.startswith("trial ") and " failed " in ln]
    assert len(failed) == 1 and "diverged" in failed[0], proc.stdout
    rows = _rows(ray_env, "div")
    assert [r["status"] for r in rows] == ["failed"]
    trial_dir = _sweep_dir(ray_env, "div") / rows[0]["trial_id"]
    assert not (trial_dir / "error.txt").exists()  # Tune saw no error, so it retried nothing
    results = _results(trial_dir)
    assert len(results) == 1 and results[0]["status"] == "failed" and "diverged" in results[0]["error"]
    assert "Traceback" in results[0]["traceback"]  # the detail is kept, just not printed
    checkpoints = sorted(trial_dir.glob("checkpoint_*"))
    assert len(checkpoints) == 1 and "diverged" in json.loads((checkpoints[0] / "failed.json").read_text())["error"]
    assert _study(ray_env, "div").trials[0].state == optuna.trial.TrialState.FAIL
    assert time.time() - tic < 200
    if mlflow_available():
        _, children = sweep_runs(ray_env.tracking_uri)
        assert [c.info.status for c in children] == ["FAILED"]
        assert "diverged" in children[0].data.tags["rrscale.error"]


# ----------------------------------------------------------------------------- dashboard


def _get(url: str, token: str | None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=20) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.mark.timeout(180, method="thread")
def test_dashboard_on_localhost_needs_the_token_and_shows_rrscale_metrics(ray_env: RayEnv) -> None:
    import ray

    from rrscale.scale import cluster

    info = cluster.start_or_join(num_cpus=1, job_name="rrscale tune dash")
    try:
        assert info.started and info.auth_mode == "token"
        assert info.dashboard_url == f"http://127.0.0.1:{ray_env.dashboard_port}"
        text = info.describe()
        assert info.dashboard_url in text and "ray get-auth-token" in text and ray_env.token not in text
        assert cluster.read_token() == ray_env.token
        url = f"{info.dashboard_url}/api/version"
        assert _get(url, ray_env.token) == 200
        assert _get(url, None) == 401
        assert _get(url, "not-the-token") == 403
        # the driver's job carries its name: the dashboard's Jobs table shows metadata.job_name
        request = urllib.request.Request(f"{info.dashboard_url}/api/jobs/",
                                         headers={"Authorization": f"Bearer {ray_env.token}"})
        jobs = json.loads(urllib.request.urlopen(request, timeout=20).read().decode())
        assert [j["metadata"].get("job_name") for j in jobs] == ["rrscale tune dash"], jobs
        # rrscale's per-trial gauges reach the node's Prometheus endpoint
        cluster.TrialGauges("trial_x").set({"images_per_s": 1234.5, "loss": 0.25})
        port = ray._private.worker.global_worker.node.metrics_export_port
        deadline, body = time.time() + 60, ""
        while time.time() < deadline:
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
            except OSError:
                body = ""
            if "rrscale_images_per_s" in body:
                break
            time.sleep(2)
        assert 'rrscale_images_per_s{' in body and 'trial="trial_x"' in body, body[-500:]
    finally:
        cluster.shutdown(info)
