"""The YAML ``search:`` section as an Optuna define-by-run function.

Each axis ``dotted.path: {choice|uniform|loguniform|int, log?, when?}`` becomes one
``trial.suggest_*`` call named by its dotted path. An axis with ``when:`` is only sampled when
every condition holds for the configuration built so far (the base experiment plus the axes
sampled before it). A condition is ``other.key: value`` (equality) or ``other.key: {op: operand}``
with ``eq``, ``ne``, ``gt``, ``ge``, ``lt``, ``le`` or ``in`` (:func:`rrscale.config.when_holds`),
e.g. SGLD axes gated on ``{method.lambda_gen: {gt: 0}}``. So GEDI-only axes are absent from RR
trials and Optuna's multivariate TPE (``group=True``) models each conditional group on its own.
Whether every sampled value can be applied is checked before a sweep starts
(``rrscale.config._check_search``); a ``method.name`` axis is applied before the other axes.

Pure Optuna + config: no Ray here, so the unit tests drive it with ``study.ask()``/``tell()``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from rrscale.config import (
    ConfigError,
    ExperimentConfig,
    SearchAxis,
    apply_params,
    brief,
    flatten,
    validate,
    when_holds,
)

_SCALAR = (str, int, float, bool, type(None))


def distribution(axis: SearchAxis) -> BaseDistribution:
    """The Optuna distribution of one axis (``log: true`` makes uniform/int log-scaled)."""
    if axis.choice is not None:
        return CategoricalDistribution(list(axis.choice))
    if axis.loguniform is not None:
        low, high = axis.loguniform
        return FloatDistribution(float(low), float(high), log=True)
    if axis.uniform is not None:
        low, high = axis.uniform
        return FloatDistribution(float(low), float(high), log=axis.log)
    if axis.integer is not None:
        low, high = axis.integer
        return IntDistribution(int(low), int(high), log=axis.log)
    raise ValueError(f"search axis without a distribution: {axis!r}")


def distributions(search: Mapping[str, SearchAxis]) -> dict[str, BaseDistribution]:
    return {path: distribution(axis) for path, axis in search.items()}


def axis_order(search: Mapping[str, SearchAxis]) -> list[str]:
    """YAML order, except that an axis comes after the axes its ``when`` refers to."""
    order: list[str] = []
    state: dict[str, int] = {}  # 1 = visiting, 2 = done

    def visit(path: str, chain: list[str]) -> None:
        if state.get(path) == 2:
            return
        if state.get(path) == 1:
            loop = " -> ".join([*chain[chain.index(path):], path])
            raise ConfigError(f"search.{path}.when: expected no cycle between conditions ({loop})")
        state[path] = 1
        for cond in search[path].when:
            if cond in search:
                visit(cond, [*chain, path])
        state[path] = 2
        order.append(path)

    for path in search:
        visit(path, [])
    return order


def condition_holds(axis: SearchAxis, values: Mapping[str, Any]) -> bool:
    """Every condition of ``axis.when`` holds for the flattened ``values`` (an absent key never matches)."""
    return all(key in values and when_holds(want, values[key]) for key, want in axis.when.items())


def _flat_with_defaults(nested: dict[str, Any]) -> dict[str, Any]:
    """Flattened values including schema defaults (e.g. the new method's keys after a switch)."""
    try:
        return flatten(ExperimentConfig.model_validate(nested).training_dict())
    except Exception:  # a partial config mid-sampling: fall back to what was written
        return flatten(nested)


def suggest(trial: optuna.Trial | Any, search: Mapping[str, SearchAxis], base: dict[str, Any]) -> dict[str, Any]:
    """Sample every axis whose condition holds; returns ``{dotted.path: value}`` in sampling order."""
    params: dict[str, Any] = {}
    for path in axis_order(search):
        axis = search[path]
        if axis.when and not condition_holds(axis, _flat_with_defaults(apply_params(base, params))):
            continue
        dist = distribution(axis)
        if isinstance(dist, CategoricalDistribution):
            value = trial.suggest_categorical(path, list(dist.choices))
        elif isinstance(dist, FloatDistribution):
            value = trial.suggest_float(path, dist.low, dist.high, log=dist.log)
        else:
            assert isinstance(dist, IntDistribution)
            value = trial.suggest_int(path, dist.low, dist.high, log=dist.log)
        params[path] = value
    return params


class DefineByRun:
    """The ``space=`` callable for ``ray.tune.search.optuna.OptunaSearch`` (picklable: Tune
    saves the searcher with the experiment state and restores it on ``--resume``).

    OptunaSearch captures every ``suggest_*`` call by name, so the trial's Tune config is the
    flat ``{dotted.path: value}`` dict of the sampled axes; conditional axes that were not
    sampled are simply absent.
    """

    def __init__(self, search: Mapping[str, SearchAxis], base: dict[str, Any]) -> None:
        self.search = {k: v.model_dump(mode="json", by_alias=True, exclude_defaults=True) for k, v in search.items()}
        self.base = json.loads(json.dumps(base))

    def axes(self) -> dict[str, SearchAxis]:
        return {k: SearchAxis.model_validate(v) for k, v in self.search.items()}

    def __call__(self, trial: Any) -> None:
        suggest(trial, self.axes(), self.base)
        return None


def define_by_run(search: Mapping[str, SearchAxis], base: dict[str, Any]) -> DefineByRun:
    return DefineByRun(search, base)


def base_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    """The experiment every trial starts from: all sections except ``search``."""
    return cfg.model_dump(mode="json", exclude={"search"})


def trial_config(base: dict[str, Any], params: Mapping[str, Any], source: str = "trial") -> ExperimentConfig:
    """The validated experiment of one trial (base + sampled params)."""
    sampled = {k: v for k, v in params.items() if "." in k}
    return validate(apply_params(base, sampled), source)


def check_space(search: Mapping[str, SearchAxis], source: str) -> None:
    """What the Optuna mapping needs beyond config.py's checks; raises one-line ConfigErrors."""
    for path, axis in search.items():
        if axis.choice is not None:
            if axis.log:
                raise ConfigError(f"{source}: search.{path}.log: expected log only with int or uniform")
            bad = [v for v in axis.choice if not isinstance(v, _SCALAR)]
            if bad:
                raise ConfigError(
                    f"{source}: search.{path}.choice: expected numbers, strings or booleans (got {bad[0]!r})"
                )
            if len({json.dumps(v) for v in axis.choice}) != len(axis.choice):
                raise ConfigError(f"{source}: search.{path}.choice: expected distinct values")
        if axis.uniform is not None and axis.log and axis.uniform[0] <= 0:
            raise ConfigError(f"{source}: search.{path}.uniform: expected a positive low bound with log: true")
        for key in ("uniform", "loguniform"):
            rng = getattr(axis, key)
            if rng is not None and not all(math.isfinite(float(v)) for v in rng):
                raise ConfigError(f"{source}: search.{path}.{key}: expected finite bounds")
        for cond, want in axis.when.items():
            if cond == path:
                raise ConfigError(f"{source}: search.{path}.when.{cond}: expected a condition on another key")
            other = search.get(cond)
            if other is not None and other.choice is not None and not any(when_holds(want, c) for c in other.choice):
                raise ConfigError(
                    f"{source}: search.{path}.when.{cond}: expected one of the choices of search.{cond} "
                    f"{brief(other.choice)} (got {brief(want)})"
                )
    try:
        axis_order(search)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def sample_configs(cfg: ExperimentConfig, n: int, seed: int = 0) -> list[tuple[dict[str, Any], ExperimentConfig]]:
    """``n`` (params, config) pairs drawn by a plain seeded TPE study (no Ray); for dry runs and tests."""
    base = base_dict(cfg)
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True))
    out = []
    for _ in range(n):
        t = study.ask()
        params = suggest(t, cfg.search, base)
        out.append((params, trial_config(base, params)))
        study.tell(t, 0.0)
    return out
