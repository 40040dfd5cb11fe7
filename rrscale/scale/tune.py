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
* Resume (``--resume``): ``Tuner.restore(sweep_dir, trainable=..., resume_errored=True)``
  restores trials, searcher and scheduler; the Optuna study lives in sqlite, finished trials
  are never re-run and an in-process trial that had already finished but whose completion
  the killed driver had not yet saved re-reports its stored final numbers instead of training
  again. Train runs inside trials resume by ``(storage_path, trial id)``.
* Tracking: :class:`SweepTracker` (a Tune callback on the driver) calls
  :mod:`rrscale.tracking.mlflow`: one parent run per sweep, a child run per trial.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from ray.tune import Callback
from ray.tune.search.optuna import OptunaSearch

from rrscale.config import ConfigError, ExperimentConfig
from rrscale.scale import space

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_TRAINING_FAILED = 3

#: Metrics every run reports each epoch, by direction; plus per method.
PER_EPOCH = {"loss": "min", "knn_top1": "max"}
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
    "gedi": {"nmi": "max", "acc": "max", "ood_auroc_noise": "max", "clusters_used": "max", "collapsed": "min"},
}
#: What a trial that only drives a TorchTrainer holds: no CPU (its Train workers hold theirs;
#: even a tiny CPU share would leave a 1-CPU node unable to place its worker) and a memory
#: reservation, which also makes it a valid Ray resource request.
TRIAL_DRIVER_CPU = 0.0
TRIAL_DRIVER_MEMORY = 256 * 2**20
STATE_FILE = "rrscale-sweep.json"
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


