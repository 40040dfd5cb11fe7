"""Ray Train (V2): the one training loop on N DDP workers, with checkpoints and failover.

``train_loop_per_worker`` is the single worker function. It serves ``rrscale train
--workers N`` (:func:`train_with_ray`) and the multi-worker trials of ``rrscale tune``
(``rrscale.scale.tune``). Ray Train sets up the process group before it runs, so the loop
wraps the model in DDP and shards the data by rank by itself. Results leave the loop through
:class:`RayHooks`:

* every rank calls ``report`` every epoch; rank 0 adds the checkpoint (the loop's plain-dict
  state saved with ``save_checkpoint`` into a temporary folder, ``Checkpoint.from_directory``);
* ``load_state`` resumes from ``ray.train.get_checkpoint()`` after a worker failure (Ray Train
  restarts the worker group up to ``scaling.max_failures`` times), else from
  ``OUT/checkpoint.pt`` of an earlier ``rrscale train`` into the same folder;
* a failure that another attempt cannot fix (:func:`retryable` is false: divergence, bad
  config or data, a bug) ends the run with status "failed" instead of being retried: a single
  worker reports the failure and returns; with several workers the rank that failed leaves a
  marker in the run's storage folder and raises, and the restarted group (one restart) sees
  the marker, reports the failure and returns without training again. Lost workers, nodes,
  memory and I/O errors are retried up to ``scaling.max_failures`` times.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from rrscale.config import ExperimentConfig, ScalingConfig, validate
from rrscale.engine import rundir
from rrscale.engine.checkpoint import load_checkpoint, save_checkpoint
from rrscale.scale.trial_record import FAILED_FILE, FINAL_FILE, read_json, write_json

CHECKPOINT_FILE = "checkpoint.pt"
CRASH_ENV = "RRSCALE_TEST_CRASH"  # "rank=R,epoch=E,marker=PATH": test-only worker kill
METRICS_AT_END = ("probe_top1", "nmi", "acc", "ood_auroc_noise", "ood_auroc_shuffled")
STAND_IN = "knn_top1"


def retryable(exc: BaseException) -> bool:
    """Whether another attempt can succeed: a lost worker, node or device, memory, or I/O on
    shared storage. Our own deterministic failures (divergence, config or data errors, bugs)
    fail the same way every time and are not retried."""
    import ray.exceptions

    if isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)):
        return False
    if isinstance(exc, (ray.exceptions.RayError, OSError, MemoryError, torch.OutOfMemoryError)):
        return True
    return isinstance(exc, RuntimeError) and any(w in str(exc) for w in ("CUDA error", "NCCL", "Gloo"))


def one_line(exc: BaseException) -> str:
    """``Type: last line of the message``, at most 500 characters."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}"[:500]


# ----------------------------------------------------------------------------- report shaping


