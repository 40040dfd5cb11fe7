"""The one-page HTML report of a sweep, and attaching it (with its plots) to the parent run.

The page is self-contained (plots inline as base64 PNG) and links every trial to its MLflow
run and the sweep to MLflow's comparison view (:mod:`rrscale.tracking.links`). It holds: what
was swept and where, the best trial and its config, which axis mattered (Optuna's importances,
:mod:`rrscale.tracking.importance`), the ranked trials, the plots and the search space.

``rrscale tune`` calls :func:`attach_report` when a sweep ends (a resumed one too);
``rrscale runs --report FILE`` writes the same page where asked.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient

from rrscale import __version__
from rrscale.config import set_dotted
from rrscale.tracking import links
from rrscale.tracking.importance import Importances, study_importances
from rrscale.tracking.mlflow import GIT_TAG, NOTE_TAG, guarded, resolve_tracking_uri
from rrscale.tracking.plots import write_plots
from rrscale.tracking.sweeps import Sweep, load_curves, load_sweep
from rrscale.tracking.table import MAX_AXES, fmt_param, outcome_counts, table

log = logging.getLogger(__name__)

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;
max-width:1100px;color:#222;padding:0 16px}
h1{font-size:22px;margin-bottom:4px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
a{color:#1a5fb4}table{border-collapse:collapse;font-size:13px}td,th{padding:3px 9px;border-bottom:1px solid #eee}
th{background:#f4f4f4;text-align:left}td.r,th.r{text-align:right;font-variant-numeric:tabular-nums}
tr.best td{background:#eaf7e9;font-weight:600}table.meta td:first-child{color:#666}
pre{background:#f7f7f7;padding:10px;font-size:12px;overflow:auto;max-height:420px}
.plots img{max-width:49%;border:1px solid #eee;margin:2px}.muted{color:#777;font-size:12px}
.bar{display:inline-block;height:11px;background:#1f77b4;vertical-align:middle}
code{background:#f4f4f4;padding:1px 4px}
"""


