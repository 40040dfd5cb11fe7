"""``rrscale tune``: Ray Tune + Optuna (TPE) + ASHA over the one training loop, tracked in MLflow.

How a sweep runs
----------------
* The ``search:`` section becomes an Optuna define-by-run function (:mod:`rrscale.scale.space`)
  inside ``OptunaSearch`` with ``TPESampler(seed=tune.seed, multivariate=True, group=True)``
  and a persistent study (``<sweep>/optuna.db``, sqlite). A trial's Tune config is the flat
  ``{dotted.path: value}`` dict Optuna sampled; the rest of the experiment travels once via
  ``tune.with_parameters``.
* Trials: with ``scaling.num_workers`` 0 or 1 the trial runs the loop *in-process* in the Tune
  function (``ray.tune.report``); with 2+ workers it starts a ``TorchTrainer`` (Train V2, named
  after the trial id, ``ray.train.report`` in the workers, ``TuneReportCallback`` forwards
  rank 0's reports). Measured by ``benchmarks/tune_overhead.py`` on 2 CPU cores (quickstart, 4
  trials): trial start to first training step 3.0 s median in-process (0.1-0.7 s when Tune reuses
  the trial process) vs 23.4 s through a 1-worker TorchTrainer; 356 vs 162 trials/hour.
* Metric interplay: every report carries ``tune.metric`` and ``tune.schedule_metric``
  (:class:`rrscale.scale.train.ReportShape`), because Tune checks each result for both and
  OptunaSearch records ``tune.metric`` of every result as an intermediate value. ASHA
  (``time_attr="epoch"``) stops on the per-epoch ``schedule_metric``; its rungs sit strictly
  before the last epoch and the final report has no ``epoch`` key, so a trial that trains to
  the end is never cut before its linear probe. For an end-of-run ``tune.metric``
  (``probe_top1``) the epoch reports carry that epoch's ``knn_top1`` under its name
  (``metric_source: knn_top1``), and the final report the real linear-probe score
  (``metric_source: probe_top1``). Ray's OptunaSearch would tell Optuna a trial ASHA stopped
  as COMPLETE with that stand-in; :class:`RRSearch` tells it PRUNED instead, so COMPLETE
  values are always real probe scores and TPE ranks cut-short trials below finished ones by
  how far they got (their per-epoch intermediate values). MLflow never gets a stand-in under
  the metric's name.
* Failures: a trial whose process or node is lost (or that hits an I/O error) is retried up to
  ``scaling.max_failures`` times; a failure that another attempt cannot fix (divergence, a
  config or data error, a bug) ends the trial "failed" at once, in one console line, with the
  traceback kept in its result and MLflow run (:func:`rrscale.scale.train.retryable`).
* Resume (``--resume``, with the experiment file or the sweep folder, which keeps the resolved
  ``experiment.yaml``): ``Tuner.restore(sweep_dir, trainable=..., resume_errored=False)``
  restores trials and searcher (Ray does not save the scheduler). A driver killed at any instant
  leaves Tune's snapshot (saved every ~2 s) behind the Optuna study and MLflow; the trial folders
  say first how each trial ended (:mod:`rrscale.scale.trial_record`), so on resume a trial that
  had ended re-reports that ending instead of training, :class:`RRSearch` does not tell Optuna
  twice and hands Optuna trials the snapshot lost to the replacement trials, and
  :class:`SweepTracker` closes MLflow runs of trials Tune no longer knows. Train runs inside
  trials resume by ``(storage_path, trial id)``.
* Concurrency: one process per sweep (an ``fcntl`` lock on the sweep folder,
  :mod:`rrscale.scale.sweep_dir`); two sweeps on one machine get two dashboard ports
  (:mod:`rrscale.scale.cluster`) and share a new ``mlflow.db`` safely (its tables are created
  under a lock, :mod:`rrscale.tracking.mlflow`).
* Tracking: :class:`SweepTracker` (a Tune callback on the driver) calls
  :mod:`rrscale.tracking.mlflow`: one parent run per sweep (its params: the search space), a
  child run per trial named by what was sampled; :class:`RRSearch` names the Optuna objective
  and tags each Optuna trial with its Tune trial id, the tracker adds its MLflow run id. When
  the sweep ends, :func:`rrscale.tracking.report.attach_report` attaches the report and plots.
  Trials cut short by Ctrl-C end "interrupted". The console shows :mod:`rrscale.scale.progress`'s
  live view instead of Tune's tables, then the trials and the commands to run next.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shlex
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from ray.tune import Callback
from ray.tune.search.optuna import OptunaSearch

from rrscale.config import ConfigError, ExperimentConfig
from rrscale.engine.rundir import write_json
from rrscale.scale import space, sweep_dir, trial_record
from rrscale.tracking.naming import STOPPED_EARLY

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_TRAINING_FAILED = 3

#: Metrics every run reports each epoch, by direction; plus per method. ``online_probe_top1``
#: needs labelled training images and ``probe.online`` (checked in :func:`check_tune_config`).
PER_EPOCH = {"loss": "min", "knn_top1": "max", "online_probe_top1": "max"}
PER_EPOCH_BY_METHOD = {
    "relational": {"relation_acc": "max"},
    "gedi": {
        "unif": "min",
        "inv": "min",
        "marginal_entropy": "max",
        "train_clusters_used": "max",
        "train_top_cluster_share": "min",
    },
}
#: Metrics only the final report carries.
AT_END = {"probe_top1": "max"}
AT_END_BY_METHOD: dict[str, dict[str, str]] = {
    "relational": {},
    "gedi": {"nmi": "max", "ari": "max", "acc": "max", "ood_auroc_noise": "max", "clusters_used": "max", "collapsed": "min"},
}
#: What a trial that only drives a TorchTrainer holds: no CPU (its Train workers hold theirs;
#: even a tiny CPU share would leave a 1-CPU node unable to place its worker) and a memory
#: reservation, which also makes it a valid Ray resource request.
TRIAL_DRIVER_CPU = 0.0
TRIAL_DRIVER_MEMORY = 256 * 2**20
STATE_FILE = "rrscale-sweep.json"
ONLINE_PROBE = "online_probe_top1"
#: Optuna trial user attrs that lead from a study to Tune and MLflow.
OPTUNA_TUNE_ATTR = "tune_trial_id"
OPTUNA_RUN_ATTR = "mlflow_run_id"
TRIAL_MODES = ("auto", "inprocess", "trainer")
TUNE_KEYS = {
    "timestamp", "pid", "time_this_iter_s", "time_total_s", "training_iteration", "iterations_since_restore",
    "time_since_restore", "done", "date", "hostname", "node_ip", "trial_id", "experiment_tag", "config",
    "checkpoint_dir_name", "should_checkpoint", "final", "loop_ready_at", "checkpoint_path",
}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


# ----------------------------------------------------------------------------- validation


def _methods(cfg: ExperimentConfig) -> set[str]:
    names = {cfg.method.name}
    axis = cfg.search.get("method.name")
    if axis is not None and axis.choice is not None:
        names = {str(v) for v in axis.choice}
    return names


def known_metrics(cfg: ExperimentConfig) -> tuple[dict[str, str], dict[str, str]]:
    """(per-epoch, end-of-run) metrics every trial of this sweep reports, name -> direction."""
    methods = _methods(cfg)
    per_epoch = dict(PER_EPOCH)
    at_end = dict(AT_END)
    common_epoch = set.intersection(*(set(PER_EPOCH_BY_METHOD.get(m, {})) for m in methods))
    common_end = set.intersection(*(set(AT_END_BY_METHOD.get(m, {})) for m in methods))
    for m in methods:
        per_epoch.update({k: v for k, v in PER_EPOCH_BY_METHOD.get(m, {}).items() if k in common_epoch})
        at_end.update({k: v for k, v in AT_END_BY_METHOD.get(m, {}).items() if k in common_end})
    return per_epoch, at_end


def _check_online_probe(cfg: ExperimentConfig, fail: Any) -> None:
    """What every trial needs to report ``online_probe_top1`` each epoch (see engine/loop.py)."""
    why = f"(for {ONLINE_PROBE} in tune.metric / tune.schedule_metric; knn_top1 needs no training labels)"
    if False in _extremes(cfg, "probe.online", cfg.probe.online):
        fail("probe.online", f"true {why}")
    if cfg.data.probe_name:
        fail("data.probe_name", f"empty: the online probe learns and is scored on the training set {why}")
    if cfg.data.name == "stl10":
        fail("data.name", f"a dataset with labelled training images (STL-10 trains on unlabelled ones) {why}")
    if min(int(v) for v in _extremes(cfg, "data.knn_subset", cfg.data.knn_subset)) < 1:
        fail("data.knn_subset", f"at least 1 (the online probe is scored on that many test images) {why}")


def _extremes(cfg: ExperimentConfig, dotted: str, current: Any) -> list[Any]:
    axis = cfg.search.get(dotted)
    return [current] if axis is None else [v for v in axis.extremes()]


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:
        return 0


def trial_mode(cfg: ExperimentConfig, requested: str = "auto") -> str:
    """``inprocess`` for 0/1 worker per trial, ``trainer`` (a TorchTrainer) for 2+."""
    if requested != "auto":
        return requested
    return "trainer" if cfg.scaling.num_workers >= 2 else "inprocess"


def trial_resources(cfg: ExperimentConfig, mode: str) -> tuple[float, float]:
    """(CPUs, GPUs) one trial holds in total, workers included."""
    if mode == "trainer":
        n = max(1, cfg.scaling.num_workers)
        gpus = n * (cfg.scaling.gpus_per_worker or 1.0) if cfg.scaling.use_gpu else 0.0
        return TRIAL_DRIVER_CPU + n * cfg.scaling.cpus_per_worker, gpus
    return cfg.tune.cpus_per_trial, cfg.tune.gpus_per_trial


def concurrency(cfg: ExperimentConfig, cpus: float, gpus: float, mode: str) -> int:
    """``tune.max_concurrent_trials`` or, when 0, what the resources allow (Tune does not
    count a trial's Train workers, so this limit is what keeps a sweep from deadlocking)."""
    per_cpu, per_gpu = trial_resources(cfg, mode)
    fit = int(math.floor(cpus / per_cpu + 1e-9)) if per_cpu > 0 else 10**6
    if per_gpu > 0:
        fit = min(fit, int(math.floor(gpus / per_gpu + 1e-9)))
    fit = max(fit, 0)
    return min(fit, cfg.tune.max_concurrent_trials) if cfg.tune.max_concurrent_trials else fit


def check_tune_config(cfg: ExperimentConfig, path: str | Path, *, requested_mode: str = "auto") -> None:
    """What a sweep needs beyond config.py's schema; raises one ConfigError line, starts nothing."""
    src = str(path)
    t = cfg.tune

    def fail(key: str, expected: str) -> None:
        raise ConfigError(f"{src}: {key}: expected {expected}")

    if not cfg.search:
        fail("search", "at least one axis to tune (dotted.path: {choice|uniform|loguniform|int: ...})")
    space.check_space(cfg.search, src)
    if t.name and not _NAME.match(t.name):
        fail("tune.name", f"letters, digits, '.', '_' or '-' (got {t.name!r})")
    per_epoch, at_end = known_metrics(cfg)
    every = {**per_epoch, **at_end}
    if t.metric not in every:
        fail("tune.metric", f"one of {', '.join(sorted(every))} (got {t.metric!r})")
    if t.mode != every[t.metric]:
        fail("tune.mode", f"'{every[t.metric]}' for tune.metric {t.metric} (got {t.mode!r})")
    if t.schedule_metric not in per_epoch:
        fail("tune.schedule_metric", f"a metric reported every epoch: {', '.join(sorted(per_epoch))} "
             f"(got {t.schedule_metric!r})")
    epochs = [int(v) for v in _extremes(cfg, "train.epochs", cfg.train.epochs)]
    if min(epochs) < 1:
        fail("train.epochs", "at least 1 for a sweep")
    if ONLINE_PROBE in (t.metric, t.schedule_metric):
        _check_online_probe(cfg, fail)
    uses_knn = "knn_top1" in (t.metric, t.schedule_metric) or t.metric in at_end
    if uses_knn:
        if cfg.train.knn_every != 1 and (t.scheduler == "asha" or t.metric == "knn_top1" or t.metric in at_end):
            fail("train.knn_every", f"1 (every epoch must report knn_top1 for tune.metric {t.metric} / "
                 f"tune.schedule_metric {t.schedule_metric}; got {cfg.train.knn_every})")
        if cfg.data.knn_subset < 1:
            fail("data.knn_subset", "at least 1 (knn_top1 is computed on that many labelled images)")
    if t.metric == "probe_top1" and min(int(v) for v in _extremes(cfg, "probe.epochs", cfg.probe.epochs)) < 1:
        fail("probe.epochs", "at least 1 when tune.metric is probe_top1")
    if t.scheduler == "asha" and t.grace_period >= min(epochs):
        fail("tune.grace_period", f"fewer than train.epochs ({min(epochs)}): ASHA needs a rung before the "
             f"last epoch (got {t.grace_period})")
    if requested_mode not in TRIAL_MODES:
        fail("trial mode", f"one of {', '.join(TRIAL_MODES)}")
    mode = trial_mode(cfg, requested_mode)
    joined = bool(os.environ.get("RAY_ADDRESS"))
    if not joined:
        gpus = _gpu_count()
        if cfg.scaling.use_gpu and gpus == 0:
            fail("scaling.use_gpu", "false: no CUDA GPU on this machine (set RAY_ADDRESS to use a GPU cluster)")
        if t.gpus_per_trial > 0 and gpus == 0:
            fail("tune.gpus_per_trial", "0: no CUDA GPU on this machine (set RAY_ADDRESS to use a GPU cluster)")
        if cfg.train.device == "cuda" and gpus == 0:
            fail("train.device", "'auto' or 'cpu': no CUDA GPU on this machine")
        if mode == "inprocess" and t.gpus_per_trial > gpus:
            fail("tune.gpus_per_trial", f"at most {gpus} (the GPUs here; fractions share one GPU)")
        cpus = t.num_cpus or (os.cpu_count() or 1)
        per_cpu, per_gpu = trial_resources(cfg, mode)
        if mode == "trainer" and per_cpu > cpus:
            fail("scaling.cpus_per_worker", f"num_workers x cpus_per_worker <= {cpus} CPUs "
                 f"(got {cfg.scaling.num_workers} x {cfg.scaling.cpus_per_worker:g})")
        if mode == "trainer" and per_gpu > gpus:
            fail("scaling.gpus_per_worker", f"num_workers x gpus_per_worker <= {gpus} GPUs")
        if per_cpu > cpus:
            fail("tune.cpus_per_trial", f"at most {cpus} (the CPUs of the local Ray: tune.num_cpus or all cores; "
                 f"got {per_cpu:g})")
        fit = concurrency(cfg.model_copy(update={"tune": t.model_copy(update={"max_concurrent_trials": 0})}),
                          cpus, gpus, mode)
        if t.max_concurrent_trials > fit:
            fail("tune.max_concurrent_trials", f"at most {fit} (= resources // resources per trial; "
                 f"got {t.max_concurrent_trials})")
    if mode == "trainer" and not t.dashboard:
        fail("tune.dashboard", "true when trials run Ray Train workers (scaling.num_workers >= 2): Train V2 "
             "needs the dashboard's State API to release the resources of a stopped trial")
    if mode == "inprocess" and cfg.scaling.use_gpu and t.gpus_per_trial == 0:
        fail("tune.gpus_per_trial", "a GPU share (e.g. 0.25) when scaling.use_gpu is true")
    if mode == "trainer" and cfg.scaling.use_gpu and cfg.scaling.gpus_per_worker == 0 and t.gpus_per_trial:
        fail("scaling.gpus_per_worker", "the GPU share of each worker (tune.gpus_per_trial applies to "
             "single-worker trials)")


# ----------------------------------------------------------------------------- trials


def _trial_dirname(trial: Any) -> str:
    return str(trial.trial_id)


def rrscale_trial(config: dict[str, Any], base: dict[str, Any], opts: dict[str, Any]) -> None:
    """The Tune function trainable: one trial of the sweep. (Its name is what Ray shows for the
    trial processes: "(rrscale_trial pid=...)" in forwarded logs, the actors' repr in the dashboard.)

    A trial that had already ended before the driver died reports that ending again (see
    :mod:`rrscale.scale.trial_record`). A failure that another attempt cannot fix ends the trial
    as "failed" with its report (one line; the traceback travels in the report) instead of an
    exception, so Tune does not retry it; lost processes and I/O errors raise and are retried.
    """
    import traceback

    import ray.tune

    from rrscale.engine.loop import pick_device, run_experiment
    from rrscale.methods import TrainingDiverged
    from rrscale.scale.train import RayHooks, ReportShape, _fit, _set_threads, make_trainer, one_line, retryable

    trial_id = ray.tune.get_context().get_trial_id()
    ended = trial_record.ending_of(f"{opts['trial_root']}/{trial_id}")
    if ended is not None:
        ray.tune.report({**ended[1], "replayed": True})
        return
    shape = ReportShape(metric=opts["metric"], schedule_metric=opts["schedule_metric"])
    hooks = RayHooks("tune", shape=shape, tag=trial_id)
    try:
        exp = space.trial_config(base, config, source=f"trial {trial_id}")
        if opts["mode"] == "trainer":
            from ray.tune.integration.ray_train import TuneReportCallback

            trainer = make_trainer(exp, max(1, exp.scaling.num_workers), storage_path=opts["train_storage"],
                                   name=trial_id, shape=shape, tag=trial_id, callbacks=[TuneReportCallback()])
            summary = _fit(trainer)
            if summary.get("status") != "ok":
                hooks.report_failure(str(summary.get("error", "training failed")), str(summary.get("traceback", "")))
            return
        _set_threads(opts["cpus"])
        run_experiment(exp, hooks=hooks, device=pick_device(exp.train.device))
    except Exception as exc:
        if retryable(exc):
            raise
        plain = isinstance(exc, (TrainingDiverged, ConfigError))
        hooks.report_failure(str(exc) if plain else one_line(exc), traceback.format_exc())


# ----------------------------------------------------------------------------- tracking


def _numbers(result: dict[str, Any], metric: str = "") -> dict[str, Any]:
    """The loop's values in a Tune result, without Tune's bookkeeping and without a stand-in
    (``metric_source`` != the metric: an epoch's kNN under the probe's name is not logged)."""
    out = {k: v for k, v in result.items() if k not in TUNE_KEYS and not isinstance(v, (dict, list))}
    if metric and result.get("metric_source", metric) != metric:
        out.pop(metric, None)
    out.pop("metric_source", None)
    return out


class RRSearch(OptunaSearch):
    """``OptunaSearch`` that tells Optuna the truth about trials the scheduler stopped.

    Ray's OptunaSearch marks every trial that ends without error as COMPLETE with its last
    reported value. For a trial ASHA stopped, that value is an epoch's stand-in (``knn_top1``
    under ``tune.metric``), not the final linear-probe score the finished trials report, so TPE
    would rank cut-short trials against finished ones on a different scale. Here a trial
    whose last result is not the final one is told as PRUNED: Optuna's TPE keeps using it
    (pruned trials rank below every complete one, ordered by how far they got and their last
    intermediate value, which are the per-epoch stand-ins reported along the way), and only
    finished trials carry COMPLETE values of ``tune.metric``; a trial that failed is FAIL.

    After a resume it also reconciles itself with the study, which is newer than the pickled
    searcher state when the driver died between the two (:meth:`restore`), and it records each
    trial's ending in the trial's folder *before* telling Optuna (:mod:`rrscale.scale.trial_record`).
    """

    def __init__(self, *args: Any, trial_root: str = "", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.trial_root = trial_root
        self._orphans: list[int] = []

    def _setup_study(self, mode: Any) -> None:
        super()._setup_study(mode)
        if self._metric:  # Optuna's dashboard then says "probe_top1", not "Objective 0"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._ot_study.set_metric_names([self._metric])

    def restore(self, checkpoint_path: str) -> None:
        """Ray's restore, then: trials Optuna already saw end are not told again (telling a
        finished Optuna trial raises), and Optuna trials asked for after the snapshot, whose Tune
        trials the snapshot lacks, are handed to the next new Tune trials (same sampled values)
        instead of staying RUNNING forever."""
        import optuna

        super().restore(checkpoint_path)
        states = {t.number: t for t in self._ot_study.get_trials(deepcopy=False)}
        known = set()
        for tune_id, ot_trial in self._ot_trials.items():
            known.add(ot_trial.number)
            frozen = states.get(ot_trial.number)
            if frozen is not None and frozen.state.is_finished():
                self._completed_trials.add(tune_id)
        self._orphans = [t._trial_id for n, t in sorted(states.items())
                         if n not in known and t.state == optuna.trial.TrialState.RUNNING]

    def suggest(self, trial_id: str) -> dict | None:
        import optuna

        if trial_id not in self._ot_trials and getattr(self, "_orphans", None):
            self._ot_trials[trial_id] = optuna.trial.Trial(self._ot_study, self._orphans.pop(0))
        config = super().suggest(trial_id)
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is not None:  # so an Optuna trial can be traced to its Tune trial (and MLflow run)
            ot_trial.set_user_attr(OPTUNA_TUNE_ATTR, trial_id)
        return config

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        import optuna

        if trial_id in self._completed_trials:  # a re-reported ending after a resume
            return
        try:
            super().on_trial_result(trial_id, result)
        except optuna.exceptions.UpdateFinishedTrialError:
            # Optuna heard this trial finish, but the driver died before Tune saved that: on
            # --resume the trial re-reports its stored final numbers. Optuna keeps its value.
            self._completed_trials.add(trial_id)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if self.trial_root:
            trial_record.record_ending(f"{self.trial_root}/{trial_id}", result, error)
        if trial_id in self._completed_trials:
            return
        failed = error or (result or {}).get("status") == "failed"
        if result is not None and (failed or not result.get("final")):
            result = {k: v for k, v in result.items() if k != self.metric}
        super().on_trial_complete(trial_id, result=result, error=failed)


def close_lost_optuna_trials(db: Path, study_name: str) -> int:
    """Fail the Optuna trials still RUNNING after a sweep ran to its end: trials asked for just
    before the driver died that no Tune trial took over. Returns how many."""
    import optuna

    if not db.exists():
        return 0
    study = optuna.load_study(study_name=study_name, storage=f"sqlite:///{db}")
    lost = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    for t in lost:
        study._storage.set_trial_user_attr(t._trial_id, "rrscale.status", "lost: the driver stopped before "
                                           "Ray Tune saved this trial")
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)
    return len(lost)


def link_optuna_trial(storage: Any, study_name: str, trial_id: str, attrs: dict[str, str]) -> None:
    """Add user attrs (e.g. the MLflow run id) to the running Optuna trial that
    :class:`RRSearch` tagged with Tune ``trial_id`` (``storage``: an Optuna storage); a no-op
    when there is none."""
    from optuna.trial import TrialState

    study_id = storage.get_study_id_from_name(study_name)
    for frozen in storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
        if frozen.user_attrs.get(OPTUNA_TUNE_ATTR) == trial_id:
            number = storage.get_trial_id_from_study_id_trial_number(study_id, frozen.number)
            for key, value in attrs.items():
                storage.set_trial_user_attr(number, key, value)


class SweepTracker(Callback):
    """Tune callback on the driver: ``start_trial`` / ``log_epoch`` / ``end_trial`` of
    :mod:`rrscale.tracking.mlflow` for every trial, with the names, descriptions, outcome words
    and dataset inputs of :mod:`rrscale.tracking.naming`.

    Plain attributes only: Tune pickles it with the Tuner. The parent run id is read from the
    sweep's state file at ``setup`` (so a restored Tuner uses the run that ``start_sweep``
    found again), and the trial -> run map is part of Tune's callback state. ``stop_epochs``:
    where the scheduler can stop a trial (:func:`asha_stop_epochs`); a trial that ends
    unfinished elsewhere was interrupted, not stopped early.
    """

    def __init__(self, state_file: str, base: dict[str, Any], cpus: float, gpus: float, mode: str,
                 metric: str, stop_epochs: tuple[int, ...] = (), schedule_metric: str = "knn_top1") -> None:
        self.state_file = state_file
        self.metric = metric
        self.schedule_metric = schedule_metric
        self.base = base
        self.cpus = cpus
        self.gpus = gpus
        self.mode = mode
        self.stop_epochs = tuple(stop_epochs)
        self.parent = ""
        self.uri = ""
        self.name = ""
        self.runs: dict[str, str] = {}
        self.started_at: dict[str, float] = {}
        self.startup: dict[str, float] = {}
        self.ended: set[str] = set()
        self.checkpoints: dict[str, str] = {}
        self.datasets: dict[str, dict[str, Any]] = {}
        self.logged_datasets: set[str] = set()
        self.strays_closed = False
        self.unclosed: dict[str, dict[str, Any]] = {}  # trial id -> the ending MLflow did not take

    def _load(self) -> None:
        try:
            state = json.loads(Path(self.state_file).read_text())
        except (OSError, ValueError):
            return
        self.parent = state.get("parent_run_id", "")
        self.uri = state.get("tracking_uri", "")
        self.name = state.get("name", "")

    @property
    def optuna_storage(self) -> str:
        return f"sqlite:///{Path(self.state_file).parent / 'optuna.db'}"

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_study_storage", None)  # an open database connection does not travel with the Tuner
        return state

    def _link_optuna(self, trial_id: str, run: str) -> None:
        """The Optuna trial of ``trial_id`` gets the MLflow run id (one storage for the sweep:
        opening one costs ~0.4 s of the driver's time)."""
        import optuna

        try:
            if getattr(self, "_study_storage", None) is None:
                self._study_storage = optuna.storages.RDBStorage(self.optuna_storage)
            link_optuna_trial(self._study_storage, self.name, trial_id, {OPTUNA_RUN_ATTR: run})
        except Exception as exc:  # noqa: BLE001 - the link is a convenience
            warnings.warn(f"could not link the Optuna trial of {trial_id} to MLflow run {run}: {exc}",
                          stacklevel=1)

    def _describe_parent(self) -> None:
        """Where the report finds the Optuna study, and the experiment's comparison view."""
        from rrscale.tracking import links
        from rrscale.tracking import mlflow as tracking

        tracking.set_tags(self.parent, {links.OPTUNA_STORAGE_TAG: self.optuna_storage,
                                        links.OPTUNA_STUDY_TAG: self.name or Path(self.state_file).parent.name,
                                        links.SWEEP_DIR_TAG: str(Path(self.state_file).parent)},
                          tracking_uri=self.uri or None)
        links.publish_comparison_view(self.parent, self.uri)

    def trial_start(self, trial: Any) -> None:
        from rrscale.tracking import mlflow as tracking
        from rrscale.tracking import naming

        self.started_at[trial.trial_id] = time.time()
        self.ended.discard(trial.trial_id)
        if not self.parent:
            self._load()
        sampled = dict(trial.config)
        try:
            exp = space.trial_config(self.base, sampled, source=f"trial {trial.trial_id}")
            params = exp.model_dump(mode="json", exclude={"search", "tune", "mlflow"})
            tags = {"rrscale.config_hash": exp.config_hash(), "rrscale.seed": exp.train.seed,
                    "rrscale.method": exp.method.name, "rrscale.dataset": exp.data.name,
                    "rrscale.trial_mode": self.mode, "rrscale.sampled": json.dumps(sampled, default=str)}
            data = exp.data
            name = data.name + (f" ({data.fraction:.0%})" if data.fraction < 1 else "")
            self.datasets[trial.trial_id] = {
                "name": name, "source": data.root or ("generated" if data.name in ("synthetic", "toy") else
                                                      "torchvision download"),
                "profile": {"fraction": data.fraction, "probe": data.probe_name or data.name},
                "epochs": exp.train.epochs}
        except Exception as exc:  # tracking never kills training
            params, tags = sampled, {"rrscale.tracking_note": f"config: {exc}"}
        run = tracking.start_trial(self.parent, trial.trial_id, params, tags,
                                   run_name=naming.run_name(sampled, trial.trial_id),
                                   description=naming.describe_trial(sampled, naming.RUNNING),
                                   tracking_uri=self.uri or None)
        self.runs[trial.trial_id] = run
        if run:
            self._link_optuna(trial.trial_id, run)

    def _log_dataset(self, trial_id: str, fingerprint: str) -> None:
        from rrscale.tracking import mlflow as tracking

        info = self.datasets.get(trial_id)
        if info is None:
            return
        for run in (self.runs.get(trial_id, ""), self.parent):
            key = f"{run}:{fingerprint}"
            if run and key not in self.logged_datasets:
                tracking.log_dataset(run, info["name"], fingerprint, info["source"], profile=info["profile"],
                                     tracking_uri=self.uri or None)
                self.logged_datasets.add(key)

    def trial_result(self, trial: Any, result: dict[str, Any]) -> None:
        from rrscale.tracking import mlflow as tracking

        ready = result.get("loop_ready_at")
        start = self.started_at.get(trial.trial_id)
        if isinstance(ready, (int, float)) and start is not None and trial.trial_id not in self.startup:
            self.startup[trial.trial_id] = float(ready) - start
            result["startup_seconds"] = self.startup[trial.trial_id]
        if result.get("checkpoint_path"):  # a Train run's checkpoint, forwarded by TuneReportCallback
            self.checkpoints[trial.trial_id] = str(result["checkpoint_path"])
        if isinstance(result.get("data_fingerprint"), str):
            self._log_dataset(trial.trial_id, result["data_fingerprint"])
        if result.get("final") or "epoch" not in result:
            return
        run = self.runs.get(trial.trial_id, "")
        curves = {k: v for k, v in _numbers(result, self.metric).items() if k != "startup_seconds"}
        tracking.log_epoch(run, curves, int(result["epoch"]), tracking_uri=self.uri or None)

    def trial_end(self, trial: Any, failed: bool) -> None:
        from rrscale.tracking import naming

        if trial.trial_id in self.ended:
            return
        self.ended.add(trial.trial_id)
        last = dict(trial.last_result or {})
        failed = failed or last.get("status") == "failed"  # a failure the trial reported, not retried
        final = bool(last.get("final")) and last.get("status", "ok") == "ok"
        summary: dict[str, Any] = _numbers(last, self.metric) if final else {}
        if not final and isinstance(last.get(ONLINE_PROBE), float):
            summary[ONLINE_PROBE] = last[ONLINE_PROBE]  # a stopped trial's probe-like score: its last epoch's
        summary.pop("startup_seconds", None)
        for key in ("error", "traceback", "device", "config_hash", "torch"):
            if isinstance(last.get(key), str):
                summary[key] = last[key]
        seconds = float(last.get("time_total_s", 0.0) or 0.0)
        summary["cpu_seconds"] = seconds * self.cpus
        if self.gpus:
            summary["gpu_seconds"] = seconds * self.gpus
        if trial.trial_id in self.startup:
            summary["startup_seconds"] = self.startup[trial.trial_id]
        epochs = int(last.get("epochs", last.get("epoch", 0)) or 0)
        if failed:
            status, outcome = "FAILED", naming.FAILED
        elif final:
            status, outcome = "FINISHED", naming.FINISHED
        elif epochs in self.stop_epochs:
            status, outcome = "EARLY_STOPPED", naming.STOPPED_EARLY
        else:
            status, outcome = "KILLED", naming.INTERRUPTED
        if not final:
            summary["stopped_at_epoch"] = epochs
        info = self.datasets.get(trial.trial_id, {})
        error = str(last.get("error") or getattr(trial, "error_msg", "") or "").strip().splitlines()
        description = naming.describe_trial(
            dict(trial.config), outcome, metric=self.metric, score=last.get(self.metric) if final else None,
            epochs=epochs, of_epochs=info.get("epochs"), signal=self.schedule_metric,
            signal_value=last.get(self.schedule_metric),
            error=error[-1][:200] if error else "")
        ckpt_dir = None
        path = (self.checkpoints.get(trial.trial_id)
                or (trial.checkpoint.path if trial.checkpoint is not None else None))
        if path and "://" not in str(path) and Path(path).exists():
            ckpt_dir = Path(path)
        ending = {"run": self.runs.get(trial.trial_id, ""), "summary": summary, "status": status,
                  "checkpoint": str(ckpt_dir) if ckpt_dir is not None and not failed else None,
                  "description": description}
        if not self._end_run(ending):
            self.unclosed[trial.trial_id] = ending

    def _end_run(self, ending: dict[str, Any]) -> bool:
        from rrscale.tracking import mlflow as tracking

        ckpt = ending["checkpoint"]
        return tracking.end_trial(ending["run"], ending["summary"], ending["status"],
                                  Path(ckpt) if ckpt and Path(ckpt).exists() else None,
                                  description=ending["description"], tracking_uri=self.uri or None)

    def close_unclosed(self, final: bool) -> None:
        """Close the runs of trials that ended while MLflow did not answer, once it answers (at the
        end of this driver, or on a later ``--resume``). ``final``: say what stays open."""
        from rrscale.tracking import mlflow as tracking

        if not self.unclosed:
            return
        if not self.parent:
            self._load()
        if self.uri and tracking.answers(self.uri):
            for trial_id, ending in list(self.unclosed.items()):
                if self._end_run(ending):
                    del self.unclosed[trial_id]
        if final and self.unclosed:
            print(f"rrscale: MLflow did not answer: {len(self.unclosed)} trial run(s) stay RUNNING; "
                  f"rrscale tune --resume {shlex.quote(str(Path(self.state_file).parent))} closes them once "
                  f"{self.uri} answers", flush=True)

    def close_strays(self, trials: list) -> None:
        """Once per driver: close the child runs of trials that Tune's state does not hold (the
        driver died after MLflow heard of them but before Tune's snapshot saved them)."""
        from rrscale.tracking import mlflow as tracking

        self.strays_closed = True
        if not self.parent:
            self._load()
        tracking.close_stray_trials(self.parent, {t.trial_id for t in trials}, tracking_uri=self.uri or None)

    def interrupted(self, trials: list) -> None:
        """Trials that never ended (Ctrl-C stops them without telling anyone): "interrupted"."""
        from rrscale.tracking import mlflow as tracking
        from rrscale.tracking import naming

        for trial in trials:
            run = self.runs.get(trial.trial_id, "")
            if run and trial.trial_id not in self.ended:
                self.ended.add(trial.trial_id)
                epochs = int((trial.last_result or {}).get("epoch", 0) or 0)
                description = naming.describe_trial(dict(trial.config), naming.INTERRUPTED, metric=self.metric,
                                                    epochs=epochs,
                                                    of_epochs=self.datasets.get(trial.trial_id, {}).get("epochs"))
                tracking.end_trial(run, {"stopped_at_epoch": epochs}, "interrupted", None, description=description,
                                   tracking_uri=self.uri or None)

    # Tune's hooks ---------------------------------------------------------------

    def setup(self, **info: Any) -> None:
        self._load()
        if self.parent:
            self._describe_parent()

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        if not self.strays_closed:
            self.close_strays(trials)
            self.close_unclosed(final=False)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self.interrupted(trials)
        self.close_unclosed(final=True)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.trial_start(trial)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self.trial_result(trial, result)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.trial_end(trial, failed=False)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.trial_end(trial, failed=True)

    def get_state(self) -> dict | None:
        return {"runs": self.runs, "startup": self.startup, "ended": sorted(self.ended),
                "checkpoints": self.checkpoints, "datasets": self.datasets,
                "logged_datasets": sorted(self.logged_datasets), "unclosed": self.unclosed}

    def set_state(self, state: dict) -> None:
        self.runs.update(state.get("runs", {}))
        self.startup.update(state.get("startup", {}))
        self.ended = set(state.get("ended", []))
        self.checkpoints.update(state.get("checkpoints", {}))
        self.unclosed.update(state.get("unclosed", {}))
        self.datasets.update(state.get("datasets", {}))
        self.logged_datasets.update(state.get("logged_datasets", []))


# ----------------------------------------------------------------------------- the sweep


def sweep_paths(cfg: ExperimentConfig, path: Path) -> tuple[str, str, Path]:
    """(sweep name, Tune storage path, local sweep folder for optuna.db and the summaries).

    ``tune.storage_path`` defaults to ``./runs/tune``; with a URI (``s3://...``) the local
    folder is ``~/.rrscale/sweeps/<name>-<8 hex digits of the URI>``: the same from every working
    directory (a resumed ``ray job submit`` entrypoint runs in a new one), one per storage.
    """
    import hashlib

    name = cfg.tune.name or Path(path).stem
    storage = cfg.tune.storage_path or str(Path("runs") / "tune")
    if "://" in storage:
        digest = hashlib.sha1(storage.rstrip("/").encode()).hexdigest()[:8]
        return name, storage, Path.home() / ".rrscale" / "sweeps" / f"{name}-{digest}"
    storage = str(Path(storage).expanduser().resolve())
    return name, storage, Path(storage) / name


def sweep_exists(storage: str, name: str) -> bool:
    """Whether Tune saved a sweep ``name`` in ``storage`` (a local path or a URI)."""
    import pyarrow.fs

    fs, root = trial_record.storage_fs(f"{storage.rstrip('/')}/{name}/tuner.pkl")
    try:
        return fs.get_file_info(root).type == pyarrow.fs.FileType.File
    except OSError:
        return False


def _err(msg: str) -> int:
    print(f"rrscale: error: {msg}", file=sys.stderr)
    return EXIT_BAD_INPUT


def build_tuner(cfg: ExperimentConfig, path: Path, *, resume: bool, cpus: float, gpus: float,
                requested_mode: str = "auto") -> tuple[Any, dict[str, Any]]:
    """The Tuner of a sweep (fresh or restored) and facts about it for the summary."""
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from rrscale.scale.progress import SweepProgress
    from rrscale.scale.train import absolute_data_paths

    t = cfg.tune
    name, storage, local = sweep_paths(cfg, path)
    local.mkdir(parents=True, exist_ok=True)
    cfg = absolute_data_paths(cfg)
    base = space.base_dict(cfg)
    mode = trial_mode(cfg, requested_mode)
    per_cpu, per_gpu = trial_resources(cfg, mode)
    max_conc = max(1, concurrency(cfg, cpus, gpus, mode))
    per_epoch, at_end = known_metrics(cfg)
    experiment = f"{storage.rstrip('/')}/{name}"
    opts = {"metric": t.metric, "schedule_metric": t.schedule_metric, "mode": mode,
            "train_storage": f"{experiment}/train", "trial_root": experiment, "cpus": per_cpu}
    resources = ({"cpu": per_cpu, "gpu": per_gpu} if mode == "inprocess"
                 else {"cpu": TRIAL_DRIVER_CPU, "memory": TRIAL_DRIVER_MEMORY})
    trainable = tune.with_resources(tune.with_parameters(rrscale_trial, base=base, opts=opts), resources)
    max_epochs = max(int(v) for v in _extremes(cfg, "train.epochs", cfg.train.epochs))
    facts = {"name": name, "storage": storage, "local": local, "mode": mode, "max_concurrent": max_conc,
             "cpus_per_trial": per_cpu, "gpus_per_trial": per_gpu, "base": base, "experiment": experiment}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if resume:
        # Errored trials stay failed: Optuna recorded them as FAIL, and what could succeed on
        # another attempt was retried already (scaling.max_failures).
        return tune.Tuner.restore(experiment, trainable=trainable, resume_errored=False), facts
    with warnings.catch_warnings():  # group=True is "experimental" in Optuna 5; we rely on it on purpose
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(seed=t.seed, multivariate=True, group=True)
    storage_db = optuna.storages.RDBStorage(f"sqlite:///{local / 'optuna.db'}")
    searcher = RRSearch(space=space.define_by_run(cfg.search, base), metric=t.metric, mode=t.mode,
                        sampler=sampler, study_name=name, storage=storage_db, trial_root=experiment)
    if t.scheduler == "asha":
        scheduler: Any = ASHAScheduler(time_attr="epoch", metric=t.schedule_metric,
                                       mode=per_epoch[t.schedule_metric], max_t=max(t.grace_period, max_epochs - 1),
                                       grace_period=t.grace_period, reduction_factor=t.reduction_factor,
                                       stop_last_trials=False)
    else:
        scheduler = FIFOScheduler()
    tracker = SweepTracker(str(local / STATE_FILE), base, per_cpu, per_gpu, mode, t.metric,
                           tuple(sorted(asha_stop_epochs(cfg))), schedule_metric=t.schedule_metric)
    progress = SweepProgress(num_samples=t.num_samples, epochs=max_epochs, concurrency=max_conc, metric=t.metric,
                             mode=t.mode, schedule_metric=t.schedule_metric)
    # Tune retries a trial whose process or node was lost (and I/O errors); the trial itself
    # ends failures that a retry cannot fix without raising (see rrscale_trial). A Train trial's
    # workers are retried by Ray Train (scaling.max_failures) instead.
    failures = cfg.scaling.max_failures if mode == "inprocess" else 0
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=t.num_samples,
                                    max_concurrent_trials=max_conc, trial_dirname_creator=_trial_dirname,
                                    trial_name_creator=_trial_dirname,
                                    reuse_actors=mode == "inprocess"),
        run_config=tune.RunConfig(
            name=name, storage_path=storage, callbacks=[tracker, progress],
            failure_config=tune.FailureConfig(max_failures=failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            verbose=int(os.environ.get("RRSCALE_TUNE_VERBOSE", "0")),
        ),
    )
    return tuner, facts