@dataclass
class ReportShape:
    """Makes every report of a Tune trial carry ``metric`` and ``schedule_metric``.

    Tune checks each result for both keys, OptunaSearch reads ``metric`` from every result,
    and Optuna is told the *last* value of ``metric`` for trials that ASHA stopped. So:

    * per-epoch metric (``knn_top1``, ``loss``...): reported as measured; an epoch without it
      (``train.knn_every > 1``) repeats the last value;
    * end-of-run metric (``probe_top1``, ``nmi``, ``acc``...): each epoch report carries the
      epoch's ``knn_top1`` under that name as a stand-in (same scale: top-1 fraction), and the
      final report replaces it with the real value; ``metric_source`` says which one it is
      (``"knn_top1"`` or the metric's own name).

    The final report is the loop's summary plus ``final: True`` and no ``epoch`` key (ASHA's
    ``time_attr``), so the scheduler ignores it and a trial that finished is never cut at its
    last report.
    """

    metric: str = ""
    schedule_metric: str = ""
    last: dict[str, float] = field(default_factory=dict)

    def _fill(self, out: dict[str, Any], final: bool) -> dict[str, Any]:
        for key in {k for k in (self.metric, self.schedule_metric) if k}:
            if key in out and _is_number(out[key]):
                continue
            if not final and key in METRICS_AT_END:
                out[key] = self.last.get(STAND_IN, math.nan)
            else:
                out[key] = self.last.get(key, math.nan)
        if self.metric:
            at_end = self.metric in METRICS_AT_END
            out["metric_source"] = STAND_IN if at_end and not final else self.metric
        return out

    def epoch(self, metrics: dict[str, Any]) -> dict[str, Any]:
        self.last.update({k: float(v) for k, v in metrics.items() if _is_number(v)})
        out = dict(metrics)
        out["final"] = False
        return self._fill(out, final=False)

    def final(self, summary: dict[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in summary.items() if k != "history"}
        out["final"] = True
        return self._fill(out, final=True)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


# ----------------------------------------------------------------------------- hooks


def _crash_spec() -> dict[str, str] | None:
    raw = os.environ.get(CRASH_ENV, "")
    if not raw:
        return None
    return dict(part.split("=", 1) for part in raw.split(",") if "=" in part)


def _maybe_crash(rank: int, epoch: int) -> None:
    """Test-only: ``os._exit`` this worker at the given epoch, on the first attempt only.

    It waits ``delay`` seconds first (default 3) so that Ray Train's controller has collected
    the previous epoch's report, as it would have in a run whose epochs take longer than the
    controller's poll interval; the tiny test epochs take a tenth of a second.
    """
    spec = _crash_spec()
    if not spec or int(spec.get("rank", -1)) != rank or int(spec.get("epoch", -1)) != epoch:
        return
    marker = Path(spec["marker"])
    if marker.exists():
        return
    time.sleep(float(spec.get("delay", 3)))
    marker.write_text(json.dumps({"rank": rank, "epoch": epoch, "pid": os.getpid()}))
    os._exit(17)


class RayHooks:
    """The loop's :class:`~rrscale.engine.loop.Hooks` for Ray Train workers and Tune trials.

    ``api="train"`` reports with ``ray.train.report`` (inside a TorchTrainer worker),
    ``api="tune"`` with ``ray.tune.report`` (a Tune function trial running the loop
    in-process). Optionally mirrors ``metrics.jsonl``/``checkpoint.pt`` into ``out_dir`` like
    the local hooks, shapes reports for Tune (:class:`ReportShape`) and sets Ray gauges.
    """

    def __init__(self, api: str, *, rank: int = 0, out_dir: Path | None = None,
                 shape: ReportShape | None = None, tag: str = "") -> None:
        from rrscale.engine.loop import LocalHooks
        from rrscale.scale.cluster import TrialGauges

        if api == "train":
            import ray.train as api_module
        else:
            import ray.tune as api_module
        self._api: Any = api_module
        self.in_tune = api == "tune"
        self.rank = rank
        self._last_state: dict[str, Any] | None = None
        self.local = LocalHooks(out_dir) if out_dir is not None else None
        self.shape = shape
        self.gauges = TrialGauges(tag)
        self.history: list[dict[str, Any]] = []
        self.final_payload: dict[str, Any] | None = None
        self._ready_at: float | None = None  # when the loop asked for its state: data and model built
        self.final_extra: dict[str, Any] = {}  # added to the final report (e.g. worker_nodes)

    def _send(self, payload: dict[str, Any], files: dict[str, Callable[[Path], None]] | None) -> None:
        if not files:
            self._api.report(payload)
            return
        Checkpoint = self._api.Checkpoint

        with tempfile.TemporaryDirectory(prefix="rrscale-ckpt-") as tmp:
            for name, write in files.items():
                write(Path(tmp) / name)
            self._api.report(payload, checkpoint=Checkpoint.from_directory(tmp))

    def report(self, metrics: dict[str, Any], state: dict[str, Any] | None, final: bool = False) -> None:
        if not final:
            _maybe_crash(self.rank, int(metrics.get("epoch", -1)))
        if self.local is not None:
            self.local.report(metrics, state, final)
        files: dict[str, Callable[[Path], None]] = {}
        if final:
            payload = self.shape.final(metrics) if self.shape else dict(metrics)
            payload.update(self.final_extra)
            if self.rank == 0:
                payload.setdefault("status", "ok")
                self.final_payload = dict(payload)
            if self.rank == 0 and self.in_tune:
                # An in-process trial keeps its final numbers (and the last model state) in a
                # checkpoint: a trial restarted after the driver died re-reports them instead
                # of training again, and the tracking side finds the model next to them.
                done = dict(payload)
                files[FINAL_FILE] = lambda p: p.write_text(rundir.dumps(done))
                last = self._last_state
                if last is not None:
                    files[CHECKPOINT_FILE] = lambda p: save_checkpoint(last, p)
        else:
            self.history.append(dict(metrics))
            payload = self.shape.epoch(metrics) if self.shape else dict(metrics)
            if self._ready_at is not None:
                payload["loop_ready_at"] = self._ready_at  # start-up time, once per (re)start
                self._ready_at = None
            if state is not None:
                self._last_state = state
                files[CHECKPOINT_FILE] = lambda p: save_checkpoint(state, p)
        if self.rank == 0:
            self.gauges.set(payload)
        self._send(payload, files if self.rank == 0 else None)

    def load_state(self) -> dict[str, Any] | None:
        """Ray's latest checkpoint, else (rank 0's) ``OUT/checkpoint.pt``; every rank resumes
        from rank 0's choice (broadcast), so no two ranks can start at different epochs."""
        self._ready_at = time.time()
        state = None
        if self.rank == 0:
            ckpt = self._api.get_checkpoint()
            if ckpt is not None:
                with ckpt.as_directory() as d:
                    path = Path(d) / CHECKPOINT_FILE
                    state = load_checkpoint(path) if path.exists() else None
            if state is None and self.local is not None:
                state = self.local.load_state()
        state = _broadcast_from_rank0(state)
        if state is not None:
            self.history = list(state.get("history", []))
            if self.shape is not None and self.history:
                for past in self.history:
                    self.shape.last.update({k: float(v) for k, v in past.items() if _is_number(v)})
        return state

    def report_failure(self, error: str, detail: str = "") -> dict[str, Any]:
        """The final report of a run that failed for good (every rank calls it; rank 0's
        payload counts); ``detail`` (a traceback) travels in the report, not to the console."""
        payload: dict[str, Any] = {"status": "failed", "error": error}
        if self.history:  # the epochs it completed before failing (the table and MLflow say so)
            payload["epochs"] = int(self.history[-1].get("epoch", 0))
        if detail:
            payload["traceback"] = detail[-4000:]
        if self.shape is not None:
            payload = self.shape.final(payload)
            payload["metric_source"] = "none"  # the value Tune needs under the metric's name is no score
        payload["final"] = True
        self.final_payload = dict(payload)
        files = None
        if self.rank == 0 and self.in_tune:
            failed = dict(payload)
            files = {FAILED_FILE: lambda p: p.write_text(rundir.dumps(failed))}
        self._send(payload, files)
        return payload


def _broadcast_from_rank0(obj: Any) -> Any:
    """``obj`` of rank 0 on every rank (identity without a process group)."""
    import torch.distributed as torch_dist

    if not (torch_dist.is_available() and torch_dist.is_initialized()) or torch_dist.get_world_size() == 1:
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


# ----------------------------------------------------------------------------- worker


def _set_threads(cpus: float) -> None:
    torch.set_num_threads(max(1, int(cpus)))


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any] | None:
    """Ray Train worker: build the experiment from ``config`` and run the one loop.

    ``config`` keys: ``experiment`` (the validated config as a dict), ``out_dir`` (str or
    None), ``shape`` (ReportShape fields or None), ``tag`` (trial or run name for metrics),
    ``marker`` (where a diverged run leaves its marker), ``use_gpu``, ``cpus_per_worker``.
    Returns rank 0's summary (with history) as the Train result's ``return_value``.
    """
    import ray.train
    import ray.train.torch

    from rrscale.engine.loop import run_experiment
    from rrscale.methods import TrainingDiverged

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    nodes = _gather_nodes(world)
    _set_threads(config.get("cpus_per_worker", 1.0))
    exp = validate(config["experiment"], config.get("source", "ray train"))
    out_dir = Path(config["out_dir"]) if config.get("out_dir") else None
    shape = ReportShape(**config["shape"]) if config.get("shape") else None
    hooks = RayHooks("train", rank=rank, out_dir=out_dir if rank == 0 else None, shape=shape,
                     tag=config.get("tag", ""))
    hooks.final_extra["worker_nodes"] = ",".join(str(n["node_id"]) for n in nodes)
    device = ray.train.torch.get_device() if config.get("use_gpu") else torch.device("cpu")
    marker = config.get("marker", "")
    earlier = _broadcast_from_rank0(read_json(marker) if marker and rank == 0 else None)
    if earlier is not None:
        hooks.report_failure(str(earlier.get("error", "training failed")), str(earlier.get("traceback", "")))
        return hooks.final_payload if rank == 0 else None
    try:
        summary = run_experiment(exp, hooks=hooks, out_dir=out_dir if rank == 0 else None, device=device)
    except Exception as exc:
        if retryable(exc):
            raise
        error = str(exc) if isinstance(exc, TrainingDiverged) else one_line(exc)
        if world == 1:
            hooks.report_failure(error, traceback.format_exc())
            return hooks.final_payload
        if marker:
            write_json(marker, {"error": error, "traceback": traceback.format_exc()[-4000:], "rank": rank,
                                "time": time.time()})
        raise
    if rank != 0:
        return None
    summary = dict(summary)
    summary.setdefault("history", hooks.history)
    summary["worker_nodes"] = nodes
    return summary


