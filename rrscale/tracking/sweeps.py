"""Sweeps and trials as MLflow holds them: what ``rrscale runs``, the table, the plots and the
report read. Nothing is stored outside MLflow; everything here is rebuilt from it.

A sweep is a parent run (tag ``rrscale.role = sweep``) and its trials are its child runs
(``mlflow.parentRunId``). :func:`load_sweep` picks the latest sweep of an experiment, one by
name or parent run id, or ``"all"`` of them; an experiment with runs but no rrscale sweep (runs
logged by hand) has its top-level runs read instead.

The ranking metric is the sweep's ``tune.metric`` / ``tune.mode`` (the parent's params) when
the trials report it, else ``probe_top1`` (max), else ``knn_top1``; trials without it come
last. The hyperparameter columns are the params whose values differ between the trials
(well-known axes such as ``method.K`` first).

A trial's outcome is the ``rrscale.status`` tag (finished, stopped early, failed,
interrupted); a trial still RUNNING in MLflow whose sweep is no longer running was cut off
with its driver: it reads ``interrupted``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient

from rrscale.tracking import naming
from rrscale.tracking.mlflow import (
    PARENT_TAG,
    ROLE_TAG,
    STATUS_TAG,
    SWEEP_TAG,
    TRIAL_TAG,
    _search_all,
    outcome_word,
)

#: Axes shown first when they vary, in this order; other varying params follow alphabetically.
PRIORITY_AXES = (
    "method.name", "method.K", "method.aggregation", "method.head_width", "method.head_depth",
    "method.focal_gamma", "method.clusters", "method.tau", "method.beta", "method.lambda_gen",
    "method.projector_width", "backbone.name", "train.lr", "train.batch_size", "train.weight_decay",
    "train.optimizer", "train.schedule", "train.epochs",
)
SCORE_METRICS = ("probe_top1", "online_probe_top1", "knn_top1", "nmi", "ari", "acc")


class UnknownExperiment(LookupError):
    pass


@dataclass
class Trial:
    run_id: str
    name: str
    status: str  # MLflow's run status
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str]
    start: int | None
    end: int | None
    outcome: str = ""
    #: per-epoch curves (``epoch/<name>`` -> [(epoch, value)]), read by :func:`load_curves`
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)

    @classmethod
    def from_run(cls, run: Any) -> "Trial":
        tags = dict(run.data.tags)
        return cls(run.info.run_id, run.info.run_name or run.info.run_id[:8], run.info.status,
                   dict(run.data.params), dict(run.data.metrics), tags, run.info.start_time,
                   run.info.end_time, outcome_word(tags.get(STATUS_TAG) or run.info.status))

    @property
    def trial_id(self) -> str:
        return self.tags.get(TRIAL_TAG) or self.name

    @property
    def sampled(self) -> dict[str, Any]:
        """The values Optuna sampled for this trial (``{}`` for runs rrscale did not log)."""
        try:
            value = json.loads(self.tags.get("rrscale.sampled", "{}"))
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}

    @property
    def epochs_reached(self) -> int | None:
        for key in ("rrscale.stopped_at_epoch", "rrscale.epochs"):
            if self.tags.get(key, "").isdigit():
                return int(self.tags[key])
        curve = self.curves.get(naming.epoch_metric("knn_top1"))
        return curve[-1][0] if curve else None

    def value(self, key: str) -> float | None:
        """A metric by name, a cost by its short name (``seconds`` -> ``cost/seconds``)."""
        v = self.metrics.get(key, self.metrics.get(naming.COST_PREFIX + key))
        return v if v is not None and math.isfinite(v) else None

    def wall_seconds(self) -> float | None:
        if self.start and self.end and self.end >= self.start:
            return (self.end - self.start) / 1000.0
        return None


@dataclass
class Sweep:
    experiment: str
    experiment_id: str
    uri: str
    parents: list[Trial]
    trials: list[Trial]
    metric: str = "probe_top1"
    mode: str = "max"
    axes: list[str] = field(default_factory=list)

    @property
    def parent(self) -> Trial | None:
        return self.parents[0] if len(self.parents) == 1 else None

    @property
    def title(self) -> str:
        if self.parent is not None:
            return self.parent.tags.get(SWEEP_TAG) or self.parent.name
        return f"{len(self.parents)} sweeps" if self.parents else self.experiment

    @property
    def schedule_metric(self) -> str:
        """The per-epoch signal the sweep's ASHA stopped on (``tune.schedule_metric`` of its
        parent run; ``knn_top1`` when the parents disagree or do not say)."""
        found = {p.params.get("tune.schedule_metric") for p in self.parents} - {None}
        return str(found.pop()) if len(found) == 1 else "knn_top1"

    @property
    def space(self) -> dict[str, str]:
        """The searched axes as the parent run records them (``method.K`` -> ``choice[2, 4]``)."""
        out: dict[str, str] = {}
        for p in self.parents:
            out.update({k.removeprefix("search."): v for k, v in p.params.items() if k.startswith("search.")})
        return out

    def score(self, t: Trial) -> float | None:
        return t.value(self.metric)

    @property
    def best(self) -> Trial | None:
        return self.trials[0] if self.trials and self.score(self.trials[0]) is not None else None


@dataclass
class SweepSummary:
    """One line of ``rrscale runs``' list of sweeps."""

    name: str
    run_id: str
    start: int | None
    status: str
    outcomes: dict[str, int]
    metric: str
    best: float | None
    best_trial: str

    @property
    def trials(self) -> int:
        return sum(self.outcomes.values())


