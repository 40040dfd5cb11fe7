"""search: YAML -> Optuna define-by-run (no Ray): distributions, conditions, validity, seeding."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from rrscale.config import ConfigError, ExperimentConfig, load_config, validate
from rrscale.scale import space

optuna.logging.set_verbosity(optuna.logging.WARNING)

SEARCH = {
    "method.K": {"choice": [2, 4, 8]},
    "views.jitter": {"uniform": [0.2, 0.9]},
    "train.lr": {"loguniform": [3.0e-4, 3.0e-3]},
    "method.head_width": {"int": [64, 1024], "log": True},
    "train.batch_size": {"int": [16, 64]},
}


def _cfg(search: dict, **sections: dict) -> ExperimentConfig:
    data = {"data": {"name": "synthetic", "synthetic_size": 100}, "train": {"epochs": 1}, **sections,
            "search": search}
    return validate(data, "test.yaml")


def _study(seed: int = 0) -> optuna.Study:
    sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, n_startup_trials=3)
    return optuna.create_study(direction="maximize", sampler=sampler)


def test_each_axis_kind_maps_to_its_optuna_distribution() -> None:
    cfg = _cfg(SEARCH)
    d = space.distributions(cfg.search)
    assert d["method.K"] == CategoricalDistribution([2, 4, 8])
    assert d["views.jitter"] == FloatDistribution(0.2, 0.9, log=False)
    assert d["train.lr"] == FloatDistribution(3e-4, 3e-3, log=True)
    assert d["method.head_width"] == IntDistribution(64, 1024, log=True)
    assert d["train.batch_size"] == IntDistribution(16, 64, log=False)


def test_sampled_trials_carry_those_distributions_and_validate() -> None:
    cfg = _cfg(SEARCH)
    base = space.base_dict(cfg)
    study = _study()
    for i in range(8):
        trial = study.ask()
        params = space.suggest(trial, cfg.search, base)
        assert set(params) == set(SEARCH)
        assert trial.distributions == space.distributions(cfg.search)
        exp = space.trial_config(base, params)
        assert exp.method.K == params["method.K"] and exp.train.lr == pytest.approx(params["train.lr"])
        assert 64 <= exp.method.head_width <= 1024 and 16 <= exp.train.batch_size <= 64
        assert 3e-4 <= exp.train.lr <= 3e-3 and isinstance(exp.method.head_width, int)
        # untouched sections keep the base values
        assert exp.data.synthetic_size == 100 and exp.train.epochs == 1
        study.tell(trial, float(i % 3))
    assert len(study.trials) == 8


GEDI_SEARCH = {
    "method.name": {"choice": ["relational", "gedi"]},
    "method.K": {"choice": [2, 4], "when": {"method.name": "relational"}},
    "method.aggregation": {"choice": ["cat", "max"], "when": {"method.name": "relational"}},
    "method.tau": {"loguniform": [0.05, 0.5], "when": {"method.name": "gedi"}},
    "method.clusters": {"int": [8, 64], "log": True, "when": {"method.name": "gedi"}},
    "train.lr": {"loguniform": [1e-4, 1e-2]},
}


def test_conditional_axes_are_sampled_only_when_their_condition_holds() -> None:
    cfg = _cfg(GEDI_SEARCH)
    base = space.base_dict(cfg)
    study = _study(seed=3)
    seen = set()
    for _ in range(16):
        trial = study.ask()
        params = space.suggest(trial, cfg.search, base)
        name = params["method.name"]
        seen.add(name)
        exp = space.trial_config(base, params)
        assert exp.method.name == name
        if name == "gedi":
            assert {"method.tau", "method.clusters"} <= set(params)
            assert "method.K" not in params and "method.aggregation" not in params
            assert "method.K" not in trial.params and exp.method.K == 2
            assert 8 <= exp.method.clusters <= 64
        else:
            assert {"method.K", "method.aggregation"} <= set(params)
            assert "method.tau" not in trial.params and "method.clusters" not in trial.params
        assert set(trial.params) == set(params)
        study.tell(trial, 1.0 if name == "gedi" else 0.0)
    assert seen == {"relational", "gedi"}


def test_condition_on_a_fixed_base_value_never_samples_the_other_branch() -> None:
    search = {k: v for k, v in GEDI_SEARCH.items() if k != "method.name"}
    cfg = _cfg(search)  # base method is relational
    base = space.base_dict(cfg)
    study = _study()
    for _ in range(4):
        trial = study.ask()
        params = space.suggest(trial, cfg.search, base)
        assert set(params) == {"method.K", "method.aggregation", "train.lr"}
        space.trial_config(base, params)
        study.tell(trial, 0.5)


def test_a_condition_is_evaluated_after_the_axis_it_depends_on() -> None:
    # the dependent axis is written first; sampling order still puts method.name before it
    search = {"method.tau": {"uniform": [0.05, 0.5], "when": {"method.name": "gedi"}},
              "method.name": {"choice": ["gedi"]}}
    cfg = _cfg(search)
    assert space.axis_order(cfg.search) == ["method.name", "method.tau"]
    trial = _study().ask()
    params = space.suggest(trial, cfg.search, space.base_dict(cfg))
    assert list(params) == ["method.name", "method.tau"]


def test_same_seed_same_proposals() -> None:
    cfg = _cfg(GEDI_SEARCH)

    def draws(seed: int) -> list[dict]:
        out = []
        study = _study(seed)
        for i in range(6):
            t = study.ask()
            out.append(space.suggest(t, cfg.search, space.base_dict(cfg)))
            study.tell(t, float(i))
        return out

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


@pytest.mark.parametrize(
    ("search", "expected"),
    [
        ({"method.K": {"choice": [[2, 4], [8]]}}, "search.method.K.choice: expected numbers"),
        ({"method.K": {"choice": [2, 2]}}, "search.method.K.choice: expected distinct values"),
        ({"method.K": {"choice": [2, 4], "log": True}}, "search.method.K.log: expected log only"),
        ({"views.jitter": {"uniform": [0.0, 0.5], "log": True}}, "search.views.jitter.uniform: expected a positive"),
        ({"method.tau": {"uniform": [0.1, 0.2], "when": {"method.name": "gedi"}},
          "method.name": {"choice": ["relational", "gedi"], "when": {"method.tau": 0.1}}}, "expected no cycle"),
        ({"method.K": {"choice": [2, 4], "when": {"method.name": "nonsense"}},
          "method.name": {"choice": ["relational", "gedi"]}}, "expected one of the choices of search.method.name"),
    ],
)
def test_check_space_rejects_what_optuna_cannot_map(search: dict, expected: str) -> None:
    try:
        cfg = _cfg(search)
    except ConfigError as exc:  # config.py may already refuse it; then its message must be one line
        assert "\n" not in str(exc)
        return
    with pytest.raises(ConfigError, match=expected.replace("[", r"\[").replace(".", r"\.")) as info:
        space.check_space(cfg.search, "test.yaml")
    assert str(info.value).startswith("test.yaml: search.") and "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["cifar.yaml", "cifar100.yaml", "quickstart.yaml"])
def test_shipped_search_spaces_sample_valid_experiments(name: str) -> None:
    path = Path(__file__).resolve().parents[1] / "search_spaces" / name
    cfg = load_config(path)
    space.check_space(cfg.search, str(path))
    for params, exp in space.sample_configs(cfg, 6, seed=1):
        assert set(params) <= set(cfg.search)
        assert exp.method.name == cfg.method.name