def _status_of(result: Any) -> str:
    m = result.metrics or {}
    if result.error is not None or m.get("status") == "failed":
        return "failed"
    return "finished" if m.get("final") else STOPPED_EARLY


def _first(result: Any, key: str) -> float | None:
    """The first value of ``key`` among all reports of a trial (e.g. its start-up time)."""
    try:
        df = result.metrics_dataframe
    except Exception:
        return None
    if df is None or key not in df:
        return None
    values = df[key].dropna()
    return float(values.iloc[0]) if len(values) else None


def asha_stop_epochs(cfg: ExperimentConfig) -> set[int]:
    """The epochs at which ASHA can stop a trial: ceil of each rung milestone (as Ray builds them)."""
    t = cfg.tune
    if t.scheduler != "asha":
        return set()
    max_epochs = max(int(v) for v in _extremes(cfg, "train.epochs", cfg.train.epochs))
    max_t = max(t.grace_period, max_epochs - 1)
    rungs = int(math.log(max_t / t.grace_period) / math.log(t.reduction_factor) + 1)
    return {math.ceil(t.grace_period * t.reduction_factor**k - 1e-9) for k in range(rungs)}


def _ended_on_record(facts: dict[str, Any], trial_id: str) -> bool:
    """Whether the driver recorded that the trial ended (RRSearch does, for every trial)."""
    return trial_record.read_json(f"{facts['experiment']}/{trial_id}/{trial_record.ENDED_FILE}") is not None


