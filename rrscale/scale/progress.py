"""The live console view of a sweep: one line per trial that ends, one status line with an ETA.

Ray Tune's own output (verbose tables, internal fields) is switched off; this Tune callback
prints instead, on the driver::

    trial 3f2a9c1d  finished       probe_top1 0.3120  K=4 aggregation=cat lr=0.00081  (4 epochs, 0:14)
    trial 77b0e2aa  stopped early  after epoch 1, relation_acc 0.7010  K=2 aggregation=sum lr=0.00033
    [0:41] 2/4 done: 1 finished, 1 stopped early | 2 running | epochs 9/16 | best probe_top1 0.3120 | ETA 0:25

The status line is printed when a trial starts or ends and every :data:`HEARTBEAT_S` seconds
otherwise; on a terminal it is redrawn in place every couple of seconds.

ETA (:func:`eta_seconds`) comes from measured times only: the median seconds per epoch and per
final evaluation (linear probe) of this sweep's trials, the epochs each running trial has left,
the trials not started yet, and how many run at once. It assumes every trial trains to its
last epoch, so with ASHA it is an upper bound that falls as trials are stopped early.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from typing import Any

from ray.tune import Callback

HEARTBEAT_S = 60.0
REDRAW_S = 2.0
STOPPED_EARLY = "stopped early"


def format_duration(seconds: float) -> str:
    """``m:ss`` or ``h:mm:ss``."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def eta_seconds(*, epochs_left: list[int], pending: int, epochs_per_trial: int, epoch_s: float | None,
                final_s: float | None, concurrency: int) -> float | None:
    """Seconds until the sweep ends if every trial trains to its last epoch (see the module doc).

    ``epochs_left``: one entry per running trial; ``pending``: trials not started yet;
    ``epoch_s``/``final_s``: measured medians (``final_s`` ``None`` until a trial finished: an
    epoch's time stands in). ``None`` while nothing has been measured.
    """
    if epoch_s is None:
        return None
    final = epoch_s if final_s is None else final_s
    running = [left * epoch_s + final for left in epochs_left]
    whole = epochs_per_trial * epoch_s + final
    work = sum(running) + pending * whole
    slots = max(1, concurrency)
    longest = max(running, default=0.0)
    if pending:
        longest = max(longest, whole)
    return max(work / slots, longest)


def short_names(keys: list[str]) -> dict[str, str]:
    """``method.K`` -> ``K`` where the last part is unique among ``keys``."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def sampled_text(config: dict[str, Any]) -> str:
    """The sampled values of a trial, short: ``K=4 aggregation=cat lr=8.1e-04``."""
    keys = [k for k in config if "." in k]
    names = short_names(keys)
    parts = []
    for k in keys:
        v = config[k]
        shown = f"{v:.2g}" if isinstance(v, float) and (abs(v) < 1e-2 or abs(v) >= 1e4) else (
            f"{v:.4g}" if isinstance(v, float) else str(v))
        parts.append(f"{names[k]}={shown}")
    return " ".join(parts)


def ending(last: dict[str, Any] | None, error: bool = False) -> str:
    """finished / stopped early / failed for a trial that ended with result ``last``."""
    last = last or {}
    if error or last.get("status") == "failed":
        return "failed"
    return "finished" if last.get("final") else STOPPED_EARLY


def trial_state(trial: Any) -> str:
    """pending / running / finished / stopped early / failed, from Tune's status and last result."""
    status = str(trial.status)
    if status in ("ERROR", "TERMINATED"):
        return ending(trial.last_result, status == "ERROR")
    if status in ("RUNNING", "PAUSED"):
        return "running"
    return "pending"


def epochs_done(trial: Any) -> int:
    last = trial.last_result or {}
    value = last.get("epochs", last.get("epoch", 0))
    return int(value) if isinstance(value, (int, float)) and math.isfinite(value) else 0


