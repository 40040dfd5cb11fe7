"""``rrscale runs``: rank the trials of a sweep from MLflow, plot them, write an HTML report.

What is ranked: the child runs (trials) of the **latest sweep** of the experiment, i.e. of the
parent run (tag ``rrscale.role = sweep``) that started last; ``sweep="all"`` ranks the trials
of every sweep together (with a ``sweep`` column), ``sweep=NAME`` or a parent run id picks one
(``rrscale runs`` itself always shows the latest sweep). An experiment with runs
but no rrscale sweep (for instance runs logged by hand) has its top-level runs ranked.

The ranking metric is the sweep's ``tune.metric`` / ``tune.mode`` (read from the parent's
params) when the trials report it, else ``probe_top1`` (max), else ``knn_top1``. Trials
without the metric come last. The hyperparameter columns are detected: every param whose
value differs between the ranked trials (well-known axes such as ``method.K`` first).

Nothing is stored outside MLflow: the table, plots and report are all rebuilt from it.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient

from rrscale import __version__
from rrscale.config import set_dotted
from rrscale.tracking.mlflow import (
    GIT_TAG,
    PARENT_TAG,
    ROLE_TAG,
    SWEEP_TAG,
    _search_all,
    resolve_tracking_uri,
    sqlite_path,
)

log = logging.getLogger(__name__)

EXIT_BAD_INPUT = 2
EXIT_TRACKING_DOWN = 1

#: Axes shown first when they vary, in this order; other varying params follow alphabetically.
PRIORITY_AXES = (
    "method.name", "method.K", "method.aggregation", "method.head_width", "method.head_depth",
    "method.focal_gamma", "method.clusters", "method.tau", "method.beta", "method.lambda_gen",
    "method.projector_width", "backbone.name", "train.lr", "train.batch_size", "train.weight_decay",
    "train.optimizer", "train.schedule", "train.epochs",
)
#: Axes that get a "score vs axis" plot when they vary.
PLOT_AXES = ("method.K", "method.aggregation", "method.head_width", "train.lr")
SCORE_METRICS = ("probe_top1", "online_probe_top1", "knn_top1", "nmi", "acc")
COST_METRICS = (("seconds", "train s", 1), ("images_per_s", "img/s", 0), ("gpu_seconds", "GPU s", 1),
                ("cpu_seconds", "CPU s", 1))
MAX_AXES = 8
STATUS_COLOURS = {"FINISHED": "#1f77b4", "KILLED": "#ff7f0e", "FAILED": "#d62728", "RUNNING": "#2ca02c"}


# ----------------------------------------------------------------------------- data


@dataclass
class Trial:
    run_id: str
    name: str
    status: str
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str]
    start: int | None
    end: int | None

    @classmethod
    def from_run(cls, run: Any) -> "Trial":
        return cls(run.info.run_id, run.info.run_name or run.info.run_id[:8], run.info.status,
                   dict(run.data.params), dict(run.data.metrics), dict(run.data.tags),
                   run.info.start_time, run.info.end_time)

    def wall_seconds(self) -> float | None:
        if self.start and self.end and self.end >= self.start:
            return (self.end - self.start) / 1000.0
        return None


@dataclass
class Sweep:
    experiment: str
    experiment_id: str
    uri: str
    parents: list[Trial]
    trials: list[Trial]
    metric: str = "probe_top1"
    mode: str = "max"
    axes: list[str] = field(default_factory=list)

    @property
    def parent(self) -> Trial | None:
        return self.parents[0] if len(self.parents) == 1 else None

    @property
    def title(self) -> str:
        if self.parent is not None:
            return self.parent.tags.get(SWEEP_TAG) or self.parent.name
        return f"{len(self.parents)} sweeps" if self.parents else self.experiment

    def score(self, t: Trial) -> float | None:
        v = t.metrics.get(self.metric)
        return v if v is not None and math.isfinite(v) else None

    @property
    def best(self) -> Trial | None:
        return self.trials[0] if self.trials and self.score(self.trials[0]) is not None else None


class UnknownExperiment(LookupError):
    pass


def _client(uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=uri)


def _experiment(client: MlflowClient, name: str | None) -> Any | None:
    """The named experiment (``UnknownExperiment`` when absent), or the one with the latest sweep."""
    if name:
        exp = client.get_experiment_by_name(name)
        if exp is None or exp.lifecycle_stage != "active":
            known = sorted(e.name for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY))
            raise UnknownExperiment(", ".join(known) if known else "(none)")
        return exp
    exps = client.search_experiments(view_type=ViewType.ACTIVE_ONLY)
    if not exps:
        return None
    ids = [e.experiment_id for e in exps]
    for flt in (f"tags.`{ROLE_TAG}` = 'sweep'", ""):
        runs = client.search_runs(ids, flt, ViewType.ACTIVE_ONLY, max_results=1,
                                  order_by=["attributes.start_time DESC"])
        if runs:
            return client.get_experiment(runs[0].info.experiment_id)
    return None


def load_sweep(client: MlflowClient, exp: Any, uri: str, sweep: str = "", parent_run: Any = None) -> Sweep:
    """Read the parent run(s) and trials of ``exp``; see the module docstring for the choice."""
    eid = exp.experiment_id
    if parent_run is not None:
        parents = [parent_run]
    else:
        parents = _search_all(client, [eid], f"tags.`{ROLE_TAG}` = 'sweep'",
                              order_by=["attributes.start_time DESC"])
        if sweep and sweep != "all":
            parents = [p for p in parents
                       if sweep in (p.info.run_id, p.data.tags.get(SWEEP_TAG), p.info.run_name)]
            if not parents:
                raise LookupError(f"no sweep named {sweep!r} in experiment {exp.name!r}")
        elif not sweep:
            parents = parents[:1]
    runs: list[Any] = []
    for p in parents:
        runs.extend(_search_all(client, [eid], f"tags.{PARENT_TAG} = '{p.info.run_id}'"))
    if not parents:  # no rrscale sweep here: rank the top-level runs
        runs = [r for r in _search_all(client, [eid], "") if PARENT_TAG not in r.data.tags]
    out = Sweep(exp.name, eid, uri, [Trial.from_run(p) for p in parents], [Trial.from_run(r) for r in runs])
    _choose_metric(out)
    _rank(out)
    out.axes = varying_params(out.trials)
    return out


def _choose_metric(sw: Sweep) -> None:
    have = {k for t in sw.trials for k in t.metrics}
    wanted = [(p.params.get("tune.metric"), p.params.get("tune.mode", "max")) for p in sw.parents]
    for metric, mode in [w for w in wanted if w[0]] + [("probe_top1", "max"), ("knn_top1", "max")]:
        if metric in have:
            sw.metric, sw.mode = str(metric), "min" if mode == "min" else "max"
            return
    first = next((p.params.get("tune.metric") for p in sw.parents if p.params.get("tune.metric")), None)
    sw.metric = first or "probe_top1"
    sw.mode = "max"


def _rank(sw: Sweep) -> None:
    sign = -1.0 if sw.mode == "max" else 1.0

    def key(t: Trial) -> tuple[int, float, int]:
        s = sw.score(t)
        return (0 if s is not None else 1, sign * s if s is not None else 0.0, t.start or 0)

    sw.trials.sort(key=key)


def varying_params(trials: list[Trial]) -> list[str]:
    """Param keys whose values differ between trials (a missing value counts as a value)."""
    keys = sorted({k for t in trials for k in t.params})
    vary = [k for k in keys if len({t.params.get(k, "") for t in trials}) > 1]
    first = [k for k in PRIORITY_AXES if k in vary]
    return first + [k for k in vary if k not in first]


# ----------------------------------------------------------------------------- table


def _labels(keys: list[str]) -> dict[str, str]:
    short = {k: k.rsplit(".", 1)[-1] for k in keys}
    counts: dict[str, int] = {}
    for s in short.values():
        counts[s] = counts.get(s, 0) + 1
    return {k: (s if counts[s] == 1 else k) for k, s in short.items()}


def _fmt_param(v: str | None) -> str:
    if v is None:
        return "-"
    try:
        x = float(v)
    except ValueError:
        return v if len(v) <= 18 else v[:17] + "…"
    if x.is_integer() and "e" not in v.lower() and abs(x) < 1e9:
        return str(int(x))
    return f"{x:.3g}"


def _fmt_num(v: float | None, digits: int) -> str:
    if v is None or not math.isfinite(v):
        return "-"
    return f"{v:,.0f}" if digits == 0 else f"{v:.{digits}f}"


def table(sw: Sweep, top: int | None = None) -> tuple[list[str], list[list[str]], list[bool]]:
    """Headers, rows (best first) and a right-align flag per column."""
    axes = sw.axes[:MAX_AXES]
    labels = _labels(axes)
    have = {k for t in sw.trials for k in t.metrics}
    scores = [sw.metric] + [m for m in SCORE_METRICS if m != sw.metric and m in have]
    costs = [(k, lab, d) for k, lab, d in COST_METRICS if k in have]
    several = len(sw.parents) > 1  # trials of several sweeps: say which sweep each comes from
    headers = ["#", "trial"] + ["sweep"] * several + [labels[a] for a in axes] + scores
    headers += [lab for _, lab, _ in costs] + ["status"]
    right = [True, False] + [False] * several + [True] * (len(axes) + len(scores) + len(costs)) + [False]
    rows = []
    for i, t in enumerate(sw.trials[: top if top and top > 0 else None], 1):
        row = [str(i), t.name] + [t.tags.get(SWEEP_TAG, "-")] * several
        row += [_fmt_param(t.params.get(a)) for a in axes]
        row += [_fmt_num(t.metrics.get(m), 4) for m in scores]
        row += [_fmt_num(t.metrics.get(k), d) for k, _, d in costs]
        row.append(t.status.lower())
        rows.append(row)
    return headers, rows, right


def plain_table(headers: list[str], rows: list[list[str]], right: list[bool]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right)).rstrip()

    return "\n".join([line(headers), "  ".join("-" * w for w in widths)] + [line(r) for r in rows])


def _use_rich() -> bool:
    return sys.stdout.isatty()


def _status_counts(trials: list[Trial]) -> str:
    counts: dict[str, int] = {}
    for t in trials:
        counts[t.status.lower()] = counts.get(t.status.lower(), 0) + 1
    return ", ".join(f"{n} {s}" for s, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def headline(sw: Sweep) -> str:
    if sw.parent is not None:
        where = f"sweep '{sw.title}' (run {sw.parent.run_id[:8]})"
    elif sw.parents:
        where = f"{len(sw.parents)} sweeps"
    else:
        where = "no rrscale sweep, top-level runs"
    return (f"experiment '{sw.experiment}', {where}: {len(sw.trials)} trial(s) "
            f"({_status_counts(sw.trials)}); ranked by {sw.metric} ({sw.mode})")


def print_table(sw: Sweep, top: int) -> None:
    headers, rows, right = table(sw, top)
    note = f" (top {len(rows)} of {len(sw.trials)})" if len(rows) < len(sw.trials) else ""
    if _use_rich():
        from rich.console import Console
        from rich.table import Table

        tab = Table(title=headline(sw) + note, title_justify="left")
        for h, r in zip(headers, right):
            tab.add_column(h, justify="right" if r else "left", no_wrap=True)
        for i, row in enumerate(rows):
            tab.add_row(*row, style="bold green" if i == 0 and sw.best is not None else None)
        Console().print(tab)
    else:
        print(headline(sw) + note)
        print(plain_table(headers, rows, right))


# ----------------------------------------------------------------------------- plots


def _figure(width: float = 6.4, height: float = 4.2) -> Any:
    # An explicit Agg canvas: no pyplot, no global backend switch, safe inside the driver.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _as_float(v: str | None) -> float | None:
    try:
        return float(v) if v is not None else None
    except ValueError:
        return None


def _legend(ax: Any, statuses: set[str]) -> None:
    """One legend: the labelled artists (mean, best, front) plus a colour key for the statuses."""
    from matplotlib.lines import Line2D

    handles, labels = ax.get_legend_handles_labels()
    if len(statuses) > 1:
        for st in sorted(statuses):
            handles.append(Line2D([], [], marker="o", ls="", color=STATUS_COLOURS.get(st, "grey")))
            labels.append(st.lower())
    if handles:
        ax.legend(handles, labels, fontsize=8, loc="best", framealpha=0.85)


def _plot_axis(sw: Sweep, key: str, label: str, path: Path) -> Path | None:
    pts = [(t.params.get(key), sw.score(t), t) for t in sw.trials]
    pts = [(v, s, t) for v, s, t in pts if v is not None and s is not None]
    if len({v for v, _, _ in pts}) < 2:
        return None
    nums = [_as_float(v) for v, _, _ in pts]
    numeric = all(x is not None for x in nums)
    fig = _figure()
    ax = fig.add_subplot()
    best = sw.best
    groups: dict[Any, list[float]] = {}
    if numeric:
        xs = [float(x) for x in nums if x is not None]
        for x, (_, s, t) in zip(xs, pts):
            ax.scatter(x, s, color=STATUS_COLOURS.get(t.status, "grey"), s=36, alpha=0.85, zorder=3)
            groups.setdefault(x, []).append(s)
        pow2 = all(x >= 1 and x.is_integer() and int(x) & (int(x) - 1) == 0 for x in xs)
        if pow2 and max(xs) / min(xs) >= 4:  # K, widths: 4, 8, 16, 32 ... evenly spaced
            ax.set_xscale("log", base=2)
        elif min(xs) > 0 and (key.endswith(("lr", "weight_decay")) or max(xs) / min(xs) >= 50):
            ax.set_xscale("log")
        if len(groups) < len(pts) and len(groups) <= 12:  # repeated values: a mean per value
            gx = sorted(groups)
            ax.plot(gx, [sum(groups[g]) / len(groups[g]) for g in gx], color="black", lw=1, alpha=0.6,
                    label="mean", zorder=2)
        if best is not None and best.params.get(key) is not None:
            ax.scatter(float(best.params[key]), sw.score(best), marker="*", s=220, color="gold",
                       edgecolor="black", zorder=4, label=f"best ({best.name})")
        if len(groups) <= 12:
            ax.set_xticks(sorted(groups))
            ax.set_xticklabels([_fmt_param(str(g)) for g in sorted(groups)])
            ax.minorticks_off()
    else:
        cats = sorted({v for v, _, _ in pts})
        size = {c: sum(1 for v, _, _ in pts if v == c) for c in cats}
        seen: dict[str, int] = {}
        for v, s, t in pts:
            j = seen.get(v, 0)
            seen[v] = j + 1
            x = cats.index(v) + (j - (size[v] - 1) / 2) * min(0.08, 0.6 / size[v])  # centred spread
            ax.scatter(x, s, color=STATUS_COLOURS.get(t.status, "grey"), s=36, alpha=0.85, zorder=3)
            groups.setdefault(v, []).append(s)
            if t is best:
                ax.scatter(x, s, marker="*", s=220, color="gold", edgecolor="black", zorder=4,
                           label=f"best ({best.name})")
        ax.scatter(range(len(cats)), [sum(groups[c]) / len(groups[c]) for c in cats], marker="_", s=600,
                   color="black", zorder=2, label="mean")
        ax.set_xticks(range(len(cats)))
        ax.set_xticklabels(cats)
        ax.set_xlim(-0.6, len(cats) - 0.4)
    ax.set_xlabel(key)
    ax.set_ylabel(sw.metric)
    ax.set_title(f"{sw.metric} vs {label} ({len(pts)} trials, sweep {sw.title})", fontsize=10)
    ax.grid(alpha=0.3)
    _legend(ax, {t.status for _, _, t in pts})
    fig.savefig(path)
    return path


def _cost(sw: Sweep) -> tuple[str, str, dict[str, float]]:
    """Cost per trial: GPU seconds if any, else CPU seconds, else training seconds, else wall time."""
    for key, label in (("gpu_seconds", "GPU seconds"), ("cpu_seconds", "CPU seconds"),
                       ("seconds", "training seconds")):
        vals = {t.run_id: t.metrics[key] for t in sw.trials if t.metrics.get(key) is not None}
        if any(v > 0 for v in vals.values()):
            return key, label, vals
    vals = {t.run_id: w for t in sw.trials if (w := t.wall_seconds()) is not None}
    return "wall", "wall-clock seconds", vals


def pareto_front(points: list[tuple[float, float, Any]], mode: str = "max") -> list[tuple[float, float, Any]]:
    """Points not dominated by a cheaper-or-equal point with a better-or-equal score, by cost."""
    sign = 1.0 if mode == "max" else -1.0
    front: list[tuple[float, float, Any]] = []
    for c, s, t in sorted(points, key=lambda p: (p[0], -sign * p[1])):
        if not front or sign * s > sign * front[-1][1]:
            front.append((c, s, t))
    return front


def _plot_pareto(sw: Sweep, path: Path) -> Path | None:
    _, label, cost = _cost(sw)
    pts = [(cost[t.run_id], s, t) for t in sw.trials
           if t.run_id in cost and (s := sw.score(t)) is not None and math.isfinite(cost[t.run_id])]
    if len(pts) < 2:
        return None
    front = pareto_front(pts, sw.mode)
    fig = _figure()
    ax = fig.add_subplot()
    for c, s, t in pts:
        ax.scatter(c, s, color=STATUS_COLOURS.get(t.status, "grey"), s=36, alpha=0.85, zorder=3)
    fx, fy = [p[0] for p in front], [p[1] for p in front]
    ax.step(fx, fy, where="post", color="crimson", lw=1.5, zorder=2, label="Pareto front")
    ax.scatter(fx, fy, facecolor="none", edgecolor="crimson", s=110, lw=1.5, zorder=4)
    for c, s, t in front[:10]:
        ax.annotate(t.name, (c, s), textcoords="offset points", xytext=(5, -11), fontsize=7)
    costs = [p[0] for p in pts]
    if min(costs) > 0 and max(costs) / min(costs) >= 30:
        ax.set_xscale("log")
    ax.set_xlabel(f"cost: {label} per trial")
    ax.set_ylabel(sw.metric)
    ax.set_title(f"{sw.metric} vs cost ({len(pts)} trials, sweep {sw.title})", fontsize=10)
    ax.grid(alpha=0.3)
    _legend(ax, {t.status for _, _, t in pts})
    fig.savefig(path)
    return path


def write_plots(sw: Sweep, out_dir: Path) -> list[Path]:
    """PNG files: ``score_vs_<axis>.png`` for K / aggregation / head width / lr (those that vary;
    else the first varying params) and ``pareto.png``; returns the files written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    axes = [a for a in PLOT_AXES if a in sw.axes] or sw.axes[:3]
    labels = _labels(axes)
    written = []
    for key in axes:
        name = "".join(ch if ch.isalnum() or ch in "_-" else "_" for ch in labels[key])
        p = _plot_axis(sw, key, labels[key], out_dir / f"score_vs_{name}.png")
        if p is not None:
            written.append(p)
    p = _plot_pareto(sw, out_dir / "pareto.png")
    if p is not None:
        written.append(p)
    return written


