"""MLflow runs for sweeps: one parent run per sweep, one nested child run per trial.

Every function talks to MLflow through an explicit :class:`mlflow.tracking.MlflowClient` for
one tracking URI: no fluent ``mlflow.start_run`` state, no active-run stack, so a long-lived
Tune driver can keep many trial runs open at once (and an exported ``MLFLOW_RUN_ID``, which
only the fluent API reads, cannot hijack the nesting). Nesting is the ``mlflow.parentRunId``
tag, which the MLflow UI and ``search_runs(filter_string="tags.mlflow.parentRunId = '...'")``
both understand.

Tracking must never kill training. Every public function catches its own failures, logs one
warning through :mod:`logging` and returns something harmless: run ids are ``""`` when the
backend is down, and every function that takes a run id does nothing for ``""``.

A dead HTTP server is the expensive failure: MLflow's client retries 7 times with exponential
back-off, about 4 minutes per call on a refused connection. So:

* :func:`start_sweep` first checks that an HTTP(S) server answers at all (a TCP connection and
  one GET within :data:`REACH_TIMEOUT_S`); when it does not, it says so once and the sweep runs
  untracked;
* :func:`bounded_http_retries` lowers MLflow's retries and time-out for the driver (unless the
  user set them), so one failing call costs seconds;
* a call that fails without an answer from the server (no :class:`RestException`) makes the
  module check the server again; a server that is gone is marked down for :data:`COOLDOWN_S`
  seconds (one warning), calls against it are skipped, and after that the next call checks
  again, so tracking resumes when the server is back. A call that fails slowly for any other
  reason (:data:`SLOW_FAILURE_S` or more) trips the same breaker.

A sqlite store is created (tables, migrations) by the first client of a process; two sweeps
starting together on a new ``mlflow.db`` would race on that and one would lose its record, so
the first client of a sqlite URI is made under an exclusive ``fcntl`` lock on
``<db>.lock`` next to the database.

The functions that take only a run id find its tracking URI in a small in-process map filled
by :func:`start_sweep` / :func:`start_trial` (falling back to :func:`resolve_tracking_uri`
with no configured URI); each also takes an explicit ``tracking_uri=`` keyword.

What a run reads like (names, descriptions, metric sections, outcome words, the parent's
search-space params) is decided in :mod:`rrscale.tracking.naming`; this module writes it.

This module must not import ray: the Ray side calls it with plain dicts.
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import json
import logging
import numbers
import os
import re
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, TypeVar
from urllib.parse import unquote, urlparse

from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag, ViewType
from mlflow.exceptions import RestException
from mlflow.tracking import MlflowClient

from rrscale import __version__
from rrscale.config import flatten
from rrscale.floats import plain_float
from rrscale.tracking import naming

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Longest parameter value written. MLflow 3.17 accepts 6000 characters, but older tracking
#: servers (and some SQL schemas still deployed) stop at 500, and a sweep should log the same
#: values wherever it runs. Longer values are cut and end with ``...``.
PARAM_VALUE_LIMIT = 500
#: Longest tag value written (MLflow's limit is 8000).
TAG_VALUE_LIMIT = 5000
#: MLflow's limit on metric / param / tag names.
KEY_LIMIT = 250
#: A failure that took at least this long (retries, time-outs) marks the URI as down ...
SLOW_FAILURE_S = 5.0
#: ... for this many seconds, during which calls against it are skipped.
COOLDOWN_S = 30.0
#: How long the reachability check of an HTTP(S) tracking server may take.
REACH_TIMEOUT_S = 3.0
#: MLflow's HTTP client settings for the driver, unless the environment sets them: two retries
#: (about 2-4 s on a refused connection instead of ~4 minutes) and a 30 s socket time-out.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
#: How long to wait for another process that is creating the same sqlite store.
STORE_LOCK_TIMEOUT_S = 120.0

ROLE_TAG = "rrscale.role"
SWEEP_TAG = "rrscale.sweep"
TRIAL_TAG = "rrscale.trial_id"
PARENT_TAG = "mlflow.parentRunId"
GIT_TAG = "rrscale.git_sha"
VERSION_TAG = "rrscale.version"
#: The outcome word of a run (:data:`rrscale.tracking.naming.OUTCOMES`); the MLflow status alone
#: cannot say "stopped early" (a trial ASHA stopped ends FINISHED, as in Ray's own MLflow logger).
STATUS_TAG = "rrscale.status"
#: MLflow's run description (shown on the run page and as the runs table's Description column).
NOTE_TAG = "mlflow.note.content"

_FINISHED = ("FINISHED", naming.FINISHED)
_STOPPED = ("FINISHED", naming.STOPPED_EARLY)
_FAILED = ("FAILED", naming.FAILED)
_INTERRUPTED = ("KILLED", naming.INTERRUPTED)
#: A status word (ours, Ray's, Optuna's) -> (MLflow run status, outcome word).
_STATUS = {
    "FINISHED": _FINISHED, "TERMINATED": _FINISHED, "COMPLETED": _FINISHED, "COMPLETE": _FINISHED,
    "SUCCESS": _FINISHED, "OK": _FINISHED,
    "EARLY_STOPPED": _STOPPED, "STOPPED_EARLY": _STOPPED, "STOPPED EARLY": _STOPPED, "STOPPED": _STOPPED,
    "PRUNED": _STOPPED,
    "FAILED": _FAILED, "ERROR": _FAILED, "ERRORED": _FAILED,
    "KILLED": _INTERRUPTED, "CANCELLED": _INTERRUPTED, "INTERRUPTED": _INTERRUPTED,
}
_BAD_KEY_CHARS = re.compile(r"[^\w.\- /:]")
_SAFE_FILTER_VALUE = re.compile(r"^[\w.\-:]+$")

_lock = threading.Lock()
_clients: dict[str, MlflowClient] = {}
_run_uri: dict[str, str] = {}
_down_until: dict[str, float] = {}
_logged_through: dict[str, int] = {}
_had_metrics: dict[str, dict[str, float]] = {}


# ----------------------------------------------------------------------------- helpers


def resolve_tracking_uri(cfg_uri: str) -> str:
    """``mlflow.tracking_uri`` from the config, else ``$MLFLOW_TRACKING_URI``, else
    ``sqlite:///<cwd>/mlflow.db`` (MLflow 3's own default, made absolute so that a later
    ``chdir`` or a Ray worker's different cwd cannot move it)."""
    if cfg_uri:
        return cfg_uri
    env = os.environ.get("MLFLOW_TRACKING_URI", "")
    if env:
        return env
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (absolute or relative to the cwd), else ``None``."""
    if not uri.startswith("sqlite:///"):
        return None
    rest = unquote(uri[len("sqlite:///"):].split("?", 1)[0])
    if not rest or rest == ":memory:":
        return None
    return Path(rest) if rest.startswith("/") else (Path.cwd() / rest)


def _client(uri: str) -> MlflowClient:
    with _lock:
        client = _clients.get(uri)
        if client is None:
            with store_lock(uri):  # the client creates (or upgrades) the store's tables
                client = MlflowClient(tracking_uri=uri)
            _clients[uri] = client
        return client


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """An exclusive lock on ``<db>.lock`` for a sqlite URI (nothing for other stores): the one
    process that holds it creates or upgrades the tables, the others wait and then find them.
    Where the lock cannot be taken (a read-only folder, a time-out) it goes on without it."""
    db = sqlite_path(uri)
    if db is None:
        yield
        return
    try:
        db.parent.mkdir(parents=True, exist_ok=True)
        fh = open(db.with_name(db.name + ".lock"), "a")  # noqa: SIM115 - closed below
    except OSError:
        yield
        return
    try:
        deadline = time.monotonic() + STORE_LOCK_TIMEOUT_S
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    log.warning("MLflow: %s stays locked by another process; going on without the lock", db)
                    break
                time.sleep(0.1)
        yield
    finally:
        fh.close()  # closing releases the lock


def bounded_http_retries() -> None:
    """Set :data:`HTTP_DEFAULTS` in this process' environment where the user did not choose
    (MLflow reads them at every request). For the Tune driver: one call against a dead server
    must cost seconds, not the default ~4 minutes of back-off."""
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)


def quiet_logs() -> None:
    """MLflow's and alembic's INFO lines (table creation, migrations, "View run at") say
    nothing a user can act on; keep their warnings and errors. urllib3's "Retrying ..."
    warnings under MLflow's HTTP client repeat what :func:`guarded` says once."""
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)