def _when(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else "-"


def _unflatten(flat: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k in sorted(flat):
        v: Any = flat[k]
        if v in ("True", "False", "None"):  # str() of Python values, as the params were logged
            v = {"True": True, "False": False, "None": None}[v]
        else:
            try:
                v = json.loads(v)
            except (ValueError, TypeError):
                pass
        try:
            set_dotted(out, k, v)
        except (TypeError, AttributeError):
            out[k] = v
    return out


def _quiet_download(client: MlflowClient, run_id: str, path: str, dst: str) -> str:
    """``download_artifacts`` without the progress bar MLflow prints on the sweep's console."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    before = os.environ.get(key)
    os.environ[key] = "false"
    try:
        return client.download_artifacts(run_id, path, dst)
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


def _best_config(client: MlflowClient | None, sw: Sweep) -> tuple[dict[str, Any], str]:
    parent = sw.parent
    if client is not None and parent is not None:
        try:
            names = {a.path for a in client.list_artifacts(parent.run_id)}
            if "best_config.json" in names:
                with tempfile.TemporaryDirectory() as tmp:
                    local = _quiet_download(client, parent.run_id, "best_config.json", tmp)
                    return json.loads(Path(local).read_text()), "best_config.json of the sweep run"
        except (OSError, ValueError) as exc:  # a bad file; MLflow's own failures go to the caller's guard
            log.warning("could not read best_config.json of run %s (%s)", parent.run_id, exc)
    best = sw.best
    if best is None:
        return {}, ""
    return _unflatten(best.params), f"params of trial {best.trial_id}"


def _experiment_tags(client: MlflowClient | None, experiment_id: str) -> dict[str, str]:
    if client is None:
        return {}
    try:
        return dict(client.get_experiment(experiment_id).tags)
    except Exception:  # noqa: BLE001 - the plain runs-table link still works
        return {}


def _a(url: str, text: str, title: str = "") -> str:
    e = html.escape
    return f'<a href="{e(url)}"{f" title={chr(34)}{e(title)}{chr(34)}" if title else ""}>{e(text)}</a>'


def sweep_importances(sw: Sweep) -> Importances | None:
    """The importances of the sweep's study, found through the parent run's tags."""
    parent = sw.parent
    if parent is None or links.OPTUNA_STORAGE_TAG not in parent.tags:
        return None
    return study_importances(parent.tags[links.OPTUNA_STORAGE_TAG],
                             parent.tags.get(links.OPTUNA_STUDY_TAG) or sw.title)


def _importance_html(imp: Importances | None, storage: str) -> str:
    e = html.escape
    if imp is None:
        return "<p class=muted>no Optuna study recorded for this sweep.</p>"
    dashboard = (f"<p class=muted>Open the study with <code>optuna-dashboard {e(storage)}</code> "
                 f"(optional: <code>pip install optuna-dashboard</code>).</p>" if storage else "")
    if not imp.values:
        return f'<p class="muted importance-note">{e(imp.note)}.</p>{dashboard}'
    rows = "".join(f'<tr><td>{e(k)}</td><td class=r>{v:.2f}</td><td><span class=bar style="width:{v * 300:.0f}px">'
                   f"</span></td></tr>" for k, v in imp.values.items())
    return (f'<p>Share of the objective\'s variance explained by each sampled axis, {e(imp.evaluator)}, '
            f"over <b>{imp.finished} finished trials</b> (trials stopped early carry no objective).</p>"
            f'<table class="importances"><tbody>{rows}</tbody></table>{dashboard}')


def _trials_html(sw: Sweep) -> str:
    e = html.escape
    headers, rows, right = table(sw)
    head = "".join(f'<th class="{"r" if r else ""}">{e(h)}</th>' for h, r in zip(headers, right))
    body = []
    best = sw.best is not None
    for i, (row, t) in enumerate(zip(rows, sw.trials)):
        cells = []
        for j, (c, r) in enumerate(zip(row, right)):
            text = _a(links.run_url(sw.uri, sw.experiment_id, t.run_id), c, t.name) if j == 1 else e(c)
            cells.append(f'<td class="{"r" if r else ""}">{text}</td>')
        body.append(f'<tr{" class=best" if i == 0 and best else ""}>{"".join(cells)}</tr>')
    return f'<table class="trials"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def write_report(sw: Sweep, path: Path, plots: list[Path], client: MlflowClient | None = None,
                 importances: Importances | None = None) -> Path:
    """Write the page (see the module docstring) atomically to ``path``."""
    e = html.escape
    parent = sw.parent
    tags = _experiment_tags(client, sw.experiment_id)
    view = links.experiment_url(sw.uri, sw.experiment_id,
                                links.published_view(tags, sw.title) if parent is not None else "")
    hint = links.ui_hint(sw.uri)
    compare = _a(view, "open the comparison in MLflow") + (
        f' <span class=muted>(start the UI first: <code>{e(hint)}</code>)</span>' if hint else "")
    meta: list[tuple[str, str]] = [("experiment", e(sw.experiment)), ("sweep", e(sw.title)), ("MLflow", compare)]
    storage = ""
    if parent is not None:
        dur = parent.wall_seconds()
        done = parent.status != "RUNNING"
        meta += [("parent run", _a(links.run_url(sw.uri, sw.experiment_id, parent.run_id), parent.run_id)),
                 ("description", e(parent.tags.get(NOTE_TAG, "-"))),
                 ("status", e(parent.outcome)), ("started", _when(parent.start)),
                 ("ended", _when(parent.end) if done else "-"),
                 ("duration", f"{dur / 60:.1f} min" if dur is not None and done else "-"),
                 ("git sha", e(parent.tags.get(GIT_TAG, "-"))),
                 ("search space file", e(parent.tags.get("rrscale.search_file", "-")))]
        storage = parent.tags.get(links.OPTUNA_STORAGE_TAG, "")
        if storage:
            meta.append(("Optuna study", f"{e(parent.tags.get(links.OPTUNA_STUDY_TAG, sw.title))} in "
                                         f"<code>{e(storage)}</code>"))
    meta += [("trials", e(f"{len(sw.trials)} ({outcome_counts(sw.trials)})")),
             ("ranked by", e(f"{sw.metric} ({sw.mode})")), ("tracking URI", e(sw.uri)),
             ("generated", e(time.strftime("%Y-%m-%d %H:%M:%S") + f" by rrscale {__version__}"))]
    meta_html = "".join(f"<tr><td>{e(k)}</td><td>{v}</td></tr>" for k, v in meta)

    best = sw.best
    if best is not None:
        axes = ", ".join(f"{a}={fmt_param(best.params.get(a))}" for a in sw.axes[:MAX_AXES])
        best_html = (f"<p><b>{_a(links.run_url(sw.uri, sw.experiment_id, best.run_id), best.name)}</b> &mdash; "
                     f"{e(sw.metric)} = {sw.score(best):.4f}{' &mdash; ' + e(axes) if axes else ''}</p>")
    else:
        best_html = f"<p class=muted>no trial reported {e(sw.metric)} yet.</p>"
    cfg, source = _best_config(client, sw)
    if cfg:
        best_html += (f"<details><summary>best config <span class=muted>({e(source)})</span></summary>"
                      f"<pre>{e(json.dumps(cfg, indent=2, sort_keys=True, default=str))}</pre></details>")

    imgs = []
    for p in plots:
        data = base64.b64encode(Path(p).read_bytes()).decode("ascii")
        imgs.append(f'<img alt="{e(Path(p).stem)}" title="{e(Path(p).name)}" src="data:image/png;base64,{data}">')
    plots_html = "".join(imgs) if imgs else "<p class=muted>no plot: fewer than two scored trials.</p>"

    search_html = ""
    if sw.space:
        search_html = "<h2>Search space</h2><table>" + "".join(
            f"<tr><td>{e(k)}</td><td>{e(v)}</td></tr>" for k, v in sw.space.items()) + "</table>"

    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>rrscale sweep {e(sw.title)}</title>
<style>{_CSS}</style></head><body>
<h1>Sweep {e(sw.title)}</h1>
<table class="meta">{meta_html}</table>
<h2>Best trial</h2>{best_html}
<h2>Which axis mattered</h2>{_importance_html(importances, storage)}
<h2>Trials, best first</h2>{_trials_html(sw)}
<h2>Plots</h2><div class="plots">{plots_html}</div>
{search_html}
</body></html>
"""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".report-", suffix=".html", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(page)
    os.chmod(tmp, 0o644)  # mkstemp makes it 0600; a report is for sharing
    os.replace(tmp, path)
    return path


def build_report(client: MlflowClient, sw: Sweep, out_dir: Path, report: Path | None = None) -> list[Path]:
    """Plots into ``out_dir`` and the report (``out_dir/report.html`` unless ``report``);
    returns the report first, then the plots."""
    curve = load_curves(client, sw, sw.schedule_metric)
    plots = write_plots(sw, Path(out_dir), curve)
    page = write_report(sw, Path(report) if report else Path(out_dir) / "report.html", plots, client,
                        sweep_importances(sw))
    return [page, *plots]


def upload_report(client: MlflowClient, run_id: str, report: Path) -> None:
    """Upload ``report`` to the run as ``report.html`` (whatever its local name)."""
    with tempfile.TemporaryDirectory() as tmp:
        dst = Path(tmp) / "report.html"
        shutil.copyfile(report, dst)
        client.log_artifact(run_id, str(dst))


def attach_report(parent_run_id: str, tracking_uri: str) -> list[str]:
    """Build the sweep's report and plots and attach them to its parent run (``report.html``,
    ``plots/*.png``); returns the artifact paths. Never raises: it runs under the tracker's
    guard (:func:`rrscale.tracking.mlflow.guarded`), so a failure is one warning and a server
    already known to be down is not asked again."""
    if not parent_run_id:
        return []
    uri = resolve_tracking_uri(tracking_uri)

    def build_and_attach() -> list[str]:
        client = MlflowClient(tracking_uri=uri)
        parent = client.get_run(parent_run_id)
        exp = client.get_experiment(parent.info.experiment_id)
        sw = load_sweep(client, exp, uri, parent_run=parent)
        with tempfile.TemporaryDirectory() as tmp:
            report, *plots = build_report(client, sw, Path(tmp))
            client.log_artifact(parent_run_id, str(report))
            for p in plots:
                client.log_artifact(parent_run_id, str(p), artifact_path="plots")
        return ["report.html", *(f"plots/{p.name}" for p in plots)]

    return guarded(uri, "sweep report", [], build_and_attach)
