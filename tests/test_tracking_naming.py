"""Unit tests of what a sweep reads like: float cleaning, run names and descriptions, the
metric/param split, search-space params, the comparison view and the importance threshold."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch

from rrscale.engine.evaluate import linear_probe
from rrscale.floats import plain_float
from rrscale.tracking import importance, links, naming
from rrscale.tracking.mlflow import outcome_word


def test_plain_float_removes_float32_noise_only() -> None:
    assert plain_float(0.29499998688697815) == 0.295  # float(np.float32(0.295))
    assert plain_float(np.float32(0.322)) == 0.322 and plain_float(torch.tensor(0.322)) == 0.322
    assert plain_float(0.6931471824645996) == 0.6931472
    for exact in (0.1, 1 / 3, 123456.789, 8.123456789e-4):  # doubles keep every digit
        assert plain_float(exact) == exact
    assert plain_float(3) == 3.0 and isinstance(plain_float(np.int64(3)), float)
    assert np.isnan(plain_float(float("nan"))) and plain_float(float("inf")) == float("inf")


def test_linear_probe_scores_are_exact_fractions() -> None:
    torch.manual_seed(0)
    x = torch.randn(200, 8)
    y = (x[:, 0] > 0).long()
    score = linear_probe(x[:100], y[:100], x[100:], y[100:], 2, epochs=2)
    assert score == int(round(score * 100)) / 100  # k / 100, not a float32 mean
    assert repr(score) == repr(round(score, 2))


def test_run_names_say_what_was_sampled() -> None:
    sampled = {"method.K": 4, "method.aggregation": "cat", "method.head_width": 256, "train.lr": 8.0e-4}
    assert naming.run_name(sampled, "9eec6037") == "K4-cat-w256-lr8.0e-4 · 9eec6037"
    assert naming.run_name({"train.lr": 0.0012, "train.weight_decay": 3e-5, "method.tau": 0.1},
                           "t1") == "lr1.2e-3-wd3.0e-5-tau0.1 · t1"
    assert naming.run_name({"train.amp": False, "data.fraction": 0.5}, "t2") == "no-amp-fraction0.5 · t2"
    assert naming.run_name({}, "t3") == "t3"
    long = naming.run_name({f"method.x{i}": 123456.5 for i in range(20)}, "t4")
    assert long.endswith("… · t4") and len(long) <= naming.NAME_LIMIT + len(" · t4")
    assert naming.short_number(123456.7) == "1.2e5" and naming.short_number(2.0) == "2"
    assert [naming.short_number(x) for x in (0.07, 0.002224, 0.0005)] == ["0.07", "2.2e-3", "5.0e-4"]


def test_descriptions_say_sampled_values_and_outcome() -> None:
    sampled = {"method.K": 4, "train.lr": 8e-4}
    assert naming.describe_trial(sampled, naming.RUNNING) == "K=4, lr=8.0e-4 — running"
    assert (naming.describe_trial(sampled, naming.FINISHED, metric="probe_top1", score=0.29499998688697815, epochs=4)
            == "K=4, lr=8.0e-4 — finished 4 epochs: probe_top1 0.295")
    assert (naming.describe_trial(sampled, naming.STOPPED_EARLY, epochs=1, of_epochs=4, signal_value=0.21)
            == "K=4, lr=8.0e-4 — stopped early by ASHA after epoch 1 of 4 (knn_top1 0.21)")
    assert naming.describe_trial(sampled, naming.FAILED, epochs=2, error="diverged").endswith(
        "failed after epoch 2: diverged")
    assert "rrscale tune --resume" in naming.describe_trial(sampled, naming.INTERRUPTED)


def test_one_word_per_outcome() -> None:
    for word in ("EARLY_STOPPED", "stopped early", "PRUNED"):
        assert outcome_word(word) == "stopped early"
    assert outcome_word("TERMINATED") == outcome_word("FINISHED") == "finished"
    assert outcome_word("KILLED") == "interrupted" and outcome_word("ERROR") == "failed"
    assert outcome_word("RUNNING") == "running"


def test_final_numbers_split_into_scores_costs_and_constants() -> None:
    summary = {"probe_top1": np.float32(0.295), "knn_top1": 0.3, "nmi": 0.41, "images_per_s": 812.5,
               "seconds": 10.0, "cpu_seconds": 20.0, "gpu_seconds": 0.0, "epochs": 4, "seed": 1, "workers": 1,
               "final": True, "device": "cpu"}
    metrics, tags = naming.split_final(summary)
    assert metrics == {"probe_top1": 0.295, "knn_top1": 0.3, "nmi": 0.41, "cost/images_per_s": 812.5,
                       "cost/seconds": 10.0, "cost/cpu_seconds": 20.0}
    assert tags == {"rrscale.epochs": "4", "rrscale.seed": "1", "rrscale.workers": "1"}
    metrics, _ = naming.split_final({"gpu_seconds": 12.5})
    assert metrics == {"cost/gpu_seconds": 12.5}  # logged when a GPU was used
    assert naming.epoch_metric("knn_top1") == "epoch/knn_top1"
    assert naming.epoch_metric("epoch_seconds") == "epoch/seconds"


def test_the_parent_records_the_search_space() -> None:
    search = {"method.K": {"choice": [2, 4]}, "train.lr": {"loguniform": [3e-4, 3e-3]},
              "method.tau": {"uniform": [0.1, 0.5], "log": True, "when": {"method.name": "gedi"}},
              "method.head_depth": {"int": [1, 3]}}
    params = naming.sweep_params(search, {"metric": "probe_top1", "mode": "max", "name": ""})
    assert params == {"search.method.K": "choice[2, 4]", "search.train.lr": "loguniform[0.0003, 0.003]",
                      "search.method.tau": "uniform[0.1, 0.5] log when method.name=gedi",
                      "search.method.head_depth": "int[1, 3]", "tune.metric": "probe_top1", "tune.mode": "max"}
    assert naming.is_log_axis(params["search.train.lr"]) and naming.is_log_axis(params["search.method.tau"])
    assert not naming.is_log_axis(params["search.method.K"])


def test_comparison_view_puts_the_objective_first() -> None:
    view = links.comparison_view("probe_top1", ["method.K", "train.lr"])
    assert view["columnOrder"][:3] == ["attributes.`Run Name`", "metrics.`probe_top1`", "metrics.`knn_top1`"]
    assert "params.`method.K`" in view["selectedColumns"] and "tags.`rrscale.status`" in view["selectedColumns"]
    first = [c for c in view["compareRunCharts"] if c["metricSectionId"] == view["compareRunSections"][0]["uuid"]]
    assert [c["type"] for c in first] == ["BAR", "PARALLEL", "LINE"] and first[0]["metricKey"] == "probe_top1"
    assert first[2]["metricKey"] == "epoch/knn_top1" and view["isAccordionReordered"] is True
    assert [s["name"] for s in view["compareRunSections"]][1:] == ["epoch", "cost", "Model metrics", "System metrics"]
    json.dumps(view)
    assert links.view_key("quick start/1") == "rrscale-quick_start_1"
    uri = "http://127.0.0.1:5001"
    assert links.experiment_url(uri, "3", "k") == (
        "http://127.0.0.1:5001/#/experiments/3/runs?workflowType=machine_learning&viewStateShareKey=k")
    assert links.run_url("sqlite:////x/m.db", "3", "abc") == "http://127.0.0.1:5000/#/experiments/3/runs/abc"
    assert links.ui_hint(uri) == "" and links.ui_hint("sqlite:////x/m.db") == "mlflow ui --backend-store-uri sqlite:////x/m.db"


def _tell(study: optuna.Study, finished: int, pruned: int = 0) -> None:
    for i in range(finished + pruned):
        trial = study.ask()
        k = trial.suggest_categorical("method.K", [2, 4])
        lr = trial.suggest_float("train.lr", 1e-4, 1e-2, log=True)
        trial.suggest_categorical("method.aggregation", ["cat", "sum"])
        if i < finished:
            study.tell(trial, 0.2 + 0.05 * k + 0.001 * lr)
        else:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)


def test_importances_need_enough_finished_trials(tmp_path: Path) -> None:
    assert importance.minimum_trials(3) == 6 and importance.minimum_trials(5) == 10
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize",
                                sampler=optuna.samplers.RandomSampler(seed=0))
    _tell(study, finished=5, pruned=4)  # pruned (stopped early) trials carry no objective: they do not count
    few = importance.study_importances(storage, "s")
    assert few.values == {} and few.finished == 5 and few.needed == 6
    assert "not shown: 5 finished trial(s)" in few.note and "at least 6" in few.note
    _tell(study, finished=3)
    enough = importance.study_importances(storage, "s")
    assert enough.finished == 8 and set(enough.values) == {"method.K", "train.lr", "method.aggregation"}
    assert sum(enough.values.values()) == pytest.approx(1.0)
    assert next(iter(enough.values)) == "method.K"  # K drives the objective above
    missing = importance.study_importances(f"sqlite:///{tmp_path / 'no-such-dir' / 'x.db'}", "nope")
    assert missing.values == {} and "no Optuna study 'nope'" in missing.note


class _Trial:
    """What SweepTracker reads of a Tune trial."""

    def __init__(self, trial_id: str, last: dict, config: dict | None = None) -> None:
        self.trial_id = trial_id
        self.last_result = last
        self.config = config or {"method.K": 4, "train.lr": 8e-4}
        self.checkpoint = None
        self.error_msg = ""


def test_tracker_ends_trials_with_one_outcome_word(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from rrscale.scale.tune import SweepTracker
    from rrscale.tracking import mlflow as tracking

    ended: dict[str, tuple[dict, str, str]] = {}
    monkeypatch.setattr(tracking, "end_trial", lambda run, summary, status, ckpt, *, description, tracking_uri:
                        ended.__setitem__(run, (summary, status, description)))
    tracker = SweepTracker(str(tmp_path / "state.json"), {}, cpus=1.0, gpus=0.0, mode="inprocess",
                           metric="probe_top1", stop_epochs=(1, 2))
    tracker.runs = {"fin": "r-fin", "asha": "r-asha", "cut": "r-cut", "bad": "r-bad"}
    tracker.datasets = {k: {"epochs": 4} for k in tracker.runs}
    tracker.trial_end(_Trial("fin", {"final": True, "status": "ok", "probe_top1": 0.295, "knn_top1": 0.31,
                                     "epochs": 4, "seed": 0, "time_total_s": 10.0}), failed=False)
    tracker.trial_end(_Trial("asha", {"epoch": 1, "knn_top1": 0.21, "probe_top1": 0.21, "time_total_s": 3.0}),
                      failed=False)
    tracker.trial_end(_Trial("cut", {"epoch": 3, "knn_top1": 0.3, "time_total_s": 8.0}), failed=False)
    tracker.trial_end(_Trial("bad", {"epoch": 2, "error": "loss diverged", "time_total_s": 5.0}), failed=True)
    summary, status, note = ended["r-fin"]
    assert status == "FINISHED" and note == "K=4, lr=8.0e-4 — finished 4 epochs: probe_top1 0.295"
    assert summary["probe_top1"] == 0.295 and summary["cpu_seconds"] == 10.0 and "gpu_seconds" not in summary
    summary, status, note = ended["r-asha"]
    assert status == "EARLY_STOPPED" and "probe_top1" not in summary and summary["stopped_at_epoch"] == 1
    assert note.endswith("stopped early by ASHA after epoch 1 of 4 (knn_top1 0.21)")
    assert ended["r-cut"][1] == "KILLED" and "interrupted after epoch 3" in ended["r-cut"][2]
    assert ended["r-bad"][1] == "FAILED" and ended["r-bad"][2].endswith("failed after epoch 2: loss diverged")
    tracker.trial_end(_Trial("fin", {}), failed=True)  # Tune may report an end twice: the first one stands
    assert ended["r-fin"][1] == "FINISHED"
