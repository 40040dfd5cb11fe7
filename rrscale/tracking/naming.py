"""How a sweep reads in MLflow, the report and ``rrscale runs``: names, descriptions, words.

Pure functions of plain values (no MLflow, no Ray), shared by the Tune driver's tracker, the
MLflow layer and the comparison tools so that every place says the same thing:

* a trial run is named by what was sampled plus its trial id (``K4-cat-w256-lr8.0e-4 · 9eec6037``)
  and carries a one-line description (sampled values, then the outcome);
* an outcome is one of :data:`OUTCOMES`; a trial the scheduler cut short is ``stopped early``;
* metrics are grouped by name so MLflow's chart view puts them in sections: per-epoch curves
  under ``epoch/``, costs under ``cost/``, end-of-run scores (``probe_top1``, ``knn_top1``,
  ``nmi`` ...) without a prefix (MLflow's "Model metrics" section);
* the parent run records the search space itself (``search.method.K = choice[2, 4]``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

from rrscale.floats import plain_float

FINISHED = "finished"
STOPPED_EARLY = "stopped early"
FAILED = "failed"
INTERRUPTED = "interrupted"
RUNNING = "running"
OUTCOMES = (FINISHED, STOPPED_EARLY, FAILED, INTERRUPTED, RUNNING)

#: Per-epoch curves are logged as ``epoch/<name>`` at step = epoch.
EPOCH_PREFIX = "epoch/"
#: What a trial cost, logged once as ``cost/<name>``.
COST_PREFIX = "cost/"
COST_KEYS = ("seconds", "total_seconds", "cpu_seconds", "gpu_seconds", "startup_seconds", "images_per_s")
#: Numbers in a trial's final summary that describe the run rather than measure it: tags.
CONSTANT_KEYS = ("epochs", "seed", "workers", "stopped_at_epoch")
#: Per-epoch values that are not curves of their own.
NOT_CURVES = ("epoch",)

#: Short labels of well-known axes in run names; other axes use their last path component.
_LABELS = {
    "method.K": "K", "method.head_width": "w", "method.head_depth": "d", "method.focal_gamma": "g",
    "method.clusters": "c", "method.lambda_gen": "lg", "method.projector_width": "pw",
    "train.lr": "lr", "train.weight_decay": "wd", "train.batch_size": "bs", "train.epochs": "ep",
}
NAME_LIMIT = 80


def short_number(x: float | int) -> str:
    """Compact text of a sampled number: ``4``, ``0.5``, ``0.07``, ``1.2e-3``, ``8.0e-4``, ``1.2e5``
    (below 0.01 always with an exponent, so the values of one log-scaled axis read alike)."""
    if isinstance(x, bool):
        return str(x).lower()
    if isinstance(x, int) or (isinstance(x, float) and x.is_integer() and abs(x) < 1e5):
        return str(int(x))
    x = plain_float(x)
    if x == 0 or 1e-2 <= abs(x) < 1e5:
        return f"{x:.3g}"
    mantissa, exponent = f"{x:.1e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def _label(path: str) -> str:
    return _LABELS.get(path, path.rsplit(".", 1)[-1])


def _part(path: str, value: Any) -> str:
    if isinstance(value, bool):
        return _label(path) if value else f"no-{_label(path)}"
    if isinstance(value, (int, float)):
        return f"{_label(path)}{short_number(value)}"
    return str(value)  # a categorical value (cat, sum, relational, conv4) names itself


def run_name(sampled: Mapping[str, Any], trial_id: str) -> str:
    """``K4-cat-w256-lr8.0e-4 · 9eec6037``: the sampled values in sampling order, then the trial id."""
    parts = "-".join(_part(k, v) for k, v in sampled.items() if "." in k)
    if len(parts) > NAME_LIMIT:
        parts = parts[: NAME_LIMIT - 1] + "…"
    return f"{parts} · {trial_id}" if parts else str(trial_id)


def sampled_text(sampled: Mapping[str, Any]) -> str:
    """``K=4, aggregation=cat, lr=8.0e-4``."""
    def value(v: Any) -> str:
        return short_number(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)

    return ", ".join(f"{k.rsplit('.', 1)[-1]}={value(v)}" for k, v in sampled.items() if "." in k)


def _score(name: str, value: Any) -> str:
    return f"{name} {plain_float(value):.4g}" if isinstance(value, (int, float)) and math.isfinite(value) else ""


def describe_trial(sampled: Mapping[str, Any], outcome: str, *, metric: str = "", score: Any = None,
                   epochs: int | None = None, of_epochs: int | None = None, signal: str = "knn_top1",
                   signal_value: Any = None, error: str = "") -> str:
    """One line for MLflow's run description: the sampled values, then what became of the trial
    (a stopped trial: the last value of ``signal``, the per-epoch metric ASHA stopped it on)."""
    head = sampled_text(sampled) or "no sampled values"
    if outcome == FINISHED:
        tail = f"finished {epochs} epochs" if epochs else "finished"
        got = _score(metric, score)
        tail += f": {got}" if got else ""
    elif outcome == STOPPED_EARLY:
        tail = "stopped early by ASHA"
        if epochs:
            tail += f" after epoch {epochs}" + (f" of {of_epochs}" if of_epochs else "")
        got = _score(signal, signal_value)
        tail += f" ({got})" if got else ""
    elif outcome == FAILED:
        tail = "failed" + (f" after epoch {epochs}" if epochs else "") + (f": {error}" if error else "")
    elif outcome == INTERRUPTED:
        tail = "interrupted" + (f" after epoch {epochs}" if epochs else "") + " (rrscale tune --resume continues it)"
    else:
        tail = outcome
    return f"{head} — {tail}"


def axis_text(axis: Mapping[str, Any]) -> str:
    """A search axis as one value: ``choice[2, 4]``, ``loguniform[0.0003, 0.003]``,
    ``int[1, 8] log``, with `` when method.name=gedi`` for a conditional axis."""
    kinds = [k for k in ("choice", "uniform", "loguniform", "int", "integer") if axis.get(k) is not None]
    if not kinds:
        return str(dict(axis))
    kind = kinds[0]
    values = ", ".join(str(plain_float(v)) if isinstance(v, float) else str(v) for v in axis[kind])
    text = f"{'int' if kind == 'integer' else kind}[{values}]"
    if axis.get("log") and kind in ("uniform", "int", "integer"):
        text += " log"
    when = axis.get("when") or {}
    if when:
        text += " when " + ", ".join(f"{k}={v}" for k, v in when.items())
    return text


def is_log_axis(text: str) -> bool:
    """Whether a search-space param (:func:`axis_text`) samples on a log scale."""
    return text.startswith("loguniform[") or " log" in text.split(" when ", 1)[0]


def sweep_params(search: Mapping[str, Mapping[str, Any]], tune: Mapping[str, Any]) -> dict[str, str]:
    """The parent run's params: the search space (``search.<path>``) and the sweep's own
    settings (``tune.<key>``); never the base values, which no trial may have used."""
    out = {f"search.{path}": axis_text(axis) for path, axis in search.items()}
    out.update({f"tune.{k}": str(v) for k, v in tune.items() if v not in (None, "", {}, [])})
    return out


def epoch_metric(key: str) -> str:
    """The MLflow name of a per-epoch value: ``knn_top1`` -> ``epoch/knn_top1``,
    ``epoch_seconds`` -> ``epoch/seconds``."""
    return EPOCH_PREFIX + key.removeprefix("epoch_")


def split_final(summary: Mapping[str, Any]) -> tuple[dict[str, float], dict[str, str]]:
    """A trial's end-of-run numbers as (metrics, tags): scores keep their name, costs go under
    ``cost/``, run constants (epochs, seed, workers) become ``rrscale.<key>`` tags; ``gpu_seconds``
    is dropped when no GPU was used."""
    metrics: dict[str, float] = {}
    tags: dict[str, str] = {}
    for key, value in summary.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            continue
        if key in CONSTANT_KEYS:
            tags[f"rrscale.{key}"] = str(int(value)) if float(value).is_integer() else str(value)
        elif key in COST_KEYS:
            if key == "gpu_seconds" and not value:
                continue
            metrics[COST_PREFIX + key] = plain_float(value)
        else:
            metrics[key] = plain_float(value)
    return metrics, tags
