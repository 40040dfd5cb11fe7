"""PNG plots of a sweep: score against each sampled axis, per-epoch curves, score against cost.

Colours say a trial's outcome. Trials without the objective (stopped early by ASHA,
interrupted) are drawn hollow: in the score plots on a strip under the scored trials, labelled
with the epoch they reached; in the curves plot at the epoch where they stopped. Axes Optuna
samples on a log scale (``loguniform``, ``log: true``; read from the parent run's
``search.*`` params) get a log x axis with a few readable ticks.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from rrscale.tracking import naming
from rrscale.tracking.sweeps import Sweep, Trial
from rrscale.tracking.table import labels

#: Axes plotted when the sweep's space is unknown and they vary.
PLOT_AXES = ("method.K", "method.aggregation", "method.head_width", "train.lr")
MAX_PLOTTED_AXES = 6
OUTCOME_COLOURS = {naming.FINISHED: "#1f77b4", naming.STOPPED_EARLY: "#ff7f0e", naming.FAILED: "#d62728",
                   naming.INTERRUPTED: "#9467bd", naming.RUNNING: "#2ca02c"}
UNSCORED = (naming.STOPPED_EARLY, naming.INTERRUPTED, naming.RUNNING)


def figure(width: float = 6.4, height: float = 4.2) -> Any:
    # An explicit Agg canvas: no pyplot, no global backend switch, safe inside the driver.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def colour(t: Trial) -> str:
    return OUTCOME_COLOURS.get(t.outcome, "grey")


def _as_float(v: str | None) -> float | None:
    try:
        return float(v) if v is not None else None
    except ValueError:
        return None


def _legend(ax: Any, outcomes: set[str]) -> None:
    """One legend: the labelled artists (mean, best, front) plus a colour key for the outcomes."""
    from matplotlib.lines import Line2D

    handles, names = ax.get_legend_handles_labels()
    if len(outcomes) > 1:
        for o in sorted(outcomes):
            hollow = o in UNSCORED
            handles.append(Line2D([], [], marker="o", ls="", markerfacecolor="none" if hollow else
                                  OUTCOME_COLOURS.get(o, "grey"), markeredgecolor=OUTCOME_COLOURS.get(o, "grey")))
            names.append(o)
    if handles:
        ax.legend(handles, names, fontsize=8, loc="best", framealpha=0.85)


def bounds(axis_text: str) -> tuple[float, float] | None:
    """The [low, high] of a numeric search axis as the parent records it (``loguniform[a, b]``)."""
    m = re.match(r"^(?:uniform|loguniform|int)\[([^,\]]+),\s*([^\]]+)\]", axis_text)
    if not m:
        return None
    try:
        return float(m.group(1)), float(m.group(2))
    except ValueError:
        return None


def log_ticks(ax: Any, low: float, high: float) -> None:
    """A log x axis with 1-2-5 ticks (every integer multiple when the range is narrow), printed
    short (``5.0e-4``, ``0.001``), and no minor labels to collide."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

    ax.set_xscale("log")
    subs = (1.0, 2.0, 5.0) if high / low >= 5 else tuple(float(i) for i in range(1, 10))
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=subs))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: naming.short_number(x)))
    ax.xaxis.set_minor_locator(NullLocator())


def _is_log(sw: Sweep, key: str, xs: list[float]) -> bool:
    text = sw.space.get(key)
    if text is not None:
        return naming.is_log_axis(text)
    return min(xs) > 0 and (key.endswith(("lr", "weight_decay")) or max(xs) / min(xs) >= 50)


