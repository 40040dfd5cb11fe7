"""Sweeps and their per-epoch signals: online_probe_top1 as a schedule metric (validation, MLflow
for stopped trials) and same-seed sweeps making the same decisions. Real Ray, Optuna, MLflow."""

from __future__ import annotations

import json
from typing import Any

import optuna
import pytest
import yaml

from rrscale.cli import main
from rrscale.config import ConfigError, load_config
from tests.scale_fixtures import RayEnv, _results, mlflow_available, ray_env, sweep_yaml, write_yaml  # noqa: F401

ONLINE_PROBE = "online_probe_top1"
ONLINE = {"schedule_metric": ONLINE_PROBE}


@pytest.mark.parametrize(("patch", "expected"), [
    ({"probe": {"online": False}}, "probe.online: expected true"),
    ({"data": {"knn_subset": 0}}, "data.knn_subset: expected at least 1"),
    ({"data": {"probe_name": "synthetic"}}, "data.probe_name: expected empty"),
    ({"search": {"probe.online": {"choice": [True, False]}}}, "probe.online: expected true"),
])
def test_online_probe_as_a_sweep_signal_needs_what_it_is_computed_from(
    ray_env: RayEnv, patch: dict[str, Any], expected: str
) -> None:
    # Ray reads its auth settings once, at import: import it only under ray_env's environment
    from rrscale.scale.tune import check_tune_config

    tmp_path = ray_env.tmp
    data = yaml.safe_load(sweep_yaml(tmp_path, "s", tune=ONLINE).read_text())
    for section, value in patch.items():
        data[section] = {**data.get(section, {}), **value}
    path = write_yaml(tmp_path / "bad.yaml", data)
    with pytest.raises(ConfigError, match=expected):
        check_tune_config(load_config(path), path)
    check_tune_config(load_config(sweep_yaml(tmp_path, "ok", tune=ONLINE)), tmp_path / "ok.yaml")


def _study(env: RayEnv, name: str) -> optuna.Study:
    db = env.tmp / "ray_results" / name / "optuna.db"
    return optuna.load_study(study_name=name, storage=f"sqlite:///{db}")


def _decisions(env: RayEnv, name: str) -> list[tuple[dict[str, Any], str, list[int]]]:
    """Per Optuna trial, in the order it was proposed: sampled params, state, epochs reported."""
    return [(t.params, t.state.name, sorted(t.intermediate_values)) for t in _study(env, name).trials]


@pytest.mark.slow
@pytest.mark.timeout(420, method="thread")
def test_same_seed_sweeps_sample_the_same_configs_and_make_the_same_asha_decisions(ray_env: RayEnv) -> None:
    """tune.seed fixed, one trial at a time: the same configs in the same order, the same trials
    stopped at the same rungs, the same scores. lr 3.0 with Adam wrecks a trial's features within
    an epoch, so ASHA (on the default knn_top1) has something to stop."""
    search = {"train.lr": {"choice": [1e-3, 3.0]}, "method.K": {"choice": [2, 3]}}
    tune = {"num_samples": 3, "max_concurrent_trials": 1, "seed": 6}
    for name in ("same_a", "same_b"):
        path = sweep_yaml(ray_env.tmp, name, search=search, train={"epochs": 3}, tune=tune)
        assert main(["tune", str(path)]) == 0
    a, b = _decisions(ray_env, "same_a"), _decisions(ray_env, "same_b")
    assert len(a) == 3 and a == b
    lrs = [params["train.lr"] for params, _, _ in a]
    assert lrs[0] == 1e-3 and 3.0 in lrs, f"sampling changed ({lrs}): pick a tune.seed whose first trial " \
                                         "has lr 1e-3 and a later one 3.0"
    states = [state for _, state, _ in a]
    assert "PRUNED" in states and "COMPLETE" in states, a  # ASHA decided something, both ways
    values = [[t.value, t.intermediate_values] for t in _study(ray_env, "same_a").trials]
    assert values == [[t.value, t.intermediate_values] for t in _study(ray_env, "same_b").trials]
    if mlflow_available():
        _check_stopped_trials_keep_their_online_probe(ray_env, "same_a")


def _check_stopped_trials_keep_their_online_probe(env: RayEnv, name: str) -> None:
    """Every trial, stopped ones included, ends in MLflow (and in `rrscale runs`) with its last
    epoch's online probe, and MLflow holds it for every epoch."""
    import mlflow

    from rrscale.tracking.naming import STOPPED_EARLY, epoch_metric

    client = mlflow.tracking.MlflowClient(env.tracking_uri)
    exp = client.get_experiment_by_name("rrscale-tests")
    children = [r for r in client.search_runs([exp.experiment_id], max_results=100)
                if "mlflow.parentRunId" in r.data.tags]
    rows = json.loads((env.tmp / "ray_results" / name / "sweep.json").read_text())["rows"]
    by_trial = {c.data.tags["rrscale.trial_id"]: c for c in children}
    stopped = [r for r in rows if r["status"] == STOPPED_EARLY]
    assert stopped
    for row in rows:
        run = by_trial[row["trial_id"]]
        epochs = [r for r in _results(env.tmp / "ray_results" / name / row["trial_id"]) if not r.get("final")]
        curve = client.get_metric_history(run.info.run_id, epoch_metric(ONLINE_PROBE))
        assert {(m.step, round(m.value, 6)) for m in curve} == {(r["epoch"], round(r[ONLINE_PROBE], 6))
                                                                for r in epochs}, row["status"]
        assert run.data.metrics[ONLINE_PROBE] == pytest.approx(epochs[-1][ONLINE_PROBE])  # its end score
    from rrscale.tracking.sweeps import load_sweep
    from rrscale.tracking.table import table

    headers, cells, _ = table(load_sweep(client, exp, env.tracking_uri, sweep=name))  # `rrscale runs`
    column = headers.index(ONLINE_PROBE)
    assert len(cells) == len(rows) and all(row[column] != "-" for row in cells), cells
