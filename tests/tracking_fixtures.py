"""Shared MLflow fixtures: a real ``mlflow server`` on 127.0.0.1 with everything in a temp folder.

Use from a test module with ``from tests.tracking_fixtures import mlflow_server  # noqa: F401``;
the fixture yields the server's URI (``http://127.0.0.1:PORT``). The server is stopped (its
process group terminated, then killed) when the module's tests are done.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

SERVER_START_TIMEOUT_S = 90.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def start_mlflow_server(root: Path, timeout_s: float = SERVER_START_TIMEOUT_S,
                        backend: str = "", port: int = 0) -> tuple[subprocess.Popen, str]:
    """Start ``mlflow server`` (sqlite backend, proxied artifacts, one uvicorn worker) under
    ``root`` and wait (bounded) until ``/health`` answers. Returns the process and its URI.
    ``backend``: an existing store to serve (default: ``root/server.db``, new or not);
    ``port``: e.g. a stopped server's, to bring it back at the same URI (default: a free one)."""
    root.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    log_file = open(root / "server.log", "wb")  # noqa: SIM115 - closed by the caller via proc
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server",
         "--backend-store-uri", backend or f"sqlite:///{root / 'server.db'}",
         "--artifacts-destination", str(root / "artifacts"),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=root, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
    )
    proc.log_file = log_file  # type: ignore[attr-defined]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        if _healthy(url):
            return proc, url
        time.sleep(0.3)
    stop_mlflow_server(proc)
    tail = (root / "server.log").read_text(errors="replace")[-3000:]
    raise RuntimeError(f"mlflow server did not become healthy at {url} (rc={proc.returncode}):\n{tail}")


def stop_mlflow_server(proc: subprocess.Popen) -> None:
    """Terminate the server's own process group (uvicorn and its worker), then kill if needed."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=10)
    log_file = getattr(proc, "log_file", None)
    if log_file is not None:
        log_file.close()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A running ``mlflow server``'s URI; the store and artifacts live in a temp folder."""
    root = tmp_path_factory.mktemp("mlflow-server")
    proc, url = start_mlflow_server(root)
    try:
        yield url
    finally:
        stop_mlflow_server(proc)