def _gather_nodes(world: int) -> list[dict[str, Any]]:
    """``[{rank, node_id, host, pid}]`` of every worker (one all-gather at start-up)."""
    import socket

    import ray
    import torch.distributed as torch_dist

    me = {"node_id": ray.get_runtime_context().get_node_id(), "host": socket.gethostname(), "pid": os.getpid()}
    if world == 1 or not torch_dist.is_initialized():
        return [{"rank": 0, **me}]
    gathered: list[Any] = [None] * world
    torch_dist.all_gather_object(gathered, me)
    return [{"rank": r, **g} for r, g in enumerate(gathered)]


# ----------------------------------------------------------------------------- trainer


def worker_resources(scaling: ScalingConfig) -> dict[str, float]:
    resources = {"CPU": float(scaling.cpus_per_worker)}
    if scaling.use_gpu:
        resources["GPU"] = float(scaling.gpus_per_worker or 1.0)
    return resources


def make_trainer(
    exp: ExperimentConfig,
    num_workers: int,
    *,
    storage_path: str,
    name: str,
    out_dir: Path | None = None,
    shape: ReportShape | None = None,
    tag: str = "",
    callbacks: list[Any] | None = None,
) -> Any:
    """A TorchTrainer running :func:`train_loop_per_worker` with ``exp``'s scaling section."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train import ScalingConfig as RayScalingConfig
    from ray.train.torch import TorchTrainer

    from rrscale.scale.cluster import worker_env

    scaling = exp.scaling
    marker = f"{storage_path.rstrip('/')}/{name}/rrscale-{FAILED_FILE}"
    loop_config = {
        "experiment": exp.model_dump(mode="json", exclude={"search"}),
        "source": f"ray run {name}",
        "out_dir": str(out_dir) if out_dir is not None else None,
        "shape": {"metric": shape.metric, "schedule_metric": shape.schedule_metric} if shape else None,
        "tag": tag or name,
        "marker": marker,
        "use_gpu": scaling.use_gpu,
        "cpus_per_worker": scaling.cpus_per_worker,
    }
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=RayScalingConfig(num_workers=num_workers, use_gpu=scaling.use_gpu,
                                        resources_per_worker=worker_resources(scaling)),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=scaling.max_failures, controller_failure_limit=2),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
            worker_runtime_env={"env_vars": worker_env()},
        ),
    )


def absolute_data_paths(exp: ExperimentConfig) -> ExperimentConfig:
    """Relative ``data.root``/``probe_root`` resolved against this (driver) process' cwd.

    Ray workers and Tune trials run in other folders, so a relative path must not travel.
    """
    data = exp.data
    updates = {}
    for key in ("root", "probe_root"):
        value = getattr(data, key)
        if value and "://" not in value and not os.path.isabs(value):
            updates[key] = str(Path(value).resolve())
    if not updates:
        return exp
    raw = exp.model_dump(mode="json")
    raw["data"].update(updates)
    return validate(raw, "(resolved data paths)")


def train_with_ray(cfg: ExperimentConfig, out_dir: Path, num_workers: int) -> dict[str, Any]:
    """``rrscale train --workers N``: the experiment on N Ray Train workers; returns the summary.

    Starts a local Ray with explicit ``num_cpus`` (or joins ``$RAY_ADDRESS``), writes
    ``OUT/summary.json`` (same keys as the local path), ``OUT/config.json``, and through rank 0
    ``OUT/metrics.jsonl`` and ``OUT/checkpoint.pt``. The Train run itself lives under
    ``scaling.storage_path`` (default ``OUT/ray``), named after OUT plus a short id.
    """
    from rrscale.scale import cluster

    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = absolute_data_paths(cfg)
    scaling = cfg.scaling
    rundir.write_json(out_dir / "config.json", cfg.model_dump(mode="json"))
    need_cpus = cluster.cpus_needed(num_workers, scaling.cpus_per_worker)
    info = cluster.start_or_join(num_cpus=max(need_cpus, os.cpu_count() or 1))
    storage = scaling.storage_path or str(out_dir / "ray")
    name = f"{out_dir.name}-{uuid.uuid4().hex[:6]}"
    try:
        trainer = make_trainer(cfg, num_workers, storage_path=storage, name=name, out_dir=out_dir, tag=name)
        summary = _fit(trainer)
    finally:
        if info.started:
            cluster.shutdown(info)
    summary.setdefault("workers", num_workers)
    summary["ray_run"] = f"{storage.rstrip('/')}/{name}"
    rundir.write_json(out_dir / "summary.json", summary)
    return summary


def _fit(trainer: Any) -> dict[str, Any]:
    from ray.train import TrainingFailedError

    try:
        result = trainer.fit()
    except TrainingFailedError as exc:
        return {"status": "failed", "error": one_line(exc)}
    summary = result.return_value
    if not isinstance(summary, dict):
        summary = {k: v for k, v in (result.metrics or {}).items()}
    summary = dict(summary)
    summary.setdefault("status", "ok")
    return summary


__all__ = ["ReportShape", "RayHooks", "make_trainer", "retryable", "one_line", "train_loop_per_worker",
           "train_with_ray", "worker_resources", "absolute_data_paths"]