# ----------------------------------------------------------------------------- report


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;
max-width:1100px;color:#222;padding:0 16px}
h1{font-size:22px;margin-bottom:4px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:13px}td,th{padding:3px 9px;border-bottom:1px solid #eee}
th{background:#f4f4f4;text-align:left}td.r,th.r{text-align:right;font-variant-numeric:tabular-nums}
tr.best td{background:#eaf7e9;font-weight:600}table.meta td:first-child{color:#666}
pre{background:#f7f7f7;padding:10px;font-size:12px;overflow:auto;max-height:420px}
.plots img{max-width:49%;border:1px solid #eee;margin:2px}.muted{color:#777;font-size:12px}
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


def _best_config(client: MlflowClient | None, sw: Sweep) -> tuple[dict[str, Any], str]:
    parent = sw.parent
    if client is not None and parent is not None:
        try:
            names = {a.path for a in client.list_artifacts(parent.run_id)}
            if "best_config.json" in names:
                with tempfile.TemporaryDirectory() as tmp:
                    local = client.download_artifacts(parent.run_id, "best_config.json", tmp)
                    return json.loads(Path(local).read_text()), "best_config.json of the sweep run"
        except Exception as exc:  # noqa: BLE001
            log.warning("could not read best_config.json of run %s (%s)", parent.run_id, exc)
    best = sw.best
    if best is None:
        return {}, ""
    return _unflatten(best.params), f"params of trial {best.name}"


def _html_table(headers: list[str], rows: list[list[str]], right: list[bool], best_first: bool) -> str:
    e = html.escape
    head = "".join(f'<th class="{"r" if r else ""}">{e(h)}</th>' for h, r in zip(headers, right))
    body = []
    for i, row in enumerate(rows):
        cls = ' class="best"' if i == 0 and best_first else ""
        cells = "".join(f'<td class="{"r" if r else ""}">{e(c)}</td>' for c, r in zip(row, right))
        body.append(f"<tr{cls}>{cells}</tr>")
    return f'<table class="trials"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def write_report(sw: Sweep, path: Path, plots: list[Path], client: MlflowClient | None = None) -> Path:
    """One self-contained HTML page: metadata, best trial and config, ranked table, plots
    (inline base64 PNG) and the search space. Written atomically."""
    e = html.escape
    parent = sw.parent
    meta: list[tuple[str, str]] = [("experiment", sw.experiment), ("sweep", sw.title)]
    if parent is not None:
        dur = parent.wall_seconds()
        meta += [("parent run", parent.run_id), ("status", parent.status.lower()),
                 ("started", _when(parent.start)),
                 ("ended", _when(parent.end) if parent.status != "RUNNING" else "-"),
                 ("duration", f"{dur / 60:.1f} min" if dur is not None and parent.status != "RUNNING"
                  else "-"),
                 ("git sha", parent.tags.get(GIT_TAG, "-")),
                 ("search space file", parent.tags.get("rrscale.search_file", "-"))]
        summary = {k: v for k, v in parent.metrics.items()}
        if summary:
            meta.append(("sweep metrics", ", ".join(f"{k}={v:.4g}" for k, v in sorted(summary.items()))))
    meta += [("trials", f"{len(sw.trials)} ({_status_counts(sw.trials)})"),
             ("ranked by", f"{sw.metric} ({sw.mode})"), ("tracking URI", sw.uri),
             ("generated", time.strftime("%Y-%m-%d %H:%M:%S") + f" by rrscale {__version__}")]
    meta_html = "".join(f"<tr><td>{e(k)}</td><td>{e(str(v))}</td></tr>" for k, v in meta)

    best = sw.best
    if best is not None:
        axes = ", ".join(f"{a}={_fmt_param(best.params.get(a))}" for a in sw.axes[:MAX_AXES])
        best_html = (f"<p><b>{e(best.name)}</b> &mdash; {e(sw.metric)} = {sw.score(best):.4f}"
                     f"{' &mdash; ' + e(axes) if axes else ''} "
                     f"<span class=muted>(run {e(best.run_id)})</span></p>")
    else:
        best_html = f"<p class=muted>no trial reported {e(sw.metric)} yet.</p>"
    cfg, source = _best_config(client, sw)
    if cfg:
        best_html += (f"<details open><summary>best config <span class=muted>({e(source)})</span></summary>"
                      f"<pre>{e(json.dumps(cfg, indent=2, sort_keys=True, default=str))}</pre></details>")

    headers, rows, right = table(sw)
    imgs = []
    for p in plots:
        data = base64.b64encode(Path(p).read_bytes()).decode("ascii")
        imgs.append(f'<img alt="{e(Path(p).stem)}" title="{e(Path(p).name)}" '
                    f'src="data:image/png;base64,{data}">')
    plots_html = "".join(imgs) if imgs else "<p class=muted>no plot: fewer than two scored trials.</p>"

    search_html = ""
    if parent is not None:
        space = {k.removeprefix("search."): v for k, v in parent.params.items() if k.startswith("search.")}
        if space:
            search_html = "<h2>Search space</h2><table>" + "".join(
                f"<tr><td>{e(k)}</td><td>{e(v)}</td></tr>" for k, v in sorted(space.items())) + "</table>"

    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>rrscale sweep {e(sw.title)}</title>
<style>{_CSS}</style></head><body>
<h1>Sweep {e(sw.title)}</h1>
<table class="meta">{meta_html}</table>
<h2>Best trial</h2>{best_html}
<h2>Trials, best first</h2>{_html_table(headers, rows, right, best is not None)}
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


def attach_report(client: MlflowClient, run_id: str, report: Path) -> None:
    """Upload ``report`` to the run as ``report.html`` (whatever its local name)."""
    with tempfile.TemporaryDirectory() as tmp:
        dst = Path(tmp) / "report.html"
        shutil.copyfile(report, dst)
        client.log_artifact(run_id, str(dst))


# ----------------------------------------------------------------------------- entry points


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


def main(experiment: str | None, tracking_uri: str = "", plots: Path | None = None,
         report: Path | None = None, top: int = 20, *, sweep: str = "") -> int:
    """``rrscale runs``: print the ranked trials of the latest sweep; optional plots and report.

    ``sweep``: ``""`` the latest sweep, ``"all"`` every sweep, or a sweep name / parent run id.
    Exit codes: 0 (also when there is nothing to show), 2 for an unknown experiment or sweep,
    1 when the tracking store cannot be read.
    """
    uri = resolve_tracking_uri(tracking_uri)
    db = sqlite_path(uri)
    if db is not None and not db.exists():  # reading would create an empty database
        if experiment:
            print(f"rrscale: error: unknown MLflow experiment '{experiment}': no MLflow store at {db}; "
                  "known: (none)", file=sys.stderr)
            return EXIT_BAD_INPUT
        print(f"no MLflow runs yet: {db} does not exist (run `rrscale tune FILE` first, "
              "or pass --tracking-uri)")
        return 0
    with _bounded_http():
        client = _client(uri)
        try:
            exp = _experiment(client, experiment)
        except UnknownExperiment as exc:
            print(f"rrscale: error: unknown MLflow experiment '{experiment}' at {uri}; known: {exc}",
                  file=sys.stderr)
            return EXIT_BAD_INPUT
        except Exception as exc:  # noqa: BLE001
            print(f"rrscale: error: cannot read MLflow at {uri}: {str(exc).splitlines()[0][:300]}",
                  file=sys.stderr)
            return EXIT_TRACKING_DOWN
        if exp is None:
            print(f"no MLflow runs yet at {uri} (run `rrscale tune FILE` first)")
            return 0
        try:
            sw = load_sweep(client, exp, uri, sweep)
        except LookupError as exc:
            print(f"rrscale: error: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT
        except Exception as exc:  # noqa: BLE001
            print(f"rrscale: error: cannot read MLflow at {uri}: {str(exc).splitlines()[0][:300]}",
                  file=sys.stderr)
            return EXIT_TRACKING_DOWN
        if not sw.trials:
            print(f"experiment '{exp.name}' has no trial runs yet"
                  + (f" (sweep '{sw.title}' is {sw.parent.status.lower()})" if sw.parent is not None else ""))
            return 0
        print_table(sw, top)
        written: list[Path] = []
        if plots is not None:
            written = write_plots(sw, Path(plots))
            shown = ", ".join(str(p) for p in written) if written else "none (fewer than two scored trials)"
            print(f"plots: {shown}")
        if report is not None:
            if not written:
                with tempfile.TemporaryDirectory() as tmp:
                    path = write_report(sw, Path(report), write_plots(sw, Path(tmp)), client)
            else:
                path = write_report(sw, Path(report), written, client)
            where = ""
            if sw.parent is not None:
                try:
                    attach_report(client, sw.parent.run_id, path)
                    where = f" (attached to MLflow run {sw.parent.run_id} as report.html)"
                except Exception as exc:  # noqa: BLE001
                    where = f" (could not attach it to MLflow: {str(exc).splitlines()[0][:200]})"
            print(f"report: {path}{where}")
    return 0


def sweep_report(parent_run_id: str, tracking_uri: str, out_dir: Path) -> list[Path]:
    """Write the plots and ``report.html`` of one sweep into ``out_dir``; return the paths
    (report first) for :func:`rrscale.tracking.mlflow.finish_sweep` to attach. Never raises:
    on failure it logs a warning and returns what was written (possibly nothing)."""
    if not parent_run_id:
        return []
    written: list[Path] = []
    try:
        uri = resolve_tracking_uri(tracking_uri)
        client = _client(uri)
        parent = client.get_run(parent_run_id)
        exp = client.get_experiment(parent.info.experiment_id)
        sw = load_sweep(client, exp, uri, parent_run=parent)
        written = write_plots(sw, Path(out_dir))
        report = write_report(sw, Path(out_dir) / "report.html", written, client)
        return [report, *written]
    except Exception as exc:  # noqa: BLE001 - reporting must never kill a sweep
        log.warning("sweep report for run %s failed (%s: %s)", parent_run_id, type(exc).__name__,
                    str(exc).splitlines()[0][:300] if str(exc) else "")
        return written
