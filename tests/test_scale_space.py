"""search: YAML -> Optuna define-by-run (no Ray): distributions, conditions, validity, seeding."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from rrscale.config import ConfigError, ExperimentConfig, load_config, validate
from rrscale.scale import space

optuna.logging.set_verbosity(optuna.logging.WARNING)
pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")  # TPE group=True

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


BRANCHES = {
    "method.aggregation": {"choice": ["cat", "max"]},
    "method.head_width": {"int": [16, 256], "log": True, "when": {"method.aggregation": "cat"}},
    "method.focal_gamma": {"uniform": [0.0, 3.0], "when": {"method.aggregation": "max"}},
    "train.lr": {"loguniform": [1e-4, 1e-2]},
}


def test_conditional_axes_are_sampled_only_when_their_condition_holds() -> None:
    cfg = _cfg(BRANCHES)
    base = space.base_dict(cfg)
    study = _study(seed=3)
    seen = set()
    for _ in range(12):
        trial = study.ask()
        params = space.suggest(trial, cfg.search, base)
        agg = params["method.aggregation"]
        seen.add(agg)
        exp = space.trial_config(base, params)
        if agg == "cat":
            assert "method.head_width" in trial.params and "method.focal_gamma" not in trial.params
            assert exp.method.head_width == params["method.head_width"] and exp.method.focal_gamma == 2.0
        else:
            assert "method.focal_gamma" in trial.params and "method.head_width" not in trial.params
            assert exp.method.head_width == 256
        assert set(trial.params) == set(params)
        study.tell(trial, 1.0 if agg == "cat" else 0.0)
    assert seen == {"cat", "max"}


SPLIT = {
    "method.K": {"choice": [2, 4], "when": {"method.name": "relational"}},
    "method.aggregation": {"choice": ["cat", "max"], "when": {"method.name": "relational"}},
    "method.tau": {"loguniform": [0.05, 0.5], "when": {"method.name": "gedi"}},
    "method.clusters": {"int": [8, 64], "log": True, "when": {"method.name": "gedi"}},
    "train.lr": {"loguniform": [1e-4, 1e-2]},
}


@pytest.mark.parametrize("method", ["relational", "gedi"])
def test_gedi_only_axes_exist_only_in_gedi_sweeps(method: str) -> None:
    cfg = _cfg(SPLIT, method={"name": method})
    base = space.base_dict(cfg)
    study = _study()
    own = {"relational": {"method.K", "method.aggregation"}, "gedi": {"method.tau", "method.clusters"}}[method]
    for _ in range(4):
        trial = study.ask()
        params = space.suggest(trial, cfg.search, base)
        assert set(params) == own | {"train.lr"} == set(trial.params)
        exp = space.trial_config(base, params)
        assert exp.method.name == method
        study.tell(trial, 0.5)


def test_a_sampled_method_switch_resets_the_method_section() -> None:
    cfg = _cfg({"method.name": {"choice": ["relational", "gedi"]}, **SPLIT}, method={"K": 8})
    search, base = cfg.search, space.base_dict(cfg)
    study = _study(seed=5)
    names = set()
    for _ in range(12):
        trial = study.ask()
        params = space.suggest(trial, search, base)
        exp = space.trial_config(base, params)
        names.add(exp.method.name)
        if exp.method.name == "gedi":
            assert {"method.tau", "method.clusters"} <= set(params) and "method.K" not in params
            assert exp.method.K == 2  # GEDI's own default, not the base's RR K=8
        else:
            assert "method.tau" not in params and exp.method.K == params["method.K"]
        study.tell(trial, 0.0)
    assert names == {"relational", "gedi"}


def test_a_condition_is_evaluated_after_the_axis_it_depends_on() -> None:
    # the dependent axis is written first; sampling order still puts its condition's axis first
    search = {"method.head_width": {"int": [16, 64], "when": {"method.aggregation": "cat"}},
              "method.aggregation": {"choice": ["cat"]}}
    cfg = _cfg(search)
    assert space.axis_order(cfg.search) == ["method.aggregation", "method.head_width"]
    trial = _study().ask()
    params = space.suggest(trial, cfg.search, space.base_dict(cfg))
    assert list(params) == ["method.aggregation", "method.head_width"]


def test_same_seed_same_proposals() -> None:
    cfg = _cfg(BRANCHES)

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
        ({"method.head_width": {"int": [16, 64], "when": {"method.aggregation": "cat"}},
          "method.aggregation": {"choice": ["cat", "max"], "when": {"method.head_width": 16}}}, "expected no cycle"),
        ({"method.head_width": {"int": [16, 64], "when": {"method.aggregation": "sum"}},
          "method.aggregation": {"choice": ["cat", "max"]}}, "expected one of the choices of search.method.aggregation"),
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


# ----------------------------------------------------------------------------- when: operators


@pytest.mark.parametrize(
    ("want", "actual", "holds"),
    [
        (0.5, 0.5, True), ("gedi", "relational", False),
        ({"gt": 0}, 0.25, True), ({"gt": 0}, 0.0, False), ({"ge": 0}, 0.0, True),
        ({"lt": 1, "gt": 0}, 0.5, True), ({"lt": 1, "gt": 0}, 1.0, False), ({"le": 8}, 8, True),
        ({"ne": "cat"}, "max", True), ({"ne": "cat"}, "cat", False), ({"eq": 4}, 4, True),
        ({"in": ["cat", "sum"]}, "sum", True), ({"in": ["cat", "sum"]}, "max", False),
        ({"gt": 0}, True, False), ({"gt": 0}, "1", False), ({"gt": 0}, None, False),
    ],
)
def test_when_conditions_compare_as_written(want: object, actual: object, holds: bool) -> None:
    from rrscale.config import when_holds

    assert when_holds(want, actual) is holds


GEDI_CONTINUOUS = {
    "method.lambda_gen": {"choice": [0.0, 0.5, 1.0]},
    "method.sgld.steps": {"int": [2, 8], "when": {"method.lambda_gen": {"gt": 0}}},
    "method.sgld.step_size": {"loguniform": [0.01, 1.0], "when": {"method.lambda_gen": {"gt": 0}}},
    "method.beta": {"uniform": [0.05, 1.0]},
}


def test_sgld_axes_are_gated_on_a_comparison_with_lambda_gen() -> None:
    cfg = _cfg(GEDI_CONTINUOUS, method={"name": "gedi", "clusters": 10})
    base = space.base_dict(cfg)
    study = _study(seed=2)
    seen = set()
    for _ in range(16):
        trial = study.ask()
        params = space.suggest(trial, cfg.search, base)
        lam = params["method.lambda_gen"]
        seen.add(lam > 0)
        exp = space.trial_config(base, params)
        sgld_axes = {"method.sgld.steps", "method.sgld.step_size"}
        assert (sgld_axes <= set(params)) == (lam > 0)
        assert not (sgld_axes & set(params)) or exp.method.sgld.steps == params["method.sgld.steps"]
        study.tell(trial, lam)
    assert seen == {True, False}


def test_a_continuous_lambda_gen_gates_sgld_axes_by_its_sampled_value() -> None:
    search = {**GEDI_CONTINUOUS, "method.lambda_gen": {"uniform": [0.0, 1.0]},
              "method.sgld.noise": {"uniform": [0.001, 0.03], "when": {"method.lambda_gen": {"gt": 0.5}}}}
    cfg = _cfg(search, method={"name": "gedi", "clusters": 10})
    base = space.base_dict(cfg)
    study = _study(seed=4)
    for _ in range(12):
        trial = study.ask()
        params = space.suggest(trial, cfg.search, base)
        assert ("method.sgld.noise" in params) == (params["method.lambda_gen"] > 0.5)
        study.tell(trial, 0.0)


@pytest.mark.parametrize(
    ("when", "expected"),
    [
        ({"method.lambda_gen": {"gt": "zero"}}, "expected a finite number for gt"),
        ({"method.lambda_gen": {"above": 0}}, "unknown operator"),
        ({"method.lambda_gen": {"in": []}}, "expected a non-empty list of values for in"),
        ({"method.lambda_gen": [0, 1]}, "expected a value, or {op: operand}"),
        ({"method.lambda_gen": {"gt": 2}}, "expected a condition that some value of search.method.lambda_gen meets"),
    ],
)
def test_bad_when_conditions_are_one_line_errors(when: dict, expected: str) -> None:
    search = {"method.lambda_gen": {"uniform": [0.0, 1.0]}, "method.sgld.steps": {"int": [2, 8], "when": when}}
    with pytest.raises(ConfigError) as info:
        _cfg(search, method={"name": "gedi", "clusters": 10})
    message = str(info.value)
    assert expected in message and message.startswith("test.yaml: search.method.sgld.steps") and "\n" not in message


# ----------------------------------------------------------------------------- order never changes what runs


@pytest.mark.parametrize("k_first", [True, False])
def test_an_ungated_rr_axis_beside_a_method_switch_is_refused_up_front_in_either_order(k_first: bool) -> None:
    axes = [("method.K", {"choice": [4, 8]}), ("method.name", {"choice": ["relational", "gedi"]})]
    search = dict(axes if k_first else axes[::-1])
    with pytest.raises(ConfigError) as info:
        _cfg(search)
    message = str(info.value)
    assert "search.method.K: value 4 is invalid with method.name gedi" in message
    assert "gate the axis with when: {method.name: ...}" in message and "\n" not in message


@pytest.mark.parametrize("k_first", [True, False])
def test_a_gated_axis_is_applied_as_sampled_whatever_the_listing_order(k_first: bool) -> None:
    axes = [("method.K", {"choice": [4, 8], "when": {"method.name": "relational"}}),
            ("method.name", {"choice": ["relational", "gedi"]})]
    cfg = _cfg(dict(axes if k_first else axes[::-1]), method={"name": "gedi"})
    base = space.base_dict(cfg)
    study = _study(seed=1)
    names = set()
    for _ in range(10):
        trial = study.ask()
        params = space.suggest(trial, cfg.search, base)
        exp = space.trial_config(base, params)
        names.add(exp.method.name)
        assert exp.method.K == (params["method.K"] if exp.method.name == "relational" else 2)
        study.tell(trial, 0.0)
    assert names == {"relational", "gedi"}


def test_apply_params_switches_the_method_before_setting_its_keys() -> None:
    from rrscale.config import apply_params

    base = space.base_dict(_cfg({"train.lr": {"loguniform": [1e-4, 1e-2]}}, method={"name": "gedi"}))
    out = apply_params(base, {"method.K": 4, "method.aggregation": "max", "method.name": "relational"})
    assert out["method"] == {"name": "relational", "K": 4, "aggregation": "max"}
