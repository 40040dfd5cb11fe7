"""Hardening (issue 8): what rrscale does with hostile or broken input, in one process.

Checkpoints that would run code, YAML bombs, diverging training, run directories that are files
or read-only, resumes under a changed config, and data files with impossible labels: each ends
with one line and exit 2 (exit 3 for divergence) before any work starts, writing nothing.
The scenarios that need separate processes (concurrent runs, SIGKILL) are in
test_hardening_processes.py.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rrscale.cli import main
from rrscale.data.parquet import write_shards
from rrscale.engine.checkpoint import load_checkpoint
from rrscale.engine.loop import LocalHooks

TINY = [
    "--set", "data.name=synthetic", "--set", "data.synthetic_size=200", "--set", "data.knn_subset=100",
    "--set", "method.K=3", "--set", "train.batch_size=50", "--set", "probe.epochs=1",
    "--set", "train.knn_every=0", "--set", "train.progress=false", "--set", "train.epochs=1",
]
UNWRITABLE = Path("/sys/rrscale-test-run")  # sysfs refuses new files, for root too


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished one-epoch run directory; tests copy it before changing it."""
    out = tmp_path_factory.mktemp("trained") / "run"
    assert main(["train", *TINY, "--out", str(out)]) == 0
    return out


def _copy(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)
    return to