def _trial(config: dict[str, Any], base: dict[str, Any], opts: dict[str, Any]) -> None:
    """The Tune function trainable: one trial of the sweep."""
    import ray.tune

    from rrscale.engine.loop import pick_device, run_experiment
    from rrscale.methods import TrainingDiverged
    from rrscale.scale.train import (
        DIVERGED_FILE,
        FINAL_FILE,
        RayHooks,
        ReportShape,
        TrialDiverged,
        _fit,
        _set_threads,
        checkpoint_file,
        make_trainer,
    )

    trial_id = ray.tune.get_context().get_trial_id()
    exp = space.trial_config(base, config, source=f"trial {trial_id}")
    shape = ReportShape(metric=opts["metric"], schedule_metric=opts["schedule_metric"])
    ckpt = ray.tune.get_checkpoint()
    failed = checkpoint_file(ckpt, DIVERGED_FILE)
    if failed is not None:
        raise TrialDiverged(str(failed.get("error", "training diverged")))
    done = checkpoint_file(ckpt, FINAL_FILE)
    if done is not None:  # finished before the driver died: say so again, do not retrain
        ray.tune.report(done)
        return
    if opts["mode"] == "trainer":
        from ray.tune.integration.ray_train import TuneReportCallback

        trainer = make_trainer(exp, max(1, exp.scaling.num_workers), storage_path=opts["train_storage"],
                               name=trial_id, shape=shape, tag=trial_id, callbacks=[TuneReportCallback()])
        summary = _fit(trainer)
        if summary.get("status") != "ok":
            raise TrialDiverged(str(summary.get("error", "training failed")))
        return
    _set_threads(opts["cpus"])
    hooks = RayHooks("tune", shape=shape, tag=trial_id)
    try:
        run_experiment(exp, hooks=hooks, device=pick_device(exp.train.device))
    except TrainingDiverged as exc:
        hooks.report_failure(str(exc))
        raise TrialDiverged(str(exc)) from None


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
    finished trials carry COMPLETE values of ``tune.metric``.
    """

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if result is not None and not error and not result.get("final"):
            result = {k: v for k, v in result.items() if k != self.metric}
        super().on_trial_complete(trial_id, result=result, error=error)


class SweepTracker(Callback):
    """Tune callback on the driver: ``start_trial`` / ``log_epoch`` / ``end_trial`` of
    :mod:`rrscale.tracking.mlflow` for every trial.

    Plain attributes only: Tune pickles it with the Tuner. The parent run id is read from the
    sweep's state file at ``setup`` (so a restored Tuner uses the run that ``start_sweep``
    found again), and the trial -> run map is part of Tune's callback state.
    """

    def __init__(self, state_file: str, base: dict[str, Any], cpus: float, gpus: float, mode: str,
                 metric: str) -> None:
        self.state_file = state_file
        self.metric = metric
        self.base = base
        self.cpus = cpus
        self.gpus = gpus
        self.mode = mode
        self.parent = ""
        self.uri = ""
        self.runs: dict[str, str] = {}
        self.started_at: dict[str, float] = {}
        self.startup: dict[str, float] = {}
        self.ended: set[str] = set()
        self.checkpoints: dict[str, str] = {}

    def _load(self) -> None:
        try:
            state = json.loads(Path(self.state_file).read_text())
        except (OSError, ValueError):
            return
        self.parent = state.get("parent_run_id", "")
        self.uri = state.get("tracking_uri", "")

    def trial_start(self, trial: Any) -> None:
        from rrscale.tracking import mlflow as tracking

        self.started_at[trial.trial_id] = time.time()
        self.ended.discard(trial.trial_id)
        if not self.parent:
            self._load()
        try:
            exp = space.trial_config(self.base, dict(trial.config), source=f"trial {trial.trial_id}")
            params = exp.model_dump(mode="json", exclude={"search", "tune", "mlflow"})
            tags = {"rrscale.config_hash": exp.config_hash(), "rrscale.seed": exp.train.seed,
                    "rrscale.method": exp.method.name, "rrscale.dataset": exp.data.name,
                    "rrscale.trial_mode": self.mode, "rrscale.sampled": json.dumps(dict(trial.config), default=str)}
        except Exception as exc:  # tracking never kills training
            params, tags = dict(trial.config), {"rrscale.tracking_note": f"config: {exc}"}
        self.runs[trial.trial_id] = tracking.start_trial(self.parent, trial.trial_id, params, tags,
                                                         tracking_uri=self.uri or None)

    def trial_result(self, trial: Any, result: dict[str, Any]) -> None:
        from rrscale.tracking import mlflow as tracking

        ready = result.get("loop_ready_at")
        start = self.started_at.get(trial.trial_id)
        if isinstance(ready, (int, float)) and start is not None and trial.trial_id not in self.startup:
            self.startup[trial.trial_id] = float(ready) - start
            result["startup_seconds"] = self.startup[trial.trial_id]
        if result.get("checkpoint_path"):  # a Train run's checkpoint, forwarded by TuneReportCallback
            self.checkpoints[trial.trial_id] = str(result["checkpoint_path"])
        if result.get("final") or "epoch" not in result:
            return
        run = self.runs.get(trial.trial_id, "")
        tracking.log_epoch(run, _numbers(result, self.metric), int(result["epoch"]), tracking_uri=self.uri or None)

    def trial_end(self, trial: Any, failed: bool) -> None:
        from rrscale.tracking import mlflow as tracking

        if trial.trial_id in self.ended:
            return
        self.ended.add(trial.trial_id)
        last = dict(trial.last_result or {})
        summary = _numbers(last, self.metric)
        for key in ("status", "error", "data_fingerprint", "device", "config_hash"):
            if isinstance(last.get(key), str):
                summary[key] = last[key]
        seconds = float(last.get("time_total_s", 0.0) or 0.0)
        summary["cpu_seconds"] = seconds * self.cpus
        summary["gpu_seconds"] = seconds * self.gpus
        if trial.trial_id in self.startup:
            summary["startup_seconds"] = self.startup[trial.trial_id]
        if failed:
            status = "FAILED"
        elif last.get("final") and last.get("status", "ok") == "ok":
            status = "FINISHED"
        else:
            status = "EARLY_STOPPED"
            summary["stopped_at_epoch"] = last.get("epoch", 0)
        ckpt_dir = None
        path = (self.checkpoints.get(trial.trial_id)
                or (trial.checkpoint.path if trial.checkpoint is not None else None))
        if path and "://" not in str(path) and Path(path).exists():
            ckpt_dir = Path(path)
        run = self.runs.get(trial.trial_id, "")
        tracking.end_trial(run, summary, status, ckpt_dir if not failed else None, tracking_uri=self.uri or None)


    # Tune's hooks ---------------------------------------------------------------

    def setup(self, **info: Any) -> None:
        self._load()

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
                "checkpoints": self.checkpoints}

    def set_state(self, state: dict) -> None:
        self.runs.update(state.get("runs", {}))
        self.startup.update(state.get("startup", {}))
        self.ended = set(state.get("ended", []))
        self.checkpoints.update(state.get("checkpoints", {}))


# ----------------------------------------------------------------------------- the sweep


def sweep_paths(cfg: ExperimentConfig, path: Path) -> tuple[str, str, Path]:
    """(sweep name, Tune storage path, local sweep folder for optuna.db and the summaries).

    ``tune.storage_path`` defaults to ``./runs/tune``; with a URI (``s3://...``) the local
    folder is ``./.rrscale/sweeps/<name>``.
    """
    name = cfg.tune.name or Path(path).stem
    storage = cfg.tune.storage_path or str(Path("runs") / "tune")
    if "://" in storage:
        return name, storage, (Path(".rrscale") / "sweeps" / name).resolve()
    storage = str(Path(storage).expanduser().resolve())
    return name, storage, Path(storage) / name


def _err(msg: str) -> int:
    print(f"rrscale: error: {msg}", file=sys.stderr)
    return EXIT_BAD_INPUT


def build_tuner(cfg: ExperimentConfig, path: Path, *, resume: bool, cpus: float, gpus: float,
                requested_mode: str = "auto") -> tuple[Any, dict[str, Any]]:
    """The Tuner of a sweep (fresh or restored) and facts about it for the summary."""
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
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
    opts = {"metric": t.metric, "schedule_metric": t.schedule_metric, "mode": mode,
            "train_storage": f"{storage.rstrip('/')}/{name}/train", "cpus": per_cpu}
    resources = ({"cpu": per_cpu, "gpu": per_gpu} if mode == "inprocess"
                 else {"cpu": TRIAL_DRIVER_CPU, "memory": TRIAL_DRIVER_MEMORY})
    trainable = tune.with_resources(tune.with_parameters(_trial, base=base, opts=opts), resources)
    facts = {"name": name, "storage": storage, "local": local, "mode": mode, "max_concurrent": max_conc,
             "cpus_per_trial": per_cpu, "gpus_per_trial": per_gpu, "base": base}
    if resume:
        return tune.Tuner.restore(f"{storage.rstrip('/')}/{name}", trainable=trainable, resume_errored=True), facts
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with warnings.catch_warnings():  # group=True is "experimental" in Optuna 5; we rely on it on purpose
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(seed=t.seed, multivariate=True, group=True)
    storage_db = optuna.storages.RDBStorage(f"sqlite:///{local / 'optuna.db'}")
    searcher = RRSearch(space=space.define_by_run(cfg.search, base), metric=t.metric, mode=t.mode,
                            sampler=sampler, study_name=name, storage=storage_db)
    max_epochs = max(int(v) for v in _extremes(cfg, "train.epochs", cfg.train.epochs))
    if t.scheduler == "asha":
        scheduler: Any = ASHAScheduler(time_attr="epoch", metric=t.schedule_metric,
                                       mode=per_epoch[t.schedule_metric], max_t=max(t.grace_period, max_epochs - 1),
                                       grace_period=t.grace_period, reduction_factor=t.reduction_factor,
                                       stop_last_trials=False)
    else:
        scheduler = FIFOScheduler()
    tracker = SweepTracker(str(local / STATE_FILE), base, per_cpu, per_gpu, mode, t.metric)
    failures = cfg.scaling.max_failures if mode == "inprocess" else 0
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=t.num_samples,
                                    max_concurrent_trials=max_conc, trial_dirname_creator=_trial_dirname,
                                    trial_name_creator=_trial_dirname,
                                    reuse_actors=mode == "inprocess"),
        run_config=tune.RunConfig(
            name=name, storage_path=storage, callbacks=[tracker],
            failure_config=tune.FailureConfig(max_failures=failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            verbose=int(os.environ.get("RRSCALE_TUNE_VERBOSE", "1")),
        ),
    )
    return tuner, facts


def _status_of(result: Any) -> str:
    m = result.metrics or {}
    if result.error is not None or m.get("status") == "failed":
        return "failed"
    return "finished" if m.get("final") else "early_stopped"


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


def was_interrupted(results: Any, cfg: ExperimentConfig) -> bool:
    """Tune turns Ctrl-C into a graceful stop and returns normally. A sweep was cut short when
    fewer trials ended than asked, or when a trial ended neither finished, failed, nor at an
    epoch where ASHA could have stopped it."""
    if results.num_terminated + results.num_errors < cfg.tune.num_samples:
        return True
    stops = asha_stop_epochs(cfg)
    for r in results:
        m = r.metrics or {}
        if r.error is None and not m.get("final") and int(m.get("epoch", 0) or 0) not in stops:
            return True
    return False


def summarize(results: Any, cfg: ExperimentConfig, facts: dict[str, Any], wall: float,
              interrupted: bool = False) -> dict[str, Any]:
    """Rows per trial, the best finished trial, and counts; writes trials.csv/sweep.json.

    After an interrupt Tune reports the trials it stopped like ASHA's; those rows say
    ``unfinished`` (``--resume`` continues the ones ASHA had not stopped).
    """
    t = cfg.tune
    rows = []
    for r in results:
        m = r.metrics or {}
        real = m.get("metric_source", t.metric) == t.metric  # not an epoch's stand-in
        trial_id = m.get("trial_id") or Path(str(r.path)).name
        status = _status_of(r)
        if interrupted and status == "early_stopped":
            status = "unfinished"
        rows.append({"trial_id": trial_id, "status": status,
                     "epochs": m.get("epochs", m.get("epoch", 0)), t.metric: m.get(t.metric) if real else None,
                     "knn_top1": m.get("knn_top1"), "seconds": m.get("time_total_s"),
                     "startup_seconds": _first(r, "startup_seconds"),
                     **{k: v for k, v in (r.config or {}).items()}})
    finished = [row for row in rows if row["status"] == "finished" and isinstance(row[t.metric], (int, float))]
    sign = 1 if t.mode == "max" else -1
    best = max(finished, key=lambda row: sign * float(row[t.metric])) if finished else None
    counts = {s: sum(1 for row in rows if row["status"] == s)
              for s in ("finished", "early_stopped", "failed", "unfinished")}
    summary = {"trials": len(rows), **counts, "wall_seconds": wall,
               "trials_per_hour": len(rows) / wall * 3600 if wall > 0 else 0.0,
               "max_concurrent_trials": facts["max_concurrent"], "trial_mode": facts["mode"], "mode": t.mode}
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
    (local / "sweep.json").write_text(json.dumps({"summary": summary, "rows": rows, "best_config": best_config},
                                                 indent=2, default=str) + "\n")
    summary["rows"] = rows
    summary["best_config"] = best_config
    return summary


def _shown(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) and math.isfinite(value) else "-"


def _print_table(summary: dict[str, Any], metric: str) -> None:
    sign = -1 if summary.get("mode", "max") == "max" else 1

    def order(r: dict[str, Any]) -> tuple:
        value = r.get(metric)
        return (r["status"] != "finished", sign * value if isinstance(value, (int, float)) else 0.0)

    extra = "" if metric == "knn_top1" else f" {'knn_top1':>9}"
    print(f"{'trial':<10} {'status':<14} {'epochs':>6} {metric:>11}{extra}  sampled")
    for r in sorted(summary["rows"], key=order):
        sampled = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items() if "." in k)
        knn = "" if metric == "knn_top1" else f" {_shown(r.get('knn_top1')):>9}"
        print(f"{r['trial_id']:<10} {r['status']:<14} {r['epochs']!s:>6} {_shown(r.get(metric)):>11}{knn}  {sampled}")
    unfinished = f", {summary['unfinished']} unfinished" if summary.get("unfinished") else ""
    print(f"{summary['trials']} trials: {summary['finished']} finished, {summary['early_stopped']} stopped early "
          f"by ASHA, {summary['failed']} failed{unfinished}; {summary['trials_per_hour']:.1f} trials/hour")


def run_tune(cfg: ExperimentConfig, path: Path, resume: bool = False, *, requested_mode: str = "auto") -> int:
    """Run (or with ``resume`` continue) the sweep of ``path``; returns the exit code."""
    from rrscale.scale import cluster

    path = Path(path)
    name, storage, local = sweep_paths(cfg, path)
    exists = (local / "tuner.pkl").exists()
    if resume and not exists:
        return _err(f"{path}: tune.name: expected an existing sweep '{name}' to resume in {storage} (none found)")
    if not resume and exists:
        return _err(f"{path}: tune.name: sweep '{name}' already exists in {storage}; expected --resume to "
                    f"continue it or another tune.name (--set tune.name=...)")
    info = cluster.start_or_join(num_cpus=cfg.tune.num_cpus or None, dashboard=cfg.tune.dashboard)
    print(info.describe(), flush=True)
    # Snapshot the experiment state often (a killed driver loses at most ~2 s of bookkeeping);
    # the forced snapshots after trial checkpoints are wanted, not a bottleneck here.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    try:
        return _sweep(cfg, path, resume, info, requested_mode)
    finally:
        cluster.shutdown(info)


def _sweep(cfg: ExperimentConfig, path: Path, resume: bool, info: Any, requested_mode: str) -> int:
    from rrscale.tracking import mlflow as tracking

    name, storage, local = sweep_paths(cfg, path)
    local.mkdir(parents=True, exist_ok=True)
    uri = tracking.resolve_tracking_uri(cfg.mlflow.tracking_uri)
    base = space.base_dict(cfg)
    parent = tracking.start_sweep(cfg.mlflow.experiment, uri, name, path, base, resume)
    (local / STATE_FILE).write_text(json.dumps({"parent_run_id": parent, "tracking_uri": uri, "name": name}))
    tuner, facts = build_tuner(cfg, path, resume=resume, cpus=info.cpus, gpus=info.gpus,
                               requested_mode=requested_mode)
    asha = f", ASHA on {cfg.tune.schedule_metric}" if cfg.tune.scheduler == "asha" else ""
    print(f"rrscale: sweep '{name}' in {storage}/{name}: {cfg.tune.num_samples} trials, "
          f"{facts['max_concurrent']} at a time ({facts['mode']}), metric {cfg.tune.metric} ({cfg.tune.mode}){asha}",
          flush=True)
    tic = time.time()
    try:
        results = tuner.fit()
    except KeyboardInterrupt:
        tracking.finish_sweep(parent, {"interrupted": 1}, {}, [], status="KILLED", tracking_uri=uri)
        print(f"rrscale: sweep '{name}' interrupted; continue it with: rrscale tune {path} --resume",
              file=sys.stderr)
        return 130
    interrupted = was_interrupted(results, cfg)
    summary = summarize(results, cfg, facts, time.time() - tic, interrupted)
    _print_table(summary, cfg.tune.metric)
    artifacts = [p for p in (local / "trials.csv", local / "sweep.json") if p.exists()]
    tracking.finish_sweep(parent, {k: v for k, v in summary.items() if k not in ("rows", "best_config")},
                          summary["best_config"], artifacts, status="KILLED" if interrupted else "FINISHED",
                          tracking_uri=uri)
    if interrupted:
        print(f"rrscale: sweep '{name}' interrupted; continue it with: rrscale tune {path} --resume",
              file=sys.stderr)
        return 130
    best = next((r for r in summary["rows"] if r["trial_id"] == summary.get("best_trial_id")), None)
    if best is not None:
        sets = " ".join(f"--set {k}={v}" for k, v in best.items() if "." in k)
        print(f"best trial {best['trial_id']}: {cfg.tune.metric}={best[cfg.tune.metric]:.4f}; "
              f"run it alone with: rrscale train {path} {sets}")
    return EXIT_OK if summary["finished"] else EXIT_TRAINING_FAILED
