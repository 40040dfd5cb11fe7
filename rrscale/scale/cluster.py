"""Starting or joining Ray, the dashboard and its token, and rrscale's Ray metrics.

``start_or_join`` is the one place that calls ``ray.init``:

* ``RAY_ADDRESS`` set (``auto``, ``ray://...`` or ``host:port``; ``ray job submit`` sets it for
  its entrypoint): join that cluster. Nothing else joins a cluster implicitly, so a stray
  ``ray start`` on a shared machine never captures an ``rrscale`` run.
* otherwise: start a local Ray with an explicit ``num_cpus`` and the dashboard bound to
  127.0.0.1, on port 8265 (or ``RRSCALE_DASHBOARD_PORT``) when it is free and on a free port
  the system picks when another Ray (another sweep) holds it. Choosing the port and starting
  Ray happen under a host-wide lock (:func:`_start_lock`), so two sweeps starting together
  cannot both pick the same port. Ray 2.60 protects the dashboard with a token; rrscale sets ``RAY_AUTH_MODE``
  explicitly (``token`` unless the user chose another value) so the behaviour never depends
  on whether ``~/.ray/auth_token`` happens to exist. The token comes from ``RAY_AUTH_TOKEN``,
  else the file ``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token`` (Ray writes a new one there
  when none exists). rrscale prints where it is, never the token itself.

The driver's Ray job is named (``job_name`` in the job's metadata, the dashboard's "Name"
column), e.g. ``rrscale tune quickstart``.

Worker processes get the ``RRSCALE_*`` environment variables of the driver (data root, decode
cache, test switches) and, when rrscale runs from a source checkout rather than an installed
package, its folder on ``PYTHONPATH``.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import math
import os
import socket
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

DASHBOARD_HOST = "127.0.0.1"
DEFAULT_DASHBOARD_PORT = 8265
AUTH_MODE_ENV = "RAY_AUTH_MODE"
TOKEN_ENV = "RAY_AUTH_TOKEN"
TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"
DASHBOARD_PORT_ENV = "RRSCALE_DASHBOARD_PORT"


@dataclass
class ClusterInfo:
    """What ``start_or_join`` connected to; ``started`` means rrscale owns it and shuts it down."""

    started: bool
    address: str
    dashboard_url: str | None
    auth_mode: str
    token_source: str
    resources: dict[str, float] = field(default_factory=dict)

    @property
    def cpus(self) -> float:
        return float(self.resources.get("CPU", 0.0))

    @property
    def gpus(self) -> float:
        return float(self.resources.get("GPU", 0.0))

    def describe(self) -> str:
        """Human lines: where Ray runs, the dashboard URL and how to authenticate to it."""
        what = "started a local Ray" if self.started else "joined the Ray cluster"
        lines = [f"ray: {what} at {self.address} ({self.cpus:g} CPUs, {self.gpus:g} GPUs)"]
        if self.dashboard_url:
            lives = " (it lives as long as this command)" if self.started else ""
            lines.append(f"ray: dashboard {self.dashboard_url}{lives}")
            if self.auth_mode == "token":
                lines.append(
                    f"ray: the dashboard needs Ray's token ({self.token_source}); paste the output of "
                    "'ray get-auth-token' into its login page, or send 'Authorization: Bearer <token>'"
                )
        return "\n".join(lines)


def token_source() -> str:
    """Where Ray reads its token from, in Ray's own priority order (never the token itself)."""
    if os.environ.get(TOKEN_ENV):
        return f"${TOKEN_ENV}"
    if os.environ.get(TOKEN_PATH_ENV):
        return os.environ[TOKEN_PATH_ENV]
    return str(Path.home() / ".ray" / "auth_token")


def read_token() -> str | None:
    """The token Ray uses (for tests and HTTP clients), or ``None`` when none is set up."""
    if os.environ.get(TOKEN_ENV):
        return os.environ[TOKEN_ENV].strip()
    path = Path(os.environ.get(TOKEN_PATH_ENV) or Path.home() / ".ray" / "auth_token")
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def auth_headers() -> dict[str, str]:
    token = read_token()
    return {"Authorization": f"Bearer {token}"} if token else {}


def _source_root() -> str | None:
    """The folder holding the ``rrscale`` package when it is imported from a checkout."""
    import rrscale

    pkg = Path(rrscale.__file__).resolve().parent
    if "site-packages" in pkg.parts or "dist-packages" in pkg.parts:
        return None
    return str(pkg.parent)


def worker_env() -> dict[str, str]:
    """Environment that Ray worker processes need to run rrscale like the driver does."""
    env = {k: v for k, v in os.environ.items() if k.startswith("RRSCALE_")}
    root = _source_root()
    if root is not None:
        paths = [root, *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != root]]
        env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def _dashboard_url() -> str | None:
    try:
        from ray._private.worker import get_dashboard_url

        url = get_dashboard_url() or ""
    except Exception:
        return None
    if not url:
        return None
    return url if url.startswith("http") else f"http://{url}"


def _job_env_keys() -> set[str]:
    """Environment keys the runtime_env of the submitted job (if this is one) already sets."""
    import json

    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "")
    if not raw:
        return set()
    try:
        runtime_env = json.loads(raw).get("runtime_env") or {}
        return set((runtime_env.get("env_vars") or {}).keys())
    except (ValueError, AttributeError):
        return set()


def _refresh_ray_config(mode_changed: bool) -> None:
    """Make this process' (already imported) Ray core re-read ``RAY_AUTH_MODE`` and the token.

    Ray caches both in C++ at first use. Ray's own default-token path re-initialises the config
    the same way after setting the variable; without it the driver would talk to the GCS it
    just started without a token (or, in a long-lived process, with an earlier token).
    """
    try:
        from ray._raylet import AuthenticationTokenLoader, Config

        if mode_changed:
            Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()
    except Exception as exc:  # another Ray version: the variables still reach the cluster
        print(f"rrscale: warning: could not refresh Ray's auth settings: {exc}", file=sys.stderr)