class _WritesMarker:
    """Unpickling this calls ``open(marker, "w")``: the file exists afterwards iff code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple:
        return (open, (self.marker, "w"))


def test_checkpoint_that_would_run_code_is_refused(tmp_path: Path, trained: Path, capsys) -> None:
    """Item 1: probe and resume read checkpoints with weights_only; real checkpoints still load."""
    marker = tmp_path / "code-ran"
    evil = {"model": _WritesMarker(marker), "optimizer": {}, "epoch": 1, "config": {}}
    run = tmp_path / "run"
    run.mkdir()
    torch.save(evil, run / "checkpoint.pt")
    assert main(["probe", str(run / "checkpoint.pt")]) == 2
    assert "refused" in _one_line_error(capsys)
    assert main(["train", *TINY, "--out", str(run)]) == 2
    assert "refused" in _one_line_error(capsys)
    assert not marker.exists() and not (run / "probe.json").exists() and not (run / "summary.json").exists()
    # Every kind of state rrscale saves loads safely: RR/Adam and GEDI/SGD with a cosine schedule.
    assert isinstance(load_checkpoint(trained / "checkpoint.pt")["optimizer"], dict)
    gedi = ["--set", "data.name=moons", "--set", "data.synthetic_size=64", "--set", "method.name=gedi",
            "--set", "method.sgld.steps=2", "--set", "train.optimizer=sgd", "--set", "train.schedule=cosine",
            "--set", "train.batch_size=32", "--set", "probe.epochs=1", "--set", "train.progress=false"]
    for epochs in (1, 2):  # the second run resumes from the first one's checkpoint
        assert main(["train", *gedi, "--set", f"train.epochs={epochs}", "--out", str(tmp_path / "gedi")]) == 0
    state = load_checkpoint(tmp_path / "gedi" / "checkpoint.pt")
    assert state["epoch"] == 2 and state["scheduler"]["last_epoch"] == 4


def _bomb(levels: int = 9) -> str:
    """A ~400-byte flow list whose aliases expand to 9**levels strings."""
    items = ["&a0 [x, x, x, x, x, x, x, x, x]"]
    items += [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "[" + ", ".join(items) + "]"


# `rrscale` in a child limited to 4 GiB of address space: torch's import maps 3.6 GiB, so the CLI
# may import it in any order, but expanding the bomb cannot fit (before the fix: MemoryError after 23 s).
RUN_IN_4_GIB = ("import resource, runpy; resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30)); "
                "runpy.run_module('rrscale.cli', run_name='__main__')")


@pytest.mark.parametrize("where", ["file", "--set"])
def test_yaml_alias_bomb_is_refused_fast_in_bounded_memory(tmp_path: Path, where: str) -> None:
    """Item 3: a 9**9-string alias bomb used to take > 5 GB building its error message."""
    bomb = _bomb()
    assert len(bomb) < 600
    cfg = tmp_path / "bomb.yaml"
    cfg.write_text(f"data:\n  name: {bomb}\n" if where == "file" else "train: {epochs: 1}\n")
    extra = ["--set", f"data.name={bomb}"] if where == "--set" else []
    cmd = [sys.executable, "-c", RUN_IN_4_GIB, "train", str(cfg), *extra, "--out", str(tmp_path / "run")]
    tic = time.monotonic()
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert time.monotonic() - tic < 20
    assert res.returncode == 2, res.stderr[-2000:]
    assert len(res.stderr.strip().splitlines()) == 1 and len(res.stderr) < 400
    assert "aliases" in res.stderr and not (tmp_path / "run").exists()


def test_divergence_fails_the_run_and_infinite_values_are_rejected(tmp_path: Path, capsys) -> None:
    """Item 5: RR at lr=1000 (epoch-1 loss ~6e6) ends 'failed', exit 3; lr=.inf never starts."""
    out = tmp_path / "run"
    assert main(["train", *TINY, "--set", "train.lr=1000", "--out", str(out)]) == 3
    assert "diverged" in _one_line_error(capsys)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed" and "method.divergence_limit" in summary["error"]
    assert not (out / "checkpoint.pt").exists()
    assert main(["train", *TINY, "--set", "train.lr=.inf", "--out", str(tmp_path / "inf")]) == 2
    assert "train.lr: expected a finite number" in _one_line_error(capsys)
    assert not (tmp_path / "inf").exists()


def _parquet(root: Path, labels: list[int] | None = None, table: dict | None = None) -> Path:
    if table is not None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        root.mkdir(parents=True)
        for split in ("train", "test"):
            pq.write_table(pa.table(table), root / f"{split}.parquet")
        return root
    y = np.asarray(labels, dtype=np.int64)
    x = np.random.default_rng(0).integers(0, 256, (len(y), 8, 8, 3), dtype=np.uint8)
    write_shards(x, y, root, "train")
    write_shards(x, y, root, "test")
    return root


def _image_folder(root: Path, classes: tuple[str, ...], bad: str = "") -> Path:
    for split in ("train", "test"):
        for name in classes:
            (root / split / name).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (8, 8), (40 * i, 9, 9)).save(root / split / name / f"{i}.png")
    if bad:
        (root / "train" / bad).write_bytes(b"not an image at all")
    return root


def _train_on(root: Path, name: str) -> list[str]:
    return ["train", *TINY, "--set", f"data.name={name}", "--set", f"data.root={root}"]


# (id, argv built from (tmp_path, trained run copy), text the one line must contain)
ONE_LINE_CASES = [
    ("out-is-file", lambda t, r: ["train", *TINY, "--out", str(t / "file")], "is a file"),
    ("out-is-file-fresh", lambda t, r: ["train", *TINY, "--out", str(t / "file"), "--fresh"], "is a file"),
    ("out-unwritable", lambda t, r: ["train", *TINY, "--out", str(UNWRITABLE)], "writable"),
    ("probe-out-is-file", lambda t, r: ["probe", str(r / "checkpoint.pt"), "--out", str(t / "file")], "is a file"),
    ("probe-out-unwritable", lambda t, r: ["probe", str(r / "checkpoint.pt"), "--out", str(UNWRITABLE)],
     "writable"),
    ("probe-other-backbone", lambda t, r: ["probe", str(r / "checkpoint.pt"), "--set", "backbone.name=resnet8"],
     "backbone.name: conv4 in the checkpoint, resnet8 now"),
    ("resume-other-head", lambda t, r: ["train", *TINY, "--set", "method.head_width=128", "--out", str(r)],
     "method.head_width: 256 in the checkpoint, 128 now"),
    ("parquet-image-not-binary", lambda t, r: _train_on(_parquet(t / "pq", table={
        "image": [1, 2, 3], "label": [0, 1, 0]}), "parquet"), "column 'image' is int64"),
    ("parquet-string-labels", lambda t, r: _train_on(_parquet(t / "pq", table={
        "image": [b"x", b"y", b"z"], "label": ["cat", "dog", "cat"]}), "parquet"), "column 'label' is string"),
    ("labels-beyond-classes", lambda t, r: _train_on(_parquet(t / "pq", [12] + [0, 1] * 10), "cifar10"),
     "has label 12, but cifar10 has 10 classes"),
    ("negative-label", lambda t, r: _train_on(_parquet(t / "pq", [-3] + [0, 1] * 10), "parquet"), "label -3"),
    ("one-class-imagefolder", lambda t, r: _train_on(_image_folder(t / "if", ("cat",)), "imagefolder"),
     "one class folder"),
    ("undecodable-image", lambda t, r: _train_on(_image_folder(t / "if", ("cat", "dog"), bad="dog/x.png"),
                                                 "imagefolder"), "dog/x.png: not an image"),
]


@pytest.mark.parametrize("make_args,expected", [c[1:] for c in ONE_LINE_CASES], ids=[c[0] for c in ONE_LINE_CASES])
def test_bad_run_dir_checkpoint_or_data_is_one_line_before_work(
    tmp_path: Path, trained: Path, capsys, make_args, expected: str
) -> None:
    """Items 10 and 12: checked before anything trains or is written; exit 2, one line."""
    (tmp_path / "file").write_text("")
    run = _copy(trained, tmp_path / "run")
    def files() -> dict[Path, int]:
        return {p: p.stat().st_mtime_ns for p in run.iterdir() if p.name != ".rrscale.lock"}

    before = files()
    argv = make_args(tmp_path, run)
    if "--out" not in argv and argv[0] == "train":
        argv += ["--out", str(tmp_path / "new")]
    assert main(argv) == 2
    err = _one_line_error(capsys)
    assert expected in err and "0x" not in err
    assert files() == before
    assert not (tmp_path / "new").exists() and not UNWRITABLE.exists()


def test_resume_applies_and_records_changed_values(tmp_path: Path, trained: Path, capsys) -> None:
    """Item 12: a changed lr is applied from the resumed epoch on, printed and recorded."""
    run = _copy(trained, tmp_path / "run")
    assert main(["train", *TINY, "--set", "train.epochs=2", "--set", "train.lr=0.01", "--out", str(run)]) == 0
    assert "train.lr 0.001 -> 0.01" in capsys.readouterr().err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["resumed"] == {"from_epoch": 1, "changed": {"train.epochs": [1, 2], "train.lr": [0.001, 0.01]}}
    assert load_checkpoint(run / "checkpoint.pt")["optimizer"]["param_groups"][0]["lr"] == 0.01


def test_cosine_schedule_resumes_on_its_closed_form() -> None:
    """Item 12: with a schedule, the resumed lr is this config's lr at the steps already taken."""
    from rrscale.config import load_config
    from rrscale.engine.loop import _make_scheduler

    cfg = load_config(None, ["train.schedule=cosine", "train.lr=0.02"])
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.train.lr)
    scheduler = _make_scheduler(cfg, opt, total_steps=10, done_steps=5)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)
    opt.step()
    scheduler.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01 * (1 + math.cos(math.pi * 0.6)))


