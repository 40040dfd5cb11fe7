"""``rrscale runs``: the sweeps of an experiment, the ranked trials of one, plots and a report.

``rrscale runs EXPERIMENT`` lists every sweep of the experiment (one line each: name, start,
status, trials, best) and shows the ranked trials of the latest, or of ``--sweep NAME`` (a
sweep name or parent run id; ``all`` ranks every sweep's trials together), with the link to
MLflow's comparison view. Without EXPERIMENT the experiment with the latest sweep is used.
"""

from __future__ import annotations

import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from mlflow.tracking import MlflowClient

from rrscale.tracking import links
from rrscale.tracking.mlflow import resolve_tracking_uri, sqlite_path
from rrscale.tracking.plots import write_plots
from rrscale.tracking.report import build_report, upload_report
from rrscale.tracking.sweeps import UnknownExperiment, experiment, list_sweeps, load_curves, load_sweep
from rrscale.tracking.table import print_table, sweep_lines

EXIT_BAD_INPUT = 2
EXIT_TRACKING_DOWN = 1


@contextmanager
def _bounded_http() -> Iterator[None]:
    """For the CLI: fail in seconds, not MLflow's ~4 minutes of retries, unless the user chose."""
    defaults = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
    added = [k for k in defaults if k not in os.environ]
    for k in added:
        os.environ[k] = defaults[k]
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__


def main(experiment_name: str | None, tracking_uri: str = "", plots: Path | None = None,
         report: Path | None = None, top: int = 20, *, sweep: str = "") -> int:
    """Print the sweeps and the ranked trials of one; optional plots and report (module docstring).

    Exit codes: 0 (also when there is nothing to show), 2 for an unknown experiment or sweep,
    1 when the tracking store cannot be read.
    """
    uri = resolve_tracking_uri(tracking_uri)
    db = sqlite_path(uri)
    if db is not None and not db.exists():  # reading would create an empty database
        if experiment_name:
            print(f"rrscale: error: unknown MLflow experiment '{experiment_name}': no MLflow store at {db}; "
                  "known: (none)", file=sys.stderr)
            return EXIT_BAD_INPUT
        print(f"no MLflow runs yet: {db} does not exist (run `rrscale tune FILE` first, "
              "or pass --tracking-uri)")
        return 0
    with _bounded_http():
        client = MlflowClient(tracking_uri=uri)
        try:
            exp = experiment(client, experiment_name)
        except UnknownExperiment as exc:
            print(f"rrscale: error: unknown MLflow experiment '{experiment_name}' at {uri}; known: {exc}",
                  file=sys.stderr)
            return EXIT_BAD_INPUT
        except Exception as exc:  # noqa: BLE001
            print(f"rrscale: error: cannot read MLflow at {uri}: {_first_line(exc)}", file=sys.stderr)
            return EXIT_TRACKING_DOWN
        if exp is None:
            print(f"no MLflow runs yet at {uri} (run `rrscale tune FILE` first)")
            return 0
        sweeps = []
        try:
            sweeps = list_sweeps(client, exp)
            sw = load_sweep(client, exp, uri, sweep)
        except LookupError as exc:
            known = ", ".join(s.name for s in sweeps) or "(none)"
            print(f"rrscale: error: --sweep: {exc}; known: {known}", file=sys.stderr)
            return EXIT_BAD_INPUT
        except Exception as exc:  # noqa: BLE001
            print(f"rrscale: error: cannot read MLflow at {uri}: {_first_line(exc)}", file=sys.stderr)
            return EXIT_TRACKING_DOWN
        if sweeps:
            print("\n".join(sweep_lines(exp.name, sweeps, sw.parent.run_id if sw.parent else "")))
            print()
        if not sw.trials:
            print(f"experiment '{exp.name}' has no trial runs yet"
                  + (f" (sweep '{sw.title}' is {sw.parent.outcome})" if sw.parent is not None else ""))
            return 0
        print_table(sw, top)
        view = links.published_view(exp.tags, sw.title) if sw.parent is not None else ""
        hint = links.ui_hint(uri)
        print(f"compare in MLflow: {links.experiment_url(uri, exp.experiment_id, view)}"
              + (f"  (start the UI with: {hint})" if hint else ""))
        written: list[Path] = []
        if plots is not None:
            written = write_plots(sw, Path(plots), load_curves(client, sw, sw.schedule_metric))
            shown = ", ".join(str(p) for p in written) if written else "none (fewer than two scored trials)"
            print(f"plots: {shown}")
        if report is not None:
            with tempfile.TemporaryDirectory() as tmp:
                path = build_report(client, sw, Path(tmp), Path(report))[0]
            where = ""
            if sw.parent is not None:
                try:
                    upload_report(client, sw.parent.run_id, path)
                    where = f" (attached to MLflow run {sw.parent.run_id} as report.html)"
                except Exception as exc:  # noqa: BLE001
                    where = f" (could not attach it to MLflow: {_first_line(exc)[:200]})"
            print(f"report: {path}{where}")
    return 0