def unreachable(uri: str, timeout: float = REACH_TIMEOUT_S) -> str:
    """Why an HTTP(S) tracking server cannot be reached (one line), or ``""`` when it answers
    (any HTTP status counts as an answer) or the URI is not HTTP(S)."""
    parsed = urlparse(uri)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        return ""
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname, port), timeout=timeout).close()
    except OSError as exc:
        return f"cannot connect to {parsed.hostname}:{port} ({exc.strerror or type(exc).__name__})"
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout):
            pass
    except urllib.error.HTTPError:
        pass
    except (OSError, ValueError) as exc:
        return f"no answer from {uri} within {timeout:g} s ({_short(exc)})"
    return ""


def answers(uri: str) -> bool:
    """Whether the tracking server answers now. A server marked down that answers again is
    unmarked at once (not after the cool-down), so a caller can catch up before it exits."""
    why = unreachable(uri)
    if why:
        return False
    with _lock:
        was_down = _down_until.pop(uri, None) is not None
    if was_down:
        log.warning("MLflow: %s answers again; tracking resumes (runs miss what happened meanwhile)", uri)
    return True


def _remember(run_id: str, uri: str) -> None:
    if run_id:
        with _lock:
            _run_uri[run_id] = uri


def _uri_for(run_id: str, tracking_uri: str | None) -> str:
    if tracking_uri:
        return tracking_uri
    with _lock:
        uri = _run_uri.get(run_id)
    return uri or resolve_tracking_uri("")


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else ""
    return f"{type(exc).__name__}: {line[:300]}"


