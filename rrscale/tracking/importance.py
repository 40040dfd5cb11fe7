"""Which sampled axis mattered: hyperparameter importances of a sweep's Optuna study.

Optuna's fANOVA evaluator fits a random forest to (sampled values -> objective) over the
trials that finished (COMPLETE; trials ASHA stopped are PRUNED and carry no objective) and
splits the objective's variance between the axes. With a handful of trials that split is
noise, so it is only computed from :func:`minimum_trials` finished trials on, and always shown
with the number of trials it rests on. The study is read from the sweep's ``optuna.db``, whose
location the parent run records (:data:`rrscale.tracking.links.OPTUNA_STORAGE_TAG`).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

#: Fewest finished trials an importance is computed from, and per sampled axis.
MIN_TRIALS = 6
MIN_TRIALS_PER_AXIS = 2
EVALUATOR = "fANOVA (Optuna's FanovaImportanceEvaluator, seed 0)"


def minimum_trials(axes: int) -> int:
    """Finished trials needed before importances over ``axes`` sampled axes are shown."""
    return max(MIN_TRIALS, MIN_TRIALS_PER_AXIS * axes)


@dataclass
class Importances:
    """``values``: axis -> share of the objective's variance (sums to 1), largest first;
    empty when not computed, with ``note`` saying why."""

    finished: int
    needed: int
    values: dict[str, float] = field(default_factory=dict)
    note: str = ""
    evaluator: str = EVALUATOR


def study_importances(storage: str, study_name: str) -> Importances:
    """Importances of the study's sampled axes over its finished trials (see module docstring)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except Exception as exc:  # noqa: BLE001 - a report without importances is still a report
        return Importances(0, MIN_TRIALS, note=f"no Optuna study {study_name!r} at {storage} ({type(exc).__name__})")
    finished = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    axes = {name for t in finished for name in t.params}
    needed = minimum_trials(len(axes))
    if len(finished) < needed:
        return Importances(len(finished), needed,
                           note=f"not shown: {len(finished)} finished trial(s); importances over {len(axes)} "
                                f"axes need at least {needed} to be more than noise")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            values = optuna.importance.get_param_importances(
                study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
    except Exception as exc:  # noqa: BLE001
        log.warning("hyperparameter importances failed (%s: %s)", type(exc).__name__, exc)
        return Importances(len(finished), needed, note=f"could not be computed ({type(exc).__name__}: {exc})")
    return Importances(len(finished), needed, {k: float(v) for k, v in values.items()})