def experiment(client: MlflowClient, name: str | None) -> Any | None:
    """The named experiment (``UnknownExperiment`` when absent), or the one with the latest sweep."""
    if name:
        exp = client.get_experiment_by_name(name)
        if exp is None or exp.lifecycle_stage != "active":
            known = sorted(e.name for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY))
            raise UnknownExperiment(", ".join(known) if known else "(none)")
        return exp
    exps = client.search_experiments(view_type=ViewType.ACTIVE_ONLY)
    if not exps:
        return None
    ids = [e.experiment_id for e in exps]
    for flt in (f"tags.`{ROLE_TAG}` = 'sweep'", ""):
        runs = client.search_runs(ids, flt, ViewType.ACTIVE_ONLY, max_results=1,
                                  order_by=["attributes.start_time DESC"])
        if runs:
            return client.get_experiment(runs[0].info.experiment_id)
    return None


def _parents(client: MlflowClient, experiment_id: str) -> list[Any]:
    return _search_all(client, [experiment_id], f"tags.`{ROLE_TAG}` = 'sweep'",
                       order_by=["attributes.start_time DESC"])


def _cut_off(trials: list[Trial], parents: list[Trial]) -> None:
    """Trials still RUNNING under a sweep that is not: the driver died; they were interrupted."""
    ended = {p.run_id for p in parents if p.status != "RUNNING"}
    for t in trials:
        if t.outcome == naming.RUNNING and t.tags.get(PARENT_TAG) in ended:
            t.outcome = naming.INTERRUPTED


def load_sweep(client: MlflowClient, exp: Any, uri: str, sweep: str = "", parent_run: Any = None) -> Sweep:
    """Read the parent run(s) and trials of ``exp``; see the module docstring for the choice."""
    eid = exp.experiment_id
    if parent_run is not None:
        parents = [parent_run]
    else:
        parents = _parents(client, eid)
        if sweep and sweep != "all":
            parents = [p for p in parents
                       if sweep in (p.info.run_id, p.data.tags.get(SWEEP_TAG), p.info.run_name)][:1]
            if not parents:
                raise LookupError(f"no sweep named {sweep!r} in experiment {exp.name!r}")
        elif not sweep:
            parents = parents[:1]
    runs: list[Any] = []
    for p in parents:
        runs.extend(_search_all(client, [eid], f"tags.{PARENT_TAG} = '{p.info.run_id}'"))
    if not parents:  # no rrscale sweep here: rank the top-level runs
        runs = [r for r in _search_all(client, [eid], "") if PARENT_TAG not in r.data.tags]
    out = Sweep(exp.name, eid, uri, [Trial.from_run(p) for p in parents], [Trial.from_run(r) for r in runs])
    _cut_off(out.trials, out.parents)
    _choose_metric(out)
    _rank(out)
    out.axes = varying_params(out.trials)
    return out


def list_sweeps(client: MlflowClient, exp: Any) -> list[SweepSummary]:
    """Every sweep of ``exp``, latest first, with its trial outcomes and best score."""
    eid = exp.experiment_id
    parents = [Trial.from_run(p) for p in _parents(client, eid)]
    children = [Trial.from_run(r) for r in _search_all(client, [eid], "")
                if PARENT_TAG in r.data.tags]
    _cut_off(children, parents)
    out = []
    for p in parents:
        kids = [t for t in children if t.tags.get(PARENT_TAG) == p.run_id]
        sw = Sweep(exp.name, eid, "", [p], kids)
        _choose_metric(sw)
        _rank(sw)
        outcomes: dict[str, int] = {}
        for t in kids:
            outcomes[t.outcome] = outcomes.get(t.outcome, 0) + 1
        best = sw.best
        out.append(SweepSummary(sw.title, p.run_id, p.start, outcome_word(p.tags.get(STATUS_TAG) or p.status),
                                outcomes, sw.metric, sw.score(best) if best else None,
                                best.name if best else ""))
    return out


def load_curves(client: MlflowClient, sw: Sweep, name: str = "knn_top1") -> str:
    """Read the per-epoch curve ``epoch/<name>`` of every trial into ``Trial.curves``; returns
    the metric key."""
    key = naming.epoch_metric(name)
    for t in sw.trials:
        if key in t.metrics and key not in t.curves:
            hist = client.get_metric_history(t.run_id, key)
            t.curves[key] = sorted((int(h.step), float(h.value)) for h in hist)
    return key


def _choose_metric(sw: Sweep) -> None:
    have = {k for t in sw.trials for k in t.metrics}
    wanted = [(p.params.get("tune.metric"), p.params.get("tune.mode", "max")) for p in sw.parents]
    for metric, mode in [w for w in wanted if w[0]] + [("probe_top1", "max"), ("knn_top1", "max")]:
        if metric in have:
            sw.metric, sw.mode = str(metric), "min" if mode == "min" else "max"
            return
    first = next((p.params.get("tune.metric") for p in sw.parents if p.params.get("tune.metric")), None)
    sw.metric = first or "probe_top1"
    sw.mode = "max"


def _rank(sw: Sweep) -> None:
    sign = -1.0 if sw.mode == "max" else 1.0

    def key(t: Trial) -> tuple[int, float, int]:
        s = sw.score(t)
        return (0 if s is not None else 1, sign * s if s is not None else 0.0, t.start or 0)

    sw.trials.sort(key=key)


def varying_params(trials: list[Trial]) -> list[str]:
    """Param keys whose values differ between trials (a missing value counts as a value)."""
    keys = sorted({k for t in trials for k in t.params})
    vary = [k for k in keys if len({t.params.get(k, "") for t in trials}) > 1]
    first = [k for k in PRIORITY_AXES if k in vary]
    return first + [k for k in vary if k not in first]
