"""Config validation: every bad input is one line naming file + dotted path, exit 2, nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest

from rrscale.cli import main
from rrscale.config import ConfigError, load_config, parse_override

BAD_INPUTS = [
    # (yaml text, extra CLI args, dotted path expected in the message)
    ("foo: 1\n", [], "foo"),
    ("method: {foo: 1}\n", [], "method.foo"),
    ("train: {epochs: abc}\n", [], "train.epochs"),
    ("method: {K: 1}\n", [], "method.K"),
    ("method: {aggregation: prod}\n", [], "method.aggregation"),
    ("backbone: {name: vgg11}\n", [], "backbone.name"),
    ("data: {name: imagenet}\n", [], "data.name"),
    ("data: {name: cifar10, root: /nonexistent/rrscale-data, download: false}\n", [], "data.root"),
    ("train: {lr: -0.1}\n", [], "train.lr"),
    ("data: {fraction: 1.5}\n", [], "data.fraction"),
    ("method: {name: simclr}\n", [], "method.name"),
    ("train: {batch_size: 1}\n", [], "train.batch_size"),
    ("method: {head_width: 0}\n", [], "method.head_width"),
    ("method: {focal_gamma: -1}\n", [], "method.focal_gamma"),
    ("probe: {epochs: -3}\n", [], "probe.epochs"),
    ("method: 5\n", [], "method"),
    ("train: {epochs: 1}\n", ["--set", "method.K"], "--set"),
    ("train: {epochs: 1}\n", ["--set", "method.bogus=3"], "method.bogus"),
    ("train: {epochs: 1}\n", ["--set", "method.K=two"], "method.K"),
    ("search: {method.K: {choice: [1, 4]}}\n", [], "search.method.K"),
    ("search: {method.K: {int: [8, 2]}}\n", [], "search.method.K"),
    ("data: {name: cifar10\n", [], "(file)"),
    ("- a\n- b\n", [], "(top level)"),
    ("backbone: {stem: tiny}\n", [], "backbone.stem"),
    ("method: {name: gedi, K: 3}\n", [], "method.K"),
    ("train: {lr: .inf}\n", [], "train.lr"),
    ("search: {train.lr: {choice: [.inf]}}\n", [], "search.train.lr"),
    ("train: {epochs: " + "1" * 5000 + "}\n", [], "(file)"),
    ("train: {epochs: " + "[" * 5000 + "]" * 5000 + "}\n", [], "(file)"),
    ("train: {epochs: " + "[" * 40 + "]" * 40 + "}\n", [], "(top level)"),
    ("search: {train.lr: &a {choice: [*a]}}\n", [], "(top level)"),
    ("# padding" + "." * (1 << 20) + "\n", [], "(file)"),
]


@pytest.mark.parametrize("text,extra,path", BAD_INPUTS)
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path: Path, capsys, text, extra, path) -> None:
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(text)
    out = tmp_path / "run"
    rc = main(["train", str(cfg), "--out", str(out), *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    if path != "--set":
        assert str(cfg) in err
    assert path in err
    assert "expected" in err or "set data.root=" in err
    assert not out.exists()


def test_unreadable_file(tmp_path: Path, capsys) -> None:
    for target in (tmp_path / "missing.yaml", tmp_path):
        rc = main(["train", str(target), "--out", str(tmp_path / "run")])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1 and str(target) in err
    assert not (tmp_path / "run").exists()


def test_distinct_messages_cover_at_least_15_cases(tmp_path: Path, capsys) -> None:
    messages = set()
    for i, (text, extra, _) in enumerate(BAD_INPUTS):
        cfg = tmp_path / f"c{i}.yaml"
        cfg.write_text(text)
        main(["train", str(cfg), "--out", str(tmp_path / "run"), *extra])
        messages.add(capsys.readouterr().err.replace(str(cfg), "FILE"))
    assert len(messages) >= 15


def test_defaults_are_the_paper_recipe() -> None:
    cfg = load_config(None)
    assert (cfg.method.name, cfg.method.K, cfg.method.aggregation, cfg.method.head_width) == ("relational", 32, "cat", 256)
    assert (cfg.method.focal_gamma, cfg.method.focal_alpha) == (2.0, 0.5)
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.lr, cfg.train.optimizer) == (200, 64, 0.001, "adam")
    assert (cfg.probe.epochs, cfg.probe.batch_size, cfg.probe.lr) == (100, 128, 0.001)
    assert (cfg.views.crop_min_scale, cfg.views.jitter, cfg.views.hue, cfg.views.gray_prob) == (0.08, 0.8, 0.2, 0.2)


def test_overrides_are_typed_and_change_the_hash(tmp_path: Path) -> None:
    base = load_config(None)
    cfg = load_config(None, ["method.K=8", "train.lr=3e-4", "method.focal_alpha=null", "data.root=~/x"])
    assert cfg.method.K == 8 and cfg.train.lr == pytest.approx(3e-4) and cfg.method.focal_alpha is None
    assert cfg.data.root.endswith("/x") and not cfg.data.root.startswith("~")
    assert cfg.config_hash() != base.config_hash()
    assert load_config(None, ["tune.num_samples=3"]).config_hash() == base.config_hash()


def test_method_switch_by_override_uses_that_methods_defaults() -> None:
    cfg = load_config(None, ["method.name=gedi"])
    assert cfg.method.name == "gedi" and cfg.method.tau == 0.1 and cfg.method.sgld.steps == 20


def test_search_axes_parse_and_gate() -> None:
    cfg = load_config(None, [
        "search.method.K={choice: [4, 8]}",
        "search.train.lr={loguniform: [3.0e-4, 3.0e-3]}",
        "search.method.head_width={int: [64, 1024], log: true}",
        "search.method.sgld.steps={int: [5, 40], when: {method.name: gedi}}",
    ])
    assert cfg.search["method.K"].kind == "choice"
    assert cfg.search["method.head_width"].kind == "int" and cfg.search["method.head_width"].log
    assert cfg.search["method.sgld.steps"].when == {"method.name": "gedi"}
    with pytest.raises(ConfigError, match="search.method.sgld.steps"):
        load_config(None, ["search.method.sgld.steps={int: [0, 40], when: {method.name: gedi}}"])


@pytest.mark.parametrize("text", ["=3", "a..b=1", "novalue", ".a=1"])
def test_bad_set_syntax(text: str) -> None:
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        parse_override(text)


def test_vector_data_defaults_fill_only_unset_keys() -> None:
    cfg = load_config(None, ["data.name=moons", "method.name=gedi", "method.tau=0.5"])
    assert cfg.backbone.name == "mlp" and cfg.method.clusters == 2 and cfg.method.tau == 0.5
    assert cfg.method.sgld.step_size == 0.005 and cfg.method.lambda_gen == 3.0 and cfg.backbone.norm == "none"
    assert load_config(None, ["data.name=moons", "method.name=gedi", "backbone.norm=group"]).backbone.norm == "group"
    rr = load_config(None, ["data.name=circles"])
    assert rr.backbone.name == "mlp" and rr.backbone.norm == "batch"  # the GEDI defaults stay GEDI's
    with pytest.raises(ConfigError, match="backbone.name: expected mlp"):
        load_config(None, ["data.name=moons", "backbone.name=conv4"])
    with pytest.raises(ConfigError, match="backbone.name: expected an image backbone"):
        load_config(None, ["backbone.name=mlp"])


def test_data_roots_are_pinned_absolute_on_the_driver(tmp_path: Path, monkeypatch) -> None:
    """Ray runs trials in other working directories, so a relative root must not reach them."""
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["data.root=rel/data", "data.probe_root=~/p"])
    assert cfg.data.root == str(tmp_path / "rel" / "data") and Path(cfg.data.probe_root).is_absolute()
    monkeypatch.setenv("RRSCALE_DATA_ROOT", "envdata")
    assert load_config(None).data.root == str(tmp_path / "envdata")
    assert load_config(None, ["data.root=/x"]).data.root == "/x"