def guarded(uri: str, what: str, default: T, fn: Callable[[], T]) -> T:
    """Run ``fn``; on failure log one warning and return ``default``. A server that stopped
    answering, or a failure that took :data:`SLOW_FAILURE_S`, marks ``uri`` down (see the
    module doc)."""
    now = time.monotonic()
    with _lock:
        until = _down_until.get(uri)
    if until is not None:
        if now < until:
            log.debug("MLflow %s skipped: %s marked unreachable", what, uri)
            return default
        if unreachable(uri):
            with _lock:
                _down_until[uri] = time.monotonic() + COOLDOWN_S
            return default
        with _lock:
            _down_until.pop(uri, None)
        log.warning("MLflow: %s answers again; tracking resumes (runs miss what happened meanwhile)", uri)
    tic = time.monotonic()
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - tracking must never kill training
        took = time.monotonic() - tic
        why = "" if isinstance(exc, RestException) else unreachable(uri)
        if why or took >= SLOW_FAILURE_S:
            with _lock:
                _down_until[uri] = time.monotonic() + COOLDOWN_S
            log.warning("MLflow %s failed after %.0f s (%s); the sweep goes on without MLflow while %s "
                        "does not answer", what, took, why or _short(exc), uri)
        else:
            log.warning("MLflow %s failed (%s); training continues without it", what, _short(exc))
        return default


def _key(key: Any) -> str:
    """A name MLflow accepts: allowed characters only, and no empty / ``.`` / ``..`` path parts."""
    k = _BAD_KEY_CHARS.sub("_", str(key))
    k = "/".join(part for part in k.split("/") if part not in ("", ".", "..")) or "_"
    return k[:KEY_LIMIT].rstrip("/")


def _param_value(value: Any) -> str:
    if isinstance(value, (list, tuple, dict)):
        text = json.dumps(value, separators=(",", ":"), default=str)
    else:
        text = str(value)
    if len(text) > PARAM_VALUE_LIMIT:
        text = text[: PARAM_VALUE_LIMIT - 3] + "..."
    return text


def _tag_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str) if isinstance(
        value, (list, dict, tuple)) else str(value)
    return text[:TAG_VALUE_LIMIT]