class SweepProgress(Callback):
    """The Tune callback that prints the live view (plain attributes only: Tune pickles it)."""

    def __init__(self, *, num_samples: int, epochs: int, concurrency: int, metric: str, mode: str,
                 schedule_metric: str) -> None:
        self.num_samples = num_samples
        self.epochs = epochs
        self.concurrency = concurrency
        self.metric = metric
        self.mode = mode
        self.schedule_metric = schedule_metric
        self.epoch_times: list[float] = []
        self.final_times: list[float] = []
        self.started = 0.0
        self.last_print = 0.0
        self.last_body = ""
        self.drawn = False
        self.outcomes: dict[str, str] = {}  # trial id -> how it ended (Tune sets the status later)

    # ----------------------------------------------------------------------- text

    def state(self, trial: Any) -> str:
        return self.outcomes.get(trial.trial_id) or trial_state(trial)

    def status_line(self, trials: list, now: float) -> str:
        states = [self.state(t) for t in trials]
        counts = {s: states.count(s) for s in ("finished", STOPPED_EARLY, "failed", "running")}
        done = counts["finished"] + counts[STOPPED_EARLY] + counts["failed"]
        parts = [f"{done}/{self.num_samples} done"]
        detail = ", ".join(f"{counts[s]} {s}" for s in ("finished", STOPPED_EARLY, "failed") if counts[s])
        if detail:
            parts[0] += f": {detail}"
        parts.append(f"{counts['running']} running")
        running = [t for t, s in zip(trials, states) if s == "running"]
        pending = self.num_samples - len(trials) + states.count("pending")
        trained = sum(epochs_done(t) for t in trials)
        # what ended counts as trained; the rest as planned (a trial stopped early needs no more)
        planned = (sum(epochs_done(t) for t, s in zip(trials, states) if s not in ("running", "pending"))
                   + sum(self.epochs_of(t) for t, s in zip(trials, states) if s in ("running", "pending"))
                   + max(0, self.num_samples - len(trials)) * self.epochs)
        parts.append(f"epochs {trained}/{planned}")
        best = self.best(trials)
        if best is not None:
            parts.append(f"best {self.metric} {best:.4f}")
        eta = eta_seconds(
            epochs_left=[max(0, self.epochs_of(t) - epochs_done(t)) for t in running], pending=max(0, pending),
            epochs_per_trial=self.epochs, epoch_s=_median(self.epoch_times), final_s=_median(self.final_times),
            concurrency=self.concurrency)
        if done < self.num_samples:
            parts.append(f"ETA {format_duration(eta)}" if eta is not None else "ETA -")
        return f"[{format_duration(now - self.started)}] " + " | ".join(parts)

    def epochs_of(self, trial: Any) -> int:
        value = (trial.config or {}).get("train.epochs", self.epochs)
        return int(value) if isinstance(value, (int, float)) else self.epochs

    def best(self, trials: list) -> float | None:
        sign = 1 if self.mode == "max" else -1
        values = []
        for t in trials:
            last = t.last_result or {}
            value = last.get(self.metric)
            if (self.state(t) == "finished" and last.get("metric_source", self.metric) == self.metric
                    and isinstance(value, (int, float)) and math.isfinite(value)):
                values.append(float(value))
        return max(values, key=lambda v: sign * v) if values else None

    def trial_line(self, trial: Any) -> str:
        state = self.state(trial)
        last = trial.last_result or {}
        sampled = sampled_text(dict(trial.config or {}))
        head = f"trial {trial.trial_id}  {state:<14}"
        if state == "failed":
            error = str(last.get("error") or "see the trial's error.txt").splitlines()[0]
            error = error if len(error) <= 200 else error[:199] + "…"
            return f"{head} {error}  {sampled}"
        if state == STOPPED_EARLY:
            value = last.get(self.schedule_metric)
            score = f", {self.schedule_metric} {value:.4f}" if isinstance(value, (int, float)) else ""
            return f"{head} after epoch {epochs_done(trial)}{score}  {sampled}"
        value = last.get(self.metric)
        score = f"{self.metric} {value:.4f}" if isinstance(value, (int, float)) and math.isfinite(value) else ""
        seconds = last.get("time_total_s")
        took = f", {format_duration(seconds)}" if isinstance(seconds, (int, float)) else ""
        return f"{head} {score}  {sampled}  ({epochs_done(trial)} epochs{took})"

    # ----------------------------------------------------------------------- output

    def _emit(self, line: str, *, status: bool) -> None:
        out = sys.stdout
        tty = out.isatty()
        if tty and self.drawn:
            out.write("\r\033[K")
        if tty and status:
            out.write(line)
            self.drawn = True
        else:
            out.write(line + "\n")
            self.drawn = False
        out.flush()

    def show(self, trials: list, *, force: bool = False) -> None:
        now = time.time()
        tty = sys.stdout.isatty()
        if not force and now - self.last_print < (REDRAW_S if tty else HEARTBEAT_S):
            return
        line = self.status_line(trials, now)
        body = line.split("] ", 1)[-1]
        if body == self.last_body and not tty and now - self.last_print < HEARTBEAT_S:
            return
        self.last_print, self.last_body = now, body
        self._emit(line, status=True)

    def finish(self) -> None:
        """End a status line drawn in place, so that what follows starts on a new line."""
        if self.drawn:
            sys.stdout.write("\n")
            sys.stdout.flush()
            self.drawn = False

    # ----------------------------------------------------------------------- Tune's hooks

    def setup(self, **info: Any) -> None:
        self.started = time.time()
        self.last_print = self.started

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        self.show(trials)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.show(trials, force=True)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        seconds = result.get("time_this_iter_s")
        if not isinstance(seconds, (int, float)) or result.get("iterations_since_restore", 2) <= 1:
            return  # the first report after a (re)start also holds the start-up
        if "epoch" in result and not result.get("final"):
            self.epoch_times.append(float(seconds))
        elif result.get("final"):
            self.final_times.append(float(seconds))

    def _ended(self, trials: list, trial: Any, error: bool) -> None:
        if trial.trial_id in self.outcomes:
            return
        self.outcomes[trial.trial_id] = ending(trial.last_result, error)
        self._emit(self.trial_line(trial), status=False)
        self.show(trials, force=True)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._ended(trials, trial, error=False)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._ended(trials, trial, error=True)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self.finish()


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def next_steps(*, experiment: str, sweep: str, tracking_uri: str, ui_url: str, experiment_file: Any,
               best: dict[str, Any] | None, resume: str) -> list[str]:
    """What to run after a sweep, each line a command that works pasted into a new shell.
    ``tracking_uri`` is ``""`` when the sweep ran untracked; ``ui_url`` is the MLflow UI's page
    of the sweep (:func:`rrscale.tracking.links.comparison_url`)."""
    import shlex

    from rrscale.scale.sweep_dir import set_args

    lines = ["next:"]
    if resume:
        lines.append(f"  continue the sweep:  {resume}")
    if tracking_uri:
        lines.append(f"  compare the trials:  rrscale runs {shlex.quote(experiment)} --sweep {shlex.quote(sweep)} "
                     f"--tracking-uri {shlex.quote(tracking_uri)}")
        if tracking_uri.startswith(("http://", "https://")):
            lines.append(f"  MLflow UI:           {ui_url or tracking_uri}")
        else:
            then = f"   (then open {ui_url})" if ui_url else ""
            lines.append(f"  MLflow UI:           mlflow ui --backend-store-uri {shlex.quote(tracking_uri)}{then}")
    if best is not None:
        lines.append(f"  run the best alone:  rrscale train {shlex.quote(str(experiment_file))} {set_args(best)}")
    return lines