def test_metrics_lines_are_strict_json(tmp_path: Path) -> None:
    """Item 12: a non-finite metric is written as null, not as the bare NaN token."""
    LocalHooks(tmp_path).report({"epoch": 1, "loss": math.nan, "knn_top1": math.inf}, None)
    line = (tmp_path / "metrics.jsonl").read_text().strip()

    def refuse(token: str) -> None:
        raise ValueError(token)

    assert json.loads(line, parse_constant=refuse) == {"epoch": 1, "loss": None, "knn_top1": None}
    assert os.path.getsize(tmp_path / "metrics.jsonl") == len(line) + 1


def test_sweep_records_are_strict_json(tmp_path: Path) -> None:
    """A trial that fails before its first epoch reports knn_top1 NaN: the trial record and
    sweep.json writers say null (numpy scalars too), so strict JSON readers can read them."""
    from rrscale.engine.rundir import write_json
    from rrscale.scale.trial_record import read_json
    from rrscale.scale.trial_record import write_json as write_record

    def refuse(token: str) -> None:
        raise ValueError(token)

    payload = {"knn_top1": math.nan, "loss": np.float32("inf"), "rows": [{"probe_top1": np.float64(0.25)}]}
    write_record(str(tmp_path / "final.json"), payload)
    write_json(tmp_path / "sweep.json", payload)
    want = {"knn_top1": None, "loss": None, "rows": [{"probe_top1": 0.25}]}
    for name in ("final.json", "sweep.json"):
        assert json.loads((tmp_path / name).read_text(), parse_constant=refuse) == want
    assert read_json(str(tmp_path / "final.json")) == want