def port_free(port: int, host: str = DASHBOARD_HOST) -> bool:
    """Whether nothing listens on ``host:port`` (a bind test; SO_REUSEADDR like a server)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def pick_dashboard_port(preferred: int) -> int:
    """``preferred`` when it is free on 127.0.0.1, else a free port the system picks."""
    if port_free(preferred):
        return preferred
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((DASHBOARD_HOST, 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _start_lock() -> Iterator[None]:
    """A host-wide exclusive lock around 'choose the dashboard port, start Ray' (the file
    ``rrscale-ray-start.lock`` in the system temp folder); without it if the file cannot be used."""
    path = os.path.join(tempfile.gettempdir(), "rrscale-ray-start.lock")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o666)
    except OSError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _job_config(job_name: str) -> Any:
    """The driver's job: its name, and WARNING as the log level of its worker processes (Ray's
    INFO lines there, "Checkpoint successfully created", "Restored from checkpoint"..., are
    forwarded to the console and say nothing a user can act on; warnings stay)."""
    from ray.job_config import JobConfig

    config = JobConfig(metadata={"job_name": job_name} if job_name else None)
    config.set_py_logging_config(ray.LoggingConfig(log_level="WARNING"))
    return config


def start_or_join(
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    *,
    dashboard: bool = True,
    dashboard_port: int | None = None,
    log_to_driver: bool = True,
    job_name: str = "",
) -> ClusterInfo:
    """Join ``$RAY_ADDRESS`` or start a local Ray with explicit resources; see the module doc."""
    if ray.is_initialized():
        return _info(started=False, context=None)
    env = worker_env()
    address = os.environ.get("RAY_ADDRESS", "").strip()
    quiet = {"logging_level": logging.WARNING, "job_config": _job_config(job_name)}
    if address:
        # Inside `ray job submit` the job's runtime_env wins: add only keys it does not set.
        _refresh_ray_config(mode_changed=False)
        taken = _job_env_keys()
        env = {k: v for k, v in env.items() if k not in taken}
        context = ray.init(address=address, runtime_env={"env_vars": env} if env else None,
                           log_to_driver=log_to_driver, **quiet)
        return _info(started=False, context=context)
    os.environ.setdefault(AUTH_MODE_ENV, "token")
    # Re-read even when the variable was set already: a process that imported Ray before it was
    # set (a test session, a notebook) has cached the old mode in Ray's C++ config.
    _refresh_ray_config(mode_changed=True)
    # The raylet and every worker inherit this process' environment: set PYTHONPATH here
    # instead of a job runtime_env, which would make Ray set up an env per worker.
    os.environ.update(env)
    cpus = int(num_cpus) if num_cpus else (os.cpu_count() or 1)
    kwargs: dict[str, Any] = dict(num_cpus=cpus, include_dashboard=dashboard, log_to_driver=log_to_driver, **quiet)
    if num_gpus is not None:
        kwargs["num_gpus"] = num_gpus
    with _start_lock():
        if dashboard:
            wanted = dashboard_port or int(os.environ.get(DASHBOARD_PORT_ENV, DEFAULT_DASHBOARD_PORT))
            kwargs.update(dashboard_host=DASHBOARD_HOST, dashboard_port=pick_dashboard_port(wanted))
        context = ray.init(**kwargs)
    return _info(started=True, context=context)


def _info(started: bool, context: Any) -> ClusterInfo:
    address = ray.get_runtime_context().gcs_address
    mode = os.environ.get(AUTH_MODE_ENV, "disabled").lower()
    return ClusterInfo(started=started, address=address, dashboard_url=_dashboard_url(), auth_mode=mode,
                       token_source=token_source(), resources=dict(ray.cluster_resources()))


def shutdown(info: ClusterInfo | None) -> None:
    """Shut down what ``start_or_join`` connected to (a joined cluster keeps running)."""
    if ray.is_initialized():
        ray.shutdown()


def cpus_needed(num_workers: int, cpus_per_worker: float) -> int:
    return max(1, math.ceil(num_workers * cpus_per_worker))


# ----------------------------------------------------------------------------- Ray metrics


class TrialGauges:
    """Per-trial images/s and loss as Ray metrics (dashboard + Prometheus), tag ``trial``.

    Created in the process that reports (a Train worker or an in-process Tune trial); setting a
    gauge never raises into training.
    """

    _gauges: dict[str, Any] = {}

    def __init__(self, trial: str) -> None:
        self.trial = trial or "run"

    @classmethod
    def _gauge(cls, name: str, description: str) -> Any:
        if name not in cls._gauges:
            from ray.util.metrics import Gauge

            cls._gauges[name] = Gauge(name, description=description, tag_keys=("trial",))
        return cls._gauges[name]

    def set(self, metrics: dict[str, Any]) -> None:
        if not ray.is_initialized():
            return
        try:
            for key, name, desc in (
                ("images_per_s", "rrscale_images_per_s", "training images per second of a trial"),
                ("loss", "rrscale_loss", "mean training loss of the last epoch of a trial"),
                ("knn_top1", "rrscale_knn_top1", "per-epoch kNN top-1 accuracy of a trial"),
            ):
                value = metrics.get(key)
                if isinstance(value, (int, float)) and math.isfinite(float(value)):
                    self._gauge(name, desc).set(float(value), tags={"trial": self.trial})
        except Exception as exc:  # metrics are monitoring only
            print(f"rrscale: warning: could not set Ray metrics: {exc}", file=sys.stderr)