def summarize(results: Any, cfg: ExperimentConfig, facts: dict[str, Any], wall: float,
              since: float = 0.0) -> dict[str, Any]:
    """Rows per trial, the best finished trial, and counts; writes trials.csv/sweep.json.

    Tune turns Ctrl-C into a graceful stop and reports the trials it stopped like ASHA's; a
    trial that ended neither finished nor failed and has no record of its ending
    (:mod:`rrscale.scale.trial_record`) was ``interrupted`` (``--resume`` continues it), and so
    is the sweep then, or when fewer trials exist than ``tune.num_samples``.
    ``trials_per_hour`` counts the trials that ended (finished or stopped early) during this
    command (reports after ``since``, not re-reported endings) per hour of ``wall``; it is
    absent when none did.
    """
    t = cfg.tune
    rows = []
    ended_here = 0
    for r in results:
        m = r.metrics or {}
        real = m.get("metric_source", t.metric) == t.metric  # not an epoch's stand-in
        trial_id = m.get("trial_id") or Path(str(r.path)).name
        status = _status_of(r)
        if status == STOPPED_EARLY and not _ended_on_record(facts, trial_id):
            status = "interrupted"
        if (status in ("finished", STOPPED_EARLY) and float(m.get("timestamp", 0) or 0) >= since
                and not m.get("replayed")):
            ended_here += 1
        rows.append({"trial_id": trial_id, "status": status,
                     "epochs": m.get("epochs", m.get("epoch", 0)),
                     t.metric: m.get(t.metric) if real and status == "finished" else None,
                     "knn_top1": m.get("knn_top1"), "seconds": m.get("time_total_s"),
                     "startup_seconds": _first(r, "startup_seconds"),
                     **{k: v for k, v in (r.config or {}).items()}})
    finished = [row for row in rows if row["status"] == "finished" and isinstance(row[t.metric], (int, float))]
    sign = 1 if t.mode == "max" else -1
    best = max(finished, key=lambda row: sign * float(row[t.metric])) if finished else None
    counts = {s.replace(" ", "_"): sum(1 for row in rows if row["status"] == s)
              for s in ("finished", STOPPED_EARLY, "failed", "interrupted")}
    summary: dict[str, Any] = {"trials": len(rows), **counts, "wall_seconds": wall,
                               "max_concurrent_trials": facts["max_concurrent"], "trial_mode": facts["mode"],
                               "mode": t.mode}
    summary["interrupted_sweep"] = bool(counts["interrupted"]) or len(rows) < t.num_samples
    if ended_here and wall > 0:
        summary["trials_per_hour"] = ended_here / wall * 3600
    best_config: dict[str, Any] = {}
    if best is not None:
        summary[f"best_{t.metric}"] = best[t.metric]
        summary["best_trial_id"] = best["trial_id"]
        params = {k: v for k, v in best.items() if "." in k}
        best_config = space.trial_config(facts["base"], params).model_dump(mode="json", exclude={"search"})
    local: Path = facts["local"]
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    with open(local / "trials.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    write_json(local / "sweep.json", {"summary": summary, "rows": rows, "best_config": best_config})
    summary["rows"] = rows
    summary["best_config"] = best_config
    return summary


def _shown(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) and math.isfinite(value) else "-"


def _print_table(summary: dict[str, Any], metric: str) -> None:
    """The trials, best first, and one line of counts."""
    from rrscale.scale.progress import format_duration, sampled_text

    sign = -1 if summary.get("mode", "max") == "max" else 1

    def order(r: dict[str, Any]) -> tuple:
        value = r.get(metric)
        return (r["status"] != "finished", sign * value if isinstance(value, (int, float)) else 0.0)

    extra = "" if metric == "knn_top1" else f" {'knn_top1':>9}"
    print(f"{'trial':<10} {'status':<14} {'epochs':>6} {metric:>11}{extra}  sampled")
    for r in sorted(summary["rows"], key=order):
        knn = "" if metric == "knn_top1" else f" {_shown(r.get('knn_top1')):>9}"
        print(f"{r['trial_id']:<10} {r['status']:<14} {r['epochs']!s:>6} {_shown(r.get(metric)):>11}{knn}  "
              f"{sampled_text(r)}")
    parts = [f"{summary['finished']} finished", f"{summary['stopped_early']} stopped early",
             f"{summary['failed']} failed"]
    if summary.get("interrupted"):
        parts.append(f"{summary['interrupted']} interrupted")
    rate = f", {summary['trials_per_hour']:.0f} trials/hour" if "trials_per_hour" in summary else ""
    print(f"{summary['trials']} trials: {', '.join(parts)}; {format_duration(summary['wall_seconds'])}{rate}")


def resolved_experiment(cfg: ExperimentConfig, path: Path) -> ExperimentConfig:
    """``cfg`` with what a new shell would not know filled in: absolute data paths, the sweep's
    name and storage, and the tracking URI (an absolute sqlite path by default)."""
    from rrscale.config import validate
    from rrscale.scale.train import absolute_data_paths
    from rrscale.tracking.mlflow import resolve_tracking_uri

    name, storage, _ = sweep_paths(cfg, path)
    raw = absolute_data_paths(cfg).model_dump(mode="json", by_alias=True, exclude_none=True)
    raw["tune"].update({"name": name, "storage_path": storage})
    uri = resolve_tracking_uri(cfg.mlflow.tracking_uri)
    if "@" not in uri.split("://", 1)[-1].split("/", 1)[0]:  # never write credentials into a file
        raw["mlflow"]["tracking_uri"] = uri
    return validate(raw, str(path))


def run_tune(cfg: ExperimentConfig, path: Path, resume: bool = False, *, requested_mode: str = "auto",
             overrides: list[str] | tuple[str, ...] = ()) -> int:
    """Run (or with ``resume`` continue) the sweep of ``path``; returns the exit code.

    Before Ray starts: the storage folder must be writable, the sweep must (not) exist, and no
    other process may be running it (:class:`~rrscale.scale.sweep_dir.SweepLock`, held until
    the sweep ends). The resolved experiment is kept in the sweep folder
    (``experiment.yaml``), so the printed follow-up commands work in a new shell.
    """
    path = Path(path)
    name, storage, local = sweep_paths(cfg, path)
    try:
        sweep_dir.check_storage(storage, str(path))
    except ConfigError as exc:
        return _err(str(exc))

    def wrong_state() -> str:
        exists = sweep_exists(storage, name)
        if resume and not exists:
            return f"{path}: tune.name: expected an existing sweep '{name}' to resume in {storage} (none found)"
        if not resume and exists:
            return (f"{path}: tune.name: sweep '{name}' already exists in {storage}; expected --resume to "
                    f"continue it (rrscale tune --resume {local}) or another tune.name (--set tune.name=...)")
        return ""

    if wrong_state():  # checked before the lock too, so that a refused command creates nothing
        return _err(wrong_state())
    try:
        with sweep_dir.SweepLock(local):
            if wrong_state():
                return _err(wrong_state())
            return _start(cfg, path, resume, requested_mode, overrides)
    except sweep_dir.SweepBusy as exc:
        return _err(f"{path}: tune.name: sweep '{name}' is running in another process ({exc}); expected it "
                    f"to end first, or another tune.name (--set tune.name=...)")
    except KeyboardInterrupt:  # Ctrl-C before Tune took over (Ray or MLflow starting)
        print(f"rrscale: sweep '{name}' interrupted before it started", file=sys.stderr)
        return 130


def _start(cfg: ExperimentConfig, path: Path, resume: bool, requested_mode: str,
           overrides: list[str] | tuple[str, ...]) -> int:
    """Under the sweep's lock: keep the resolved experiment, start (or join) Ray, run the sweep."""
    from rrscale.scale import cluster
    from rrscale.tracking import mlflow as tracking

    name, _, local = sweep_paths(cfg, path)
    cfg = resolved_experiment(cfg, path)
    sweep_dir.write_experiment(cfg, local, source=path, overrides=list(overrides))
    tracking.quiet_logs()
    tracking.bounded_http_retries()
    info = cluster.start_or_join(num_cpus=cfg.tune.num_cpus or None, dashboard=cfg.tune.dashboard,
                                 job_name=f"rrscale tune {name}")
    print(info.describe(), flush=True)
    # Snapshot the experiment state often (a killed driver loses at most ~2 s of bookkeeping, and
    # the trial records make up for that); the forced snapshots after trial checkpoints are
    # wanted, not a bottleneck here.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # Tune's console output (experiment table, TensorBoard hint) comes even at verbose=0 from its
    # "new output" engine; the classic reporter is silent at 0, and SweepProgress prints instead.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    try:
        return _sweep(cfg, path, resume, info, requested_mode)
    finally:
        cluster.shutdown(info)


def sweep_params(cfg: ExperimentConfig) -> dict[str, str]:
    """The parent run's params: the search space and the tune settings (not base values)."""
    from rrscale.tracking.naming import sweep_params as params

    search = {k: v.model_dump(mode="json", by_alias=True, exclude_defaults=True) for k, v in cfg.search.items()}
    return params(search, cfg.tune.model_dump(mode="json"))


def sweep_description(cfg: ExperimentConfig, name: str) -> str:
    """One line for the parent run: what was searched, how, and for what."""
    t = cfg.tune
    axes = ", ".join(k.rsplit(".", 1)[-1] for k in cfg.search)
    methods = "/".join(sorted(_methods(cfg)))
    data = cfg.data.name + (f" ({cfg.data.fraction:.0%})" if cfg.data.fraction < 1 else "")
    how = f"Optuna TPE over {axes}" + (f", ASHA on {t.schedule_metric}" if t.scheduler == "asha" else "")
    return (f"Sweep {name}: {t.num_samples} trials of {methods} ({cfg.backbone.name}) on {data}; {how}; "
            f"objective {t.metric} ({t.mode})")


def _sweep(cfg: ExperimentConfig, path: Path, resume: bool, info: Any, requested_mode: str) -> int:
    from rrscale.scale import progress
    from rrscale.tracking import links
    from rrscale.tracking import mlflow as tracking
    from rrscale.tracking.report import attach_report

    name, storage, local = sweep_paths(cfg, path)
    uri = cfg.mlflow.tracking_uri or tracking.resolve_tracking_uri("")
    parent = tracking.start_sweep(cfg.mlflow.experiment, uri, name, path, sweep_params(cfg), resume,
                                  description=sweep_description(cfg, name))
    (local / STATE_FILE).write_text(json.dumps({"parent_run_id": parent, "tracking_uri": uri, "name": name}))
    tuner, facts = build_tuner(cfg, path, resume=resume, cpus=info.cpus, gpus=info.gpus,
                               requested_mode=requested_mode)
    asha = f", ASHA on {cfg.tune.schedule_metric}" if cfg.tune.scheduler == "asha" else ""
    print(f"rrscale: sweep '{name}' in {local}: {cfg.tune.num_samples} trials, {facts['max_concurrent']} at a "
          f"time ({facts['mode']}), metric {cfg.tune.metric} ({cfg.tune.mode}){asha}", flush=True)
    if parent:
        print(f"mlflow: experiment '{cfg.mlflow.experiment}' at {uri}, parent run {parent}", flush=True)
    resume_hint = f"rrscale tune --resume {shlex.quote(str(local))}"
    tic = time.time()
    try:
        results = tuner.fit()
    except KeyboardInterrupt:
        tracking.finish_sweep(parent, {}, {}, [], status="interrupted", tracking_uri=uri)
        print(f"rrscale: sweep '{name}' interrupted; continue it with: {resume_hint}", file=sys.stderr)
        return 130
    summary = summarize(results, cfg, facts, time.time() - tic, since=tic)
    interrupted = summary["interrupted_sweep"]
    if not interrupted:
        lost = close_lost_optuna_trials(local / "optuna.db", name)
        if lost:
            print(f"rrscale: {lost} Optuna trial(s) asked for just before an earlier driver died were never "
                  "run; marked FAIL in the study", flush=True)
    print()
    _print_table(summary, cfg.tune.metric)
    if interrupted:
        print(f"rrscale: sweep '{name}' interrupted; its unfinished trials continue on --resume")
    artifacts = [p for p in (local / "trials.csv", local / "sweep.json") if p.exists()]
    tracking.finish_sweep(parent, {k: v for k, v in summary.items() if k not in ("rows", "best_config")},
                          summary["best_config"], artifacts, status="interrupted" if interrupted else "FINISHED",
                          tracking_uri=uri)
    attach_report(parent, uri)
    best = next((r for r in summary["rows"] if r["trial_id"] == summary.get("best_trial_id")), None)
    if best is not None:
        print(f"best trial {best['trial_id']}: {cfg.tune.metric} {best[cfg.tune.metric]:.4f} "
              f"({progress.sampled_text(best)})")
    for line in progress.next_steps(
            experiment=cfg.mlflow.experiment, sweep=name, tracking_uri=uri if parent else "",
            ui_url=links.comparison_url(parent, uri) if parent else "", experiment_file=local / sweep_dir.EXPERIMENT_FILE,
            best={k: v for k, v in best.items() if "." in k} if best is not None else None,
            resume=resume_hint if interrupted else ""):
        print(line)
    if interrupted:
        return 130
    return EXIT_OK if summary["finished"] else EXIT_TRAINING_FAILED
