"""The sweep folder on the driver's disk: who may use it, and what it keeps for a later shell.

* :func:`check_storage` refuses a ``tune.storage_path`` that is a file or a folder this user
  cannot write, in one line and before Ray starts (it writes nothing: the probe file it creates
  in the nearest existing folder is removed at once).
* :class:`SweepLock` holds an exclusive ``fcntl`` lock on ``<sweep>/.rrscale.lock`` for as long
  as a sweep runs, so a second ``rrscale tune`` of the same sweep (fresh or ``--resume``) stops
  with one line instead of mixing its trials, Tune folder and Optuna study into the first one's.
  The kernel drops the lock when the process dies, however it dies.
* :func:`write_experiment` keeps the resolved experiment (``experiment.yaml``: data paths
  absolute, ``--set`` overrides and ``$RRSCALE_DATA_ROOT`` applied, the sweep's name, storage
  and tracking URI filled in), so ``rrscale tune --resume <sweep folder>`` and the printed
  "run it alone" command work in a new shell.
"""

from __future__ import annotations

import shlex
from contextlib import ExitStack
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from rrscale.config import ConfigError, ExperimentConfig
from rrscale.engine.rundir import FolderBusy, RunDirError, check_writable, folder_lock

EXPERIMENT_FILE = "experiment.yaml"


class SweepBusy(RuntimeError):
    """Another process runs this sweep."""


def check_storage(storage: str, source: str) -> None:
    """One ConfigError line when ``tune.storage_path`` (local) is a file or cannot be written
    (the same real-write check as ``rrscale train --out``)."""
    if "://" in storage:
        return
    try:
        check_writable(Path(storage), "tune.storage_path")
    except RunDirError as exc:
        raise ConfigError(f"{source}: {exc}") from None


class SweepLock:
    """An exclusive, non-blocking lock on the sweep folder (see the module doc): the run
    directory's :func:`~rrscale.engine.rundir.folder_lock`, raising :class:`SweepBusy`."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self._held = ExitStack()

    def __enter__(self) -> "SweepLock":
        try:
            self._held.enter_context(folder_lock(self.folder))
        except FolderBusy as exc:
            raise SweepBusy(str(exc)) from None
        return self

    def __exit__(self, *exc: Any) -> None:
        self._held.close()


def resume_target(path: Path) -> Path:
    """The experiment file that ``rrscale tune --resume PATH`` means: PATH itself, or
    ``PATH/experiment.yaml`` for a sweep folder."""
    return path / EXPERIMENT_FILE if path.is_dir() else path


def write_experiment(cfg: ExperimentConfig, folder: Path, *, source: Path, overrides: list[str]) -> Path:
    """Write ``folder/experiment.yaml`` (atomically) from a fully resolved ``cfg``."""
    folder.mkdir(parents=True, exist_ok=True)
    body = yaml.safe_dump(cfg.model_dump(mode="json", by_alias=True, exclude_none=True), sort_keys=False)
    sets = " ".join(f"--set {shlex.quote(o)}" for o in overrides)
    head = (f"# The resolved experiment of sweep '{cfg.tune.name}', written by rrscale tune on "
            f"{datetime.now().isoformat(timespec='seconds')}\n# from {Path(source).resolve()}"
            f"{' ' + sets if sets else ''}.\n# Continue the sweep with: rrscale tune --resume {folder}\n")
    target = folder / EXPERIMENT_FILE
    tmp = target.with_suffix(".yaml.tmp")
    tmp.write_text(head + body)
    tmp.replace(target)
    return target


def yaml_scalar(value: Any) -> str:
    """``value`` written so that ``--set key=<it>`` reads back the same value and type."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return text[: -len("...")].strip() if text.endswith("...") else text


def set_args(values: dict[str, Any]) -> str:
    """``--set k=v`` for every item, quoted for a POSIX shell."""
    return " ".join(f"--set {shlex.quote(f'{k}={yaml_scalar(v)}')}" for k, v in values.items())