def plot_axis(sw: Sweep, key: str, label: str, path: Path) -> Path | None:
    """The objective against one axis; unscored trials hollow on a strip below."""
    scored = [(t.params.get(key), s, t) for t in sw.trials if (s := sw.score(t)) is not None]
    scored = [(v, s, t) for v, s, t in scored if v is not None]
    unscored = [(t.params[key], t) for t in sw.trials
                if sw.score(t) is None and t.outcome in UNSCORED and t.params.get(key) is not None]
    values = {v for v, _, _ in scored} | {v for v, _ in unscored}
    if len(values) < 2 or not scored:
        return None
    numeric = all(_as_float(v) is not None for v in values)
    fig = figure()
    ax = fig.add_subplot()
    best = sw.best
    lo = min(s for _, s, _ in scored)
    hi = max(s for _, s, _ in scored)
    strip = lo - 0.15 * ((hi - lo) or max(abs(hi), 1e-3))
    if numeric:
        def xpos(v: str) -> float:
            return float(v)
    else:
        cats = sorted(values)
        size = {c: sum(1 for v, _, _ in scored if v == c) + sum(1 for v, _ in unscored if v == c) for c in cats}
        seen: dict[str, int] = {}

        def xpos(v: str) -> float:
            j = seen.get(v, 0)
            seen[v] = j + 1
            return cats.index(v) + (j - (size[v] - 1) / 2) * min(0.08, 0.6 / size[v])  # centred spread

    groups: dict[Any, list[float]] = {}
    for v, s, t in scored:
        x = xpos(v)
        ax.scatter(x, s, color=colour(t), s=36, alpha=0.85, zorder=3)
        groups.setdefault(float(v) if numeric else v, []).append(s)
        if t is best:
            ax.scatter(x, s, marker="*", s=220, color="gold", edgecolor="black", zorder=4,
                       label=f"best ({best.trial_id})")
    for v, t in unscored:
        x = xpos(v)
        ax.scatter(x, strip, facecolor="none", edgecolor=colour(t), s=46, lw=1.5, zorder=3)
        reached = t.epochs_reached
        if reached is not None:
            ax.annotate(f"e{reached}", (x, strip), textcoords="offset points", xytext=(5, 3), fontsize=7,
                        color=colour(t))
    if unscored:
        ax.axhline((strip + lo) / 2, color="grey", lw=0.6, ls=":", zorder=1)
        ax.annotate(f"no {sw.metric} (e = epochs reached)", (0.01, 0.02), xycoords="axes fraction", fontsize=7,
                    color="grey")
    if numeric:
        xs = sorted(float(v) for v in values)
        ints = all(x.is_integer() for x in xs)
        pow2 = ints and all(x >= 1 and int(x) & (int(x) - 1) == 0 for x in xs)
        if pow2 and max(xs) / min(xs) >= 4:  # K, widths: 4, 8, 16, 32 ... evenly spaced
            ax.set_xscale("log", base=2)
        elif _is_log(sw, key, xs) and min(xs) > 0:
            low, high = bounds(sw.space.get(key, "")) or (min(xs), max(xs))
            log_ticks(ax, low, high)
            ax.set_xlim(low / 1.15, high * 1.15)
        if len(groups) < len(scored) and len(groups) <= 12:  # repeated values: a mean per value
            gx = sorted(groups)
            ax.plot(gx, [sum(groups[g]) / len(groups[g]) for g in gx], color="black", lw=1, alpha=0.6,
                    label="mean", zorder=2)
        if ints and len(xs) <= 12:  # a few integer values (K, widths): a tick on each
            ax.set_xticks(xs)
            ax.set_xticklabels([naming.short_number(int(x)) for x in xs])
            ax.minorticks_off()
    else:
        ax.scatter([cats.index(c) for c in cats if c in groups], [sum(groups[c]) / len(groups[c]) for c in cats
                                                                if c in groups],
                   marker="_", s=600, color="black", zorder=2, label="mean")
        ax.set_xticks(range(len(cats)))
        ax.set_xticklabels(cats)
        ax.set_xlim(-0.6, len(cats) - 0.4)
    ax.set_xlabel(key)
    ax.set_ylabel(sw.metric)
    n = len(scored) + len(unscored)
    ax.set_title(f"{sw.metric} vs {label} ({n} trials, sweep {sw.title})", fontsize=10)
    ax.grid(alpha=0.3)
    _legend(ax, {t.outcome for _, _, t in scored} | {t.outcome for _, t in unscored})
    fig.savefig(path)
    return path


