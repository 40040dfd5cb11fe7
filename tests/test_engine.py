"""The training loop and evaluation, end to end through the CLI on synthetic and real data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rrscale.cli import main
from rrscale.engine.evaluate import knn_top1, linear_probe

SYNTH = [
    "--set", "data.name=synthetic", "--set", "data.synthetic_size=1000", "--set", "data.knn_subset=400",
    "--set", "backbone.name=conv4", "--set", "method.K=4", "--set", "train.batch_size=32",
    "--set", "probe.epochs=30", "--set", "train.progress=false",
]


def _train(out: Path, *extra: str) -> dict:
    rc = main(["train", *SYNTH, *extra, "--out", str(out)])
    assert rc == 0
    return json.loads((out / "summary.json").read_text())


def test_knn_top1_on_separable_features() -> None:
    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    labels = torch.tensor([0, 0, 1, 1])
    queries = torch.tensor([[1.0, 0.05], [0.05, 1.0], [1.0, 0.2]])
    assert knn_top1(bank, labels, queries, torch.tensor([0, 1, 0]), 2, k=2) == 1.0
    assert knn_top1(bank, labels, queries, torch.tensor([1, 0, 1]), 2, k=2) == 0.0


def test_linear_probe_learns_a_linear_rule_and_zero_epochs_is_chance() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 8, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long()
    trained = linear_probe(x[:400], y[:400], x[400:], y[400:], 2, epochs=50, lr=0.01)
    untrained = linear_probe(x[:400], y[:400], x[400:], y[400:], 2, epochs=0, lr=0.01)
    assert trained > 0.9
    assert untrained < trained - 0.2


@pytest.mark.timeout(300)
def test_training_beats_random_init_on_synthetic(tmp_path: Path) -> None:
    random_init = _train(tmp_path / "e0", "--set", "train.epochs=0")
    trained = _train(tmp_path / "e6", "--set", "train.epochs=6")
    assert random_init["epochs"] == 0 and trained["epochs"] == 6
    for s in (random_init, trained):
        assert 0.0 <= s["probe_top1"] <= 1.0 and 0.0 <= s["knn_top1"] <= 1.0
        assert s["status"] == "ok" and len(s["config_hash"]) == 12
    assert trained["images_per_s"] > 0 and trained["seconds"] > 0
    assert trained["probe_top1"] > random_init["probe_top1"] + 0.05, (trained["probe_top1"], random_init["probe_top1"])
    lines = (tmp_path / "e6" / "metrics.jsonl").read_text().splitlines()
    epochs = [json.loads(line) for line in lines]
    assert [e["epoch"] for e in epochs] == list(range(1, 7))
    assert all({"loss", "relation_acc", "images_per_s", "knn_top1"} <= e.keys() for e in epochs)
    assert epochs[-1]["loss"] < epochs[0]["loss"]
    assert (tmp_path / "e6" / "checkpoint.pt").exists()


@pytest.mark.timeout(300)
def test_resume_continues_from_last_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "run"
    _train(out, "--set", "train.epochs=2", "--set", "data.synthetic_size=300", "--set", "probe.epochs=1")
    summary = _train(out, "--set", "train.epochs=3", "--set", "data.synthetic_size=300", "--set", "probe.epochs=1")
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3]
    assert [h["epoch"] for h in summary["history"]] == [1, 2, 3]


@pytest.mark.timeout(300)
def test_probe_command_scores_a_checkpoint(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    _train(out, "--set", "train.epochs=1", "--set", "data.synthetic_size=300", "--set", "probe.epochs=1")
    rc = main(["probe", str(out / "checkpoint.pt"), "--set", "probe.epochs=5"])
    assert rc == 0
    probe = json.loads((out / "probe.json").read_text())
    assert 0.0 <= probe["probe_top1"] <= 1.0 and probe["epochs"] == 1
    assert main(["probe", str(tmp_path / "nope.pt")]) == 2


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_training_beats_random_init_on_cifar10_mini(tmp_path: Path, cifar10_mini: Path) -> None:
    common = ["--set", f"data.root={cifar10_mini}", "--set", "method.K=4", "--set", "train.batch_size=64",
              "--set", "probe.epochs=20", "--set", "train.progress=false", "--set", "data.knn_subset=1000"]
    rand = main(["train", *common, "--set", "train.epochs=0", "--out", str(tmp_path / "e0")])
    trained = main(["train", *common, "--set", "train.epochs=4", "--out", str(tmp_path / "e4")])
    assert rand == 0 and trained == 0
    s0 = json.loads((tmp_path / "e0" / "summary.json").read_text())
    s4 = json.loads((tmp_path / "e4" / "summary.json").read_text())
    assert s4["probe_top1"] > s0["probe_top1"] + 0.03, (s4["probe_top1"], s0["probe_top1"])
