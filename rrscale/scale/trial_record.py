"""What a trial's storage folder says about how the trial ended, read and written on any storage.

A sweep keeps three records of every trial: Ray Tune's experiment snapshot, the Optuna study
(``optuna.db``) and the MLflow run. They are written one after another, so a driver killed at
the wrong instant leaves them disagreeing: Tune's snapshot (saved every couple of seconds)
lags the Optuna study, which is written the moment a trial ends. rrscale therefore writes a
fourth record *first*, in the trial's own folder under the Tune storage path:

* the trial itself leaves ``final.json`` (finished, with its final numbers) or ``failed.json``
  (a failure that another attempt cannot fix) in the checkpoint of its last report;
* the driver writes ``rrscale-ended.json`` (finished / stopped early / failed, with the last
  result) before it tells Optuna how the trial ended.

A trial that Tune restarts after a resume reads these first and, if the trial had already
ended, reports that ending again instead of training (:func:`ending_of`); Optuna, Tune and
MLflow then all catch up with the folder. The folder is on shared storage in a multi-node
sweep (a local path or a ``scheme://`` URI, through pyarrow's filesystems), so the driver and
a trial on another node see the same files.
"""

from __future__ import annotations

import json
import math
from typing import Any

from rrscale.engine.rundir import json_safe

ENDED_FILE = "rrscale-ended.json"
FINAL_FILE = "final.json"
FAILED_FILE = "failed.json"
#: Keys Ray Tune adds to every result; a replayed result leaves them to Tune.
TUNE_AUTO_KEYS = frozenset({
    "timestamp", "pid", "time_this_iter_s", "time_total_s", "training_iteration", "iterations_since_restore",
    "time_since_restore", "done", "date", "hostname", "node_ip", "trial_id", "experiment_tag", "config",
    "checkpoint_dir_name", "should_checkpoint", "loop_ready_at",
})


def storage_fs(path: str) -> tuple[Any, str]:
    """(pyarrow filesystem, path inside it) for a local path or a ``scheme://`` URI."""
    import pyarrow.fs

    if "://" in path:
        return pyarrow.fs.FileSystem.from_uri(path)
    return pyarrow.fs.LocalFileSystem(), path


def read_json(path: str) -> dict[str, Any] | None:
    """The JSON object at ``path``, or ``None`` when there is none (or it is unreadable)."""
    import pyarrow.fs

    fs, p = storage_fs(path)
    try:
        if fs.get_file_info(p).type != pyarrow.fs.FileType.File:
            return None
        with fs.open_input_stream(p) as fh:
            value = json.loads(fh.read().decode())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def write_json(path: str, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` (folders created); local files are replaced atomically."""
    fs, p = storage_fs(path)
    parent = p.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    data = json.dumps(json_safe(payload), allow_nan=False, default=_plain).encode()
    tmp = f"{p}.tmp"
    with fs.open_output_stream(tmp) as fh:
        fh.write(data)
    fs.move(tmp, p)


def _plain(value: Any) -> Any:
    item = getattr(value, "item", None)
    return json_safe(item()) if callable(item) else str(value)


def replayable(result: dict[str, Any] | None) -> dict[str, Any]:
    """A Tune result without Tune's own keys and flattened config, with NaN as ``None``."""
    out = {}
    for key, value in (result or {}).items():
        if key in TUNE_AUTO_KEYS or key.startswith("config/") or isinstance(value, (dict, list)):
            continue
        out[key] = None if isinstance(value, float) and not math.isfinite(value) else value
    return out


def outcome(result: dict[str, Any] | None, error: bool) -> str:
    """``finished``, ``stopped early`` or ``failed`` for the last result of a trial that ended."""
    if error or (result or {}).get("status") == "failed":
        return "failed"
    return "finished" if (result or {}).get("final") else "stopped early"


def record_ending(trial_dir: str, result: dict[str, Any] | None, error: bool) -> None:
    """The driver's record of how a trial ended (see the module doc); never raises."""
    try:
        write_json(f"{trial_dir.rstrip('/')}/{ENDED_FILE}",
                   {"status": outcome(result, error), "result": replayable(result)})
    except Exception as exc:  # noqa: BLE001 - a missing record costs a re-run, never the sweep
        import sys

        print(f"rrscale: warning: could not record the end of trial {trial_dir}: {exc}", file=sys.stderr)


def _checkpoint_dirs(trial_dir: str) -> list[str]:
    import pyarrow.fs

    fs, p = storage_fs(trial_dir)
    try:
        infos = fs.get_file_info(pyarrow.fs.FileSelector(p, allow_not_found=True))
    except OSError:
        return []
    names = sorted(i.base_name for i in infos
                   if i.type == pyarrow.fs.FileType.Directory and i.base_name.startswith("checkpoint_"))
    prefix = trial_dir.rstrip("/")
    return [f"{prefix}/{name}" for name in reversed(names)]


def ending_of(trial_dir: str) -> tuple[str, dict[str, Any]] | None:
    """How the trial in ``trial_dir`` already ended, as (status, result to report again), or
    ``None`` when it has not ended. The driver's record wins; else a ``final.json`` /
    ``failed.json`` in any of the trial's checkpoints (Tune's restored checkpoint may be an
    older one when the driver died right after the trial's last report)."""
    ended = read_json(f"{trial_dir.rstrip('/')}/{ENDED_FILE}")
    if ended is not None and isinstance(ended.get("result"), dict):
        return str(ended.get("status", "finished")), ended["result"]
    for ckpt in _checkpoint_dirs(trial_dir):
        failed = read_json(f"{ckpt}/{FAILED_FILE}")
        if failed is not None:
            return "failed", failed
        final = read_json(f"{ckpt}/{FINAL_FILE}")
        if final is not None:
            return "finished", final
    return None