def _number(value: Any) -> float | None:
    """A plain float for real numbers (numpy / 0-d tensors included, float32 noise removed);
    ``None`` for anything else."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, numbers.Real):
        return plain_float(value)
    item = getattr(value, "item", None)
    if callable(item) and getattr(value, "ndim", 1) == 0:
        try:
            out = item()
        except Exception:  # noqa: BLE001
            return None
        return plain_float(out) if isinstance(out, numbers.Real) and not isinstance(out, bool) else None
    return None


def _metrics(values: dict[str, Any], step: int) -> list[Metric]:
    ts = int(time.time() * 1000)
    out = []
    for k, v in values.items():
        x = _number(v)
        if x is not None:
            out.append(Metric(_key(k), x, ts, int(step)))
    return out


def _flat_params(values: dict[str, Any], prefix: str = "") -> dict[str, str]:
    return {_key(prefix + k): _param_value(v) for k, v in flatten(dict(values)).items()}


def _log_batch(client: MlflowClient, run_id: str, metrics: list[Metric] | None = None,
               params: dict[str, str] | None = None, tags: dict[str, str] | None = None) -> None:
    """``log_batch`` within MLflow's per-request limits (100 params/tags, 1000 metrics)."""
    plist = [Param(k, v) for k, v in (params or {}).items()]
    tlist = [RunTag(k, v) for k, v in (tags or {}).items()]
    mlist = list(metrics or [])
    while plist or tlist or mlist:
        p, plist = plist[:100], plist[100:]
        t, tlist = tlist[:100], tlist[100:]
        m, mlist = mlist[: 1000 - len(p) - len(t)], mlist[1000 - len(p) - len(t):]
        client.log_batch(run_id, metrics=m, params=p, tags=t)


def _new_params(client: MlflowClient, run_id: str, params: dict[str, str]) -> dict[str, str]:
    """The params a run does not have yet; MLflow params are immutable, so differing ones are
    reported and skipped (the run keeps its first value)."""
    have = client.get_run(run_id).data.params
    changed = sorted(k for k, v in params.items() if k in have and have[k] != v)
    if changed:
        log.warning("MLflow run %s keeps its logged values of %d changed param(s): %s", run_id,
                    len(changed), ", ".join(changed[:8]) + (" ..." if len(changed) > 8 else ""))
    return {k: v for k, v in params.items() if k not in have}


@lru_cache(maxsize=1)
def git_sha() -> str:
    """The commit of the rrscale checkout (or of the cwd); ``"unknown"`` outside git."""
    for where in (Path(__file__).resolve().parent, Path.cwd()):
        try:
            out = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True,
                                 text=True, timeout=5, check=False)
        except (OSError, subprocess.SubprocessError):
            continue
        sha = out.stdout.strip()
        if out.returncode == 0 and sha:
            return sha
    return "unknown"


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001
        return "unknown"