def plot_curves(sw: Sweep, key: str, path: Path) -> Path | None:
    """Every trial's per-epoch ``key`` (``epoch/knn_top1``): a filled dot where a trial
    finished, a hollow one where ASHA stopped it, dotted lines at the epochs it stopped trials."""
    from matplotlib.ticker import MaxNLocator

    trials = [t for t in sw.trials if t.curves.get(key)]
    if not trials:
        return None
    fig = figure()
    ax = fig.add_subplot()
    best = sw.best
    stops: dict[int, int] = {}
    for t in reversed(trials):  # the best last, on top
        xs, ys = zip(*t.curves[key])
        lead = t is best
        ax.plot(xs, ys, color=colour(t), lw=2.4 if lead else 1.2, alpha=0.95 if lead else 0.7, zorder=3 if lead else 2,
                label=f"best ({t.trial_id})" if lead else None)
        if t.outcome in UNSCORED:
            ax.scatter(xs[-1], ys[-1], facecolor="white", edgecolor=colour(t), s=50, lw=1.5, zorder=4)
            if t.outcome == naming.STOPPED_EARLY:
                stops[xs[-1]] = stops.get(xs[-1], 0) + 1
        else:
            ax.scatter(xs[-1], ys[-1], color=colour(t), s=30, zorder=4)
    for epoch, n in sorted(stops.items()):
        ax.axvline(epoch, color="#ff7f0e", lw=0.8, ls=":", zorder=1)
        ax.annotate(f"ASHA stopped {n}", (epoch, 1.0), xycoords=("data", "axes fraction"), xytext=(3, -10),
                    textcoords="offset points", fontsize=7, color="#b35806")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(key)
    ax.set_title(f"{key} per epoch ({len(trials)} trials, sweep {sw.title})", fontsize=10)
    ax.grid(alpha=0.3)
    _legend(ax, {t.outcome for t in trials})
    fig.savefig(path)
    return path


def cost(sw: Sweep) -> tuple[str, str, dict[str, float]]:
    """Cost per trial: GPU seconds if any, else CPU seconds, else training seconds, else wall time."""
    for key, label in (("gpu_seconds", "GPU seconds"), ("cpu_seconds", "CPU seconds"),
                       ("seconds", "training seconds")):
        vals = {t.run_id: v for t in sw.trials if (v := t.value(key)) is not None}
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


def plot_pareto(sw: Sweep, path: Path) -> Path | None:
    _, label, costs = cost(sw)
    pts = [(costs[t.run_id], s, t) for t in sw.trials
           if t.run_id in costs and (s := sw.score(t)) is not None and math.isfinite(costs[t.run_id])]
    if len(pts) < 2:
        return None
    front = pareto_front(pts, sw.mode)
    fig = figure()
    ax = fig.add_subplot()
    for c, s, t in pts:
        ax.scatter(c, s, color=colour(t), s=36, alpha=0.85, zorder=3)
    fx, fy = [p[0] for p in front], [p[1] for p in front]
    ax.step(fx, fy, where="post", color="crimson", lw=1.5, zorder=2, label="Pareto front")
    ax.scatter(fx, fy, facecolor="none", edgecolor="crimson", s=110, lw=1.5, zorder=4)
    for c, s, t in front[:10]:
        ax.annotate(t.trial_id, (c, s), textcoords="offset points", xytext=(5, -11), fontsize=7)
    values = [p[0] for p in pts]
    if min(values) > 0 and max(values) / min(values) >= 30:
        ax.set_xscale("log")
    ax.set_xlabel(f"cost: {label} per trial")
    ax.set_ylabel(sw.metric)
    ax.set_title(f"{sw.metric} vs cost ({len(pts)} trials, sweep {sw.title})", fontsize=10)
    ax.grid(alpha=0.3)
    _legend(ax, {t.outcome for _, _, t in pts})
    fig.savefig(path)
    return path


def plotted_axes(sw: Sweep) -> list[str]:
    """The sampled axes that vary (from the parent's search space), else the well-known ones,
    else the first varying params."""
    searched = [a for a in sw.space if a in sw.axes]
    return (searched or [a for a in PLOT_AXES if a in sw.axes] or sw.axes[:3])[:MAX_PLOTTED_AXES]


def write_plots(sw: Sweep, out_dir: Path, curve: str = "") -> list[Path]:
    """PNG files: ``score_vs_<axis>.png`` per plotted axis, ``curves.png`` when ``curve`` (an
    ``epoch/...`` key loaded by :func:`rrscale.tracking.sweeps.load_curves`) is given, and
    ``pareto.png``; returns the files written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    axes = plotted_axes(sw)
    names = labels(axes)
    written = []
    for key in axes:
        name = "".join(ch if ch.isalnum() or ch in "_-" else "_" for ch in names[key])
        p = plot_axis(sw, key, names[key], out_dir / f"score_vs_{name}.png")
        if p is not None:
            written.append(p)
    if curve:
        p = plot_curves(sw, curve, out_dir / "curves.png")
        if p is not None:
            written.append(p)
    p = plot_pareto(sw, out_dir / "pareto.png")
    if p is not None:
        written.append(p)
    return written
