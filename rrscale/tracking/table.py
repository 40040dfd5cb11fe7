"""The ranked trials of a sweep as a table (terminal and HTML share it), and the list of sweeps."""

from __future__ import annotations

import math
import sys
import time

from rrscale.tracking import naming
from rrscale.tracking.sweeps import SCORE_METRICS, Sweep, SweepSummary, Trial

COST_METRICS = (("seconds", "train s", 1), ("images_per_s", "img/s", 0), ("gpu_seconds", "GPU s", 1),
                ("cpu_seconds", "CPU s", 1))
MAX_AXES = 8


def labels(keys: list[str]) -> dict[str, str]:
    """Short column labels: the last path component, the whole key where two would collide."""
    short = {k: k.rsplit(".", 1)[-1] for k in keys}
    counts: dict[str, int] = {}
    for s in short.values():
        counts[s] = counts.get(s, 0) + 1
    return {k: (s if counts[s] == 1 else k) for k, s in short.items()}


def fmt_param(v: str | None) -> str:
    if v is None:
        return "-"
    try:
        x = float(v)
    except ValueError:
        return v if len(v) <= 18 else v[:17] + "…"
    if x.is_integer() and "e" not in v.lower() and abs(x) < 1e9:
        return str(int(x))
    return naming.short_number(x)


def fmt_num(v: float | None, digits: int) -> str:
    if v is None or not math.isfinite(v):
        return "-"
    return f"{v:,.0f}" if digits == 0 else f"{v:.{digits}f}"


def when(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ms / 1000)) if ms else "-"


def table(sw: Sweep, top: int | None = None) -> tuple[list[str], list[list[str]], list[bool]]:
    """Headers, rows (best first) and a right-align flag per column. The trial column holds the
    trial id (the run name repeats the axes shown next to it)."""
    axes = sw.axes[:MAX_AXES]
    names = labels(axes)
    have = {k for t in sw.trials for k in t.metrics}
    scores = [sw.metric] + [m for m in SCORE_METRICS if m != sw.metric and m in have]
    costs = [(k, lab, d) for k, lab, d in COST_METRICS if any(t.value(k) is not None for t in sw.trials)]
    several = len(sw.parents) > 1  # trials of several sweeps: say which sweep each comes from
    headers = ["#", "trial"] + ["sweep"] * several + [names[a] for a in axes] + scores
    headers += [lab for _, lab, _ in costs] + ["epochs", "status"]
    right = [True, False] + [False] * several + [True] * (len(axes) + len(scores) + len(costs) + 1) + [False]
    rows = []
    for i, t in enumerate(sw.trials[: top if top and top > 0 else None], 1):
        row = [str(i), t.trial_id] + [t.tags.get("rrscale.sweep", "-")] * several
        row += [fmt_param(t.params.get(a)) for a in axes]
        row += [fmt_num(t.value(m), 4) for m in scores]
        row += [fmt_num(t.value(k), d) for k, _, d in costs]
        reached = t.epochs_reached
        row += [str(reached) if reached is not None else "-", t.outcome]
        rows.append(row)
    return headers, rows, right


def plain_table(headers: list[str], rows: list[list[str]], right: list[bool]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right)).rstrip()

    return "\n".join([line(headers), "  ".join("-" * w for w in widths)] + [line(r) for r in rows])


def use_rich() -> bool:
    return sys.stdout.isatty()


def outcome_counts(trials: list[Trial]) -> str:
    counts: dict[str, int] = {}
    for t in trials:
        counts[t.outcome] = counts.get(t.outcome, 0) + 1
    return ", ".join(f"{n} {s}" for s, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def headline(sw: Sweep) -> str:
    if sw.parent is not None:
        where = f"sweep '{sw.title}' (run {sw.parent.run_id[:8]})"
    elif sw.parents:
        where = f"{len(sw.parents)} sweeps"
    else:
        where = "no rrscale sweep, top-level runs"
    return (f"experiment '{sw.experiment}', {where}: {len(sw.trials)} trial(s) "
            f"({outcome_counts(sw.trials)}); ranked by {sw.metric} ({sw.mode})")


def print_table(sw: Sweep, top: int) -> None:
    headers, rows, right = table(sw, top)
    note = f" (top {len(rows)} of {len(sw.trials)})" if len(rows) < len(sw.trials) else ""
    if use_rich():
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


def sweep_lines(experiment: str, sweeps: list[SweepSummary], chosen: str) -> list[str]:
    """``rrscale runs``' list of sweeps: one line each (name, start, trials, best), the shown one
    marked with ``*``."""
    headers = ["", "sweep", "started", "status", "trials", "best"]
    rows = []
    for s in sweeps:
        counts = ", ".join(f"{n} {o}" for o, n in sorted(s.outcomes.items(), key=lambda kv: -kv[1]))
        best = f"{s.metric} {s.best:.4f} ({s.best_trial})" if s.best is not None else "-"
        rows.append(["*" if s.run_id == chosen else "", s.name, when(s.start), s.status,
                     f"{s.trials}" + (f" ({counts})" if counts else ""), best])
    title = f"experiment '{experiment}': {len(sweeps)} sweep(s), latest first"
    return [title, plain_table(headers, rows, [False] * len(headers))]