def _experiment_id(client: MlflowClient, name: str, uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            log.warning("MLflow experiment %r was deleted; restoring it", name)
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    db = sqlite_path(uri)
    # MLflow's default artifact root for a SQL store is ./mlruns in the *current* directory;
    # keep a sqlite store's artifacts next to its database file instead.
    location = (db.parent / "mlartifacts").as_uri() if db is not None else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:
        exp = client.get_experiment_by_name(name)  # created concurrently by someone else
        if exp is None:
            raise
        return exp.experiment_id


def _search_all(client: MlflowClient, experiment_ids: list[str], filter_string: str,
                order_by: list[str] | None = None, limit: int = 100_000) -> list[Any]:
    runs: list[Any] = []
    token = None
    while len(runs) < limit:
        page = client.search_runs(experiment_ids, filter_string, ViewType.ACTIVE_ONLY,
                                  max_results=min(1000, limit - len(runs)), order_by=order_by,
                                  page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            break
    return runs


def _find_sweep(client: MlflowClient, experiment_id: str, sweep_name: str) -> Any | None:
    runs = _search_all(client, [experiment_id], f"tags.`{ROLE_TAG}` = 'sweep'",
                       order_by=["attributes.start_time DESC"])
    for run in runs:
        if run.data.tags.get(SWEEP_TAG) == sweep_name:
            return run
    return None


def _find_trial(client: MlflowClient, experiment_id: str, parent_run_id: str, trial_id: str) -> Any | None:
    flt = f"tags.{PARENT_TAG} = '{parent_run_id}'"
    if _SAFE_FILTER_VALUE.match(trial_id):
        flt += f" and tags.`{TRIAL_TAG}` = '{trial_id}'"
    for run in _search_all(client, [experiment_id], flt, order_by=["attributes.start_time ASC"]):
        if run.data.tags.get(TRIAL_TAG) == trial_id:
            return run
    return None


def _log_artifact_paths(client: MlflowClient, run_id: str, paths: list[Path], what: str) -> None:
    for p in paths:
        path = Path(p)
        try:
            if path.is_dir():
                client.log_artifacts(run_id, str(path), artifact_path=path.name)
            elif path.is_file():
                sub = "plots" if path.suffix.lower() in (".png", ".svg", ".pdf") else None
                client.log_artifact(run_id, str(path), artifact_path=sub)
            else:
                log.warning("MLflow %s: artifact %s does not exist; skipped", what, path)
        except Exception as exc:  # noqa: BLE001
            log.warning("MLflow %s: could not upload %s (%s)", what, path, _short(exc))


def _status(status: str) -> tuple[str, str]:
    """(MLflow run status, outcome word) of a status word."""
    mapped = _STATUS.get(str(status).strip().upper().replace("-", "_"))
    if mapped is None:
        log.warning("unknown run status %r; recording it as FAILED", status)
        return _FAILED
    return mapped


def outcome_word(status: str) -> str:
    """The outcome word (:data:`rrscale.tracking.naming.OUTCOMES`) of an ``rrscale.status`` tag or
    any status word (MLflow's RUNNING / FINISHED / KILLED, Ray's, Optuna's)."""
    if status in naming.OUTCOMES:
        return status
    word = str(status).strip().upper().replace(" ", "_").replace("-", "_")
    if word in ("RUNNING", "SCHEDULED", "PENDING"):
        return naming.RUNNING
    mapped = _STATUS.get(word)
    return mapped[1] if mapped else str(status).lower()


def _source_tags() -> dict[str, str]:
    """Who ran it and from what, as the MLflow UI reads them (User, Source, Version columns)."""
    sha = git_sha()
    return {"mlflow.user": _user(), "mlflow.source.name": "rrscale tune", "mlflow.source.type": "LOCAL",
            "mlflow.source.git.commit": sha, GIT_TAG: sha, VERSION_TAG: __version__}


def _split_summary(summary: dict[str, Any], tag_prefix: str) -> tuple[dict[str, Any], dict[str, str]]:
    """Numbers become metrics; short strings become tags ``<tag_prefix><key>``; the rest is dropped."""
    nums: dict[str, Any] = {}
    tags: dict[str, str] = {}
    for k, v in summary.items():
        if _number(v) is not None:
            nums[k] = v
        elif isinstance(v, str):
            tags[_key(tag_prefix + k)] = _tag_value(v)
    return nums, tags


# ----------------------------------------------------------------------------- public API


def start_sweep(experiment: str, tracking_uri: str, sweep_name: str, search_file: Path,
                config: dict[str, Any], resume: bool, *, description: str = "",
                tags: dict[str, Any] | None = None) -> str:
    """Open the parent run of a sweep and return its id (``""`` when tracking is down).

    Logs ``search_file`` (the experiment YAML with its search space) as an artifact, ``config``
    (what describes the sweep: its search space and tune settings, see
    :func:`rrscale.tracking.naming.sweep_params`; nested dicts are flattened) as params,
    ``description`` as the run's description, ``tags`` plus ``rrscale.sweep``,
    ``rrscale.role=sweep``, user, source and git sha. With ``resume=True`` the most recent
    parent run of the same ``sweep_name`` in the experiment is set to RUNNING again and returned
    (params it lacks are added); a new one is created only when none exists.
    """
    uri = tracking_uri or resolve_tracking_uri("")
    why = unreachable(uri)
    if why:
        with _lock:
            _down_until[uri] = time.monotonic() + COOLDOWN_S
        log.warning("MLflow: the tracking server %s is unreachable (%s); the sweep goes on without MLflow "
                    "tracking", uri, why)
        return ""

    def body() -> str:
        client = _client(uri)
        exp_id = _experiment_id(client, experiment, uri)
        params = _flat_params(config)
        extra = {_key(k): _tag_value(v) for k, v in (tags or {}).items()}
        if description:
            extra[NOTE_TAG] = _tag_value(description)
        run = _find_sweep(client, exp_id, sweep_name) if resume else None
        if run is not None:
            run_id = run.info.run_id
            log.info("MLflow: resuming sweep %r (parent run %s)", sweep_name, run_id)
            if run.info.status != "RUNNING":
                client.update_run(run_id, status="RUNNING")
            params = _new_params(client, run_id, params)
        else:
            if resume:
                log.info("MLflow: no earlier parent run for sweep %r; starting one", sweep_name)
            all_tags = {SWEEP_TAG: sweep_name, ROLE_TAG: "sweep", **_source_tags(),
                        "rrscale.search_file": _tag_value(Path(search_file).name if search_file else "")}
            run_id = client.create_run(exp_id, run_name=sweep_name, tags=all_tags).info.run_id
        _remember(run_id, uri)
        _log_batch(client, run_id, params=params, tags=extra)
        if search_file and Path(search_file).is_file():
            _log_artifact_paths(client, run_id, [Path(search_file)], "start_sweep")
        return run_id

    return guarded(uri, "start_sweep", "", body)


def start_trial(parent_run_id: str, trial_id: str, params: dict[str, Any], tags: dict[str, Any],
                *, run_name: str = "", description: str = "", tracking_uri: str | None = None) -> str:
    """Open (or find again) the child run of one trial; return its id, ``""`` on failure.

    Idempotent: when a child of ``parent_run_id`` with tag ``rrscale.trial_id == trial_id``
    exists it is returned (set RUNNING again, missing params added, description replaced), so a
    resumed sweep never duplicates a trial. The run is named ``run_name`` (default: the trial
    id; see :func:`rrscale.tracking.naming.run_name`); ``params`` are flattened to dotted keys
    and cut to :data:`PARAM_VALUE_LIMIT` characters; ``tags`` are logged as given, plus
    ``mlflow.parentRunId``, ``rrscale.trial_id``, ``rrscale.sweep``, ``rrscale.role=trial``,
    ``rrscale.status=running``, user, source and git sha.
    """
    if not parent_run_id:
        return ""
    uri = _uri_for(parent_run_id, tracking_uri)

    def body() -> str:
        client = _client(uri)
        parent = client.get_run(parent_run_id)
        exp_id = parent.info.experiment_id
        flat = _flat_params(params)
        now = {STATUS_TAG: naming.RUNNING}
        if description:
            now[NOTE_TAG] = _tag_value(description)
        run = _find_trial(client, exp_id, parent_run_id, trial_id)
        if run is not None:
            run_id = run.info.run_id
            if run.info.status != "RUNNING":
                client.update_run(run_id, status="RUNNING")
            flat = _new_params(client, run_id, flat)
            _remember(run_id, uri)
            logged = _last_logged_step(client, run)
            with _lock:
                _logged_through[run_id] = logged
                _had_metrics[run_id] = dict(run.data.metrics)
            _log_batch(client, run_id, params=flat, tags=now)
            return run_id
        all_tags = {**_source_tags(), **{_key(k): _tag_value(v) for k, v in tags.items()}, **now}
        all_tags.update({PARENT_TAG: parent_run_id, TRIAL_TAG: trial_id, ROLE_TAG: "trial"})
        sweep = parent.data.tags.get(SWEEP_TAG)
        if sweep:
            all_tags.setdefault(SWEEP_TAG, sweep)
        # create_run takes the tags in one request; params go in (chunked) batches after it.
        run_id = client.create_run(exp_id, run_name=run_name or trial_id, tags=all_tags).info.run_id
        _remember(run_id, uri)
        _log_batch(client, run_id, params=flat)
        return run_id

    return guarded(uri, "start_trial", "", body)


def log_epoch(run_id: str, metrics: dict[str, Any], step: int, *, tracking_uri: str | None = None) -> None:
    """Log the numeric values of one epoch's report at ``step`` under ``epoch/<name>``
    (:func:`rrscale.tracking.naming.epoch_metric`); the epoch number itself and anything
    non-numeric (bools, strings, nested dicts, lists) are ignored."""
    if not run_id:
        return
    uri = _uri_for(run_id, tracking_uri)
    if int(step) <= _logged_through.get(run_id, -1):
        return  # a resumed trial repeats an epoch the run already holds
    curves = {naming.epoch_metric(k): v for k, v in metrics.items() if k not in naming.NOT_CURVES}
    batch = _metrics(curves, step)
    if not batch:
        return
    guarded(uri, "log_epoch", None, lambda: _log_batch(_client(uri), run_id, metrics=batch))


def set_tags(run_id: str, tags: dict[str, Any], *, tracking_uri: str | None = None) -> None:
    """Set (or replace) tags of a run, e.g. its description (:data:`NOTE_TAG`)."""
    if not run_id or not tags:
        return
    uri = _uri_for(run_id, tracking_uri)
    values = {_key(k): _tag_value(v) for k, v in tags.items()}
    guarded(uri, "set_tags", None, lambda: _log_batch(_client(uri), run_id, tags=values))


def log_dataset(run_id: str, name: str, digest: str, source: str, *, context: str = "training",
                profile: dict[str, Any] | None = None, tracking_uri: str | None = None) -> None:
    """Record the data a run used as an MLflow dataset input (the runs table's Dataset column):
    ``name`` (e.g. ``cifar10``), ``digest`` (rrscale's data fingerprint) and ``source`` (where it
    was read). Logging the same dataset twice keeps one input."""
    if not run_id or not digest:
        return
    uri = _uri_for(run_id, tracking_uri)
    dataset = Dataset(name=name, digest=digest, source_type="local" if source.startswith("/") else "code",
                      source=json.dumps({"uri": source}),
                      profile=json.dumps(profile, default=str) if profile else None)
    tags = [InputTag(key="mlflow.data.context", value=context)]

    def body() -> None:
        client = _client(uri)
        have = client.get_run(run_id).inputs.dataset_inputs or []
        if any(d.dataset.name == name and d.dataset.digest == digest for d in have):
            return
        client.log_inputs(run_id, datasets=[DatasetInput(dataset, tags)])

    guarded(uri, "log_dataset", None, body)


def end_trial(run_id: str, summary: dict[str, Any], status: str, checkpoint_dir: Path | None,
              *, description: str = "", tracking_uri: str | None = None) -> bool:
    """Log the final numbers of a trial, its checkpoint, and close it.

    ``summary`` is what the trial ended with: scores (``probe_top1``, ``knn_top1``, ``nmi``...)
    are logged once (step 0) under their own name, costs (``seconds``, ``cpu_seconds``,
    ``gpu_seconds`` when a GPU was used, the run's average ``images_per_s``...) under
    ``cost/``, run constants (``epochs``, ``seed``, ``workers``) and short strings (``device``,
    ``error``...) as ``rrscale.<key>`` tags (:func:`rrscale.tracking.naming.split_final`). So a
    per-epoch curve (``epoch/knn_top1``) never gets a second value at its last step.
    ``checkpoint_dir`` (a folder, or one file) is uploaded under ``checkpoint/``.
    ``status``: FINISHED, EARLY_STOPPED (MLflow FINISHED, ``rrscale.status = stopped early``),
    FAILED or KILLED (``interrupted``); Ray's TERMINATED and ERROR are accepted too.
    ``description`` replaces the run's description when given. Returns False when the run could
    not be closed (the server did not answer): the caller may call again later with the same
    arguments (values MLflow already holds are not logged twice).
    """
    if not run_id:
        return True
    uri = _uri_for(run_id, tracking_uri)
    metrics, tags = naming.split_final(summary)
    with _lock:
        had = _had_metrics.pop(run_id, {})
    # a trial that re-reports its ending after a resume: values the run holds already stay single
    metrics = {k: v for k, v in metrics.items() if had.get(_key(k)) != _number(v)}
    for key, value in summary.items():
        if isinstance(value, str) and key != "status" and value:
            tags[_key(f"rrscale.{key}")] = _tag_value(value)
    final, outcome = _status(status)
    tags[STATUS_TAG] = outcome
    if description:
        tags[NOTE_TAG] = _tag_value(description)
    client = _client(uri)
    guarded(uri, "end_trial (metrics)", None,
           lambda: _log_batch(client, run_id, metrics=_metrics(metrics, 0), tags=tags))
    if checkpoint_dir is not None:
        ckpt = Path(checkpoint_dir)

        def upload() -> None:
            if ckpt.is_dir():
                client.log_artifacts(run_id, str(ckpt), artifact_path="checkpoint")
            elif ckpt.is_file():
                client.log_artifact(run_id, str(ckpt), artifact_path="checkpoint")
            else:
                log.warning("MLflow end_trial: checkpoint %s does not exist; not uploaded", ckpt)

        guarded(uri, "end_trial (checkpoint)", None, upload)
    return guarded(uri, "end_trial (terminate)", False, lambda: client.set_terminated(run_id, final) or True)


def finish_sweep(parent_run_id: str, summary: dict[str, Any], best_config: dict[str, Any],
                 artifacts: list[Path], *, status: str = "FINISHED", tracking_uri: str | None = None) -> None:
    """Close the parent run: summary metrics (strings become ``summary.<key>`` tags), the best
    config as the ``best_config.json`` artifact, extra artifacts (PNG/SVG/PDF files under
    ``plots/``, other files at the root, folders under their own name), then ``status``."""
    if not parent_run_id:
        return
    uri = _uri_for(parent_run_id, tracking_uri)
    client = _client(uri)
    nums, tags = _split_summary(summary, "summary.")
    final, outcome = _status(status)
    tags[STATUS_TAG] = outcome
    guarded(uri, "finish_sweep (summary)", None,
           lambda: _log_batch(client, parent_run_id, metrics=_metrics(nums, 0), tags=tags))
    if best_config:
        guarded(uri, "finish_sweep (best config)", None,
               lambda: client.log_dict(parent_run_id, best_config, "best_config.json"))
    if artifacts:
        guarded(uri, "finish_sweep (artifacts)", None,
               lambda: _log_artifact_paths(client, parent_run_id, list(artifacts), "finish_sweep"))
    guarded(uri, "finish_sweep (terminate)", None, lambda: client.set_terminated(parent_run_id, final))


def close_stray_trials(parent_run_id: str, keep: set[str], *, tracking_uri: str | None = None) -> list[str]:
    """Delete the RUNNING child runs of ``parent_run_id`` whose trial id is not in ``keep``.

    They belong to trials that Ray Tune's last snapshot did not hold when the driver died: Tune
    starts replacements for them (the Optuna study hands them the same sampled values), so the
    stray runs would only show every such trial twice. Each is tagged (``rrscale.status=lost``),
    closed as KILLED, then deleted (MLflow keeps deleted runs until ``mlflow gc``). Returns the
    trial ids closed.
    """
    if not parent_run_id:
        return []
    uri = _uri_for(parent_run_id, tracking_uri)

    def body() -> list[str]:
        client = _client(uri)
        exp_id = client.get_run(parent_run_id).info.experiment_id
        runs = _search_all(client, [exp_id], f"tags.{PARENT_TAG} = '{parent_run_id}' and "
                                             "attributes.status = 'RUNNING'")
        closed = []
        for run in runs:
            trial = run.data.tags.get(TRIAL_TAG, "")
            if trial in keep:
                continue
            client.set_tag(run.info.run_id, STATUS_TAG, "lost")
            client.set_tag(run.info.run_id, NOTE_TAG, "Lost: the driver stopped before Ray Tune saved this "
                           "trial; the resumed sweep ran its sampled values again as a new trial.")
            client.set_terminated(run.info.run_id, "KILLED")
            client.delete_run(run.info.run_id)
            closed.append(trial)
        if closed:
            log.info("MLflow: closed %d run(s) of trials lost with the driver: %s", len(closed), ", ".join(closed))
        return closed

    return guarded(uri, "close_stray_trials", [], body)


def _last_logged_step(client: MlflowClient, run: Any) -> int:
    """The last epoch a run holds per-epoch curves for (-1 for none), from one curve's history."""
    keys = sorted(k for k in run.data.metrics if k.startswith(naming.EPOCH_PREFIX))
    if not keys:
        return -1
    history = client.get_metric_history(run.info.run_id, keys[0])
    return max((int(m.step) for m in history), default=-1)


def set_experiment_tag(tracking_uri: str, experiment_id: str, key: str, value: str) -> None:
    """Set a tag of an experiment (e.g. the comparison view, :mod:`rrscale.tracking.links`).
    The value is written whole (MLflow takes up to 20,000 characters) or not at all."""
    uri = tracking_uri or resolve_tracking_uri("")
    guarded(uri, "set_experiment_tag", None, lambda: _client(uri).set_experiment_tag(experiment_id, _key(key), value))


def get_run(run_id: str, *, tracking_uri: str | None = None) -> Any | None:
    """The MLflow run (``None`` when it cannot be read)."""
    if not run_id:
        return None
    uri = _uri_for(run_id, tracking_uri)
    return guarded(uri, "get_run", None, lambda: _client(uri).get_run(run_id))


def forget_failures() -> None:
    """Clear the 'URI is down' memory (for tests, or after fixing the server)."""
    with _lock:
        _down_until.clear()
