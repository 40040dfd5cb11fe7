"""benchmarks/gpu_suite.py: the quick run on CPU, its bad-input lines, and its own logic.

The full suite needs a GPU; CI runs ``--quick`` on the CPU with Ray, MLflow, Optuna, pyarrow,
scipy, pandas, scikit-learn, matplotlib and rich made unimportable, which is what a lent GPU
machine with only torch, torchvision and numpy (plus the pydantic/pyyaml wheels) looks like.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_sections  # noqa: E402
import gpu_suite  # noqa: E402

from tests.test_imports import FORBIDDEN  # noqa: E402

# Runs the suite as `python benchmarks/gpu_suite.py ARGS` would, with the optional packages
# blocked: a None entry in sys.modules makes `import x` raise ImportError and find_spec say None.
BLOCKED_RUN = f"""
import runpy, sys
for name in {FORBIDDEN!r}:
    sys.modules[name] = None
sys.argv = ["benchmarks/gpu_suite.py", *sys.argv[1:]]
sys.path.insert(0, "benchmarks")
runpy.run_path("benchmarks/gpu_suite.py", run_name="__main__")
"""
ROW_KEYS = {"section", "name", "status", "target", "result", "settings", "numbers", "note", "device", "torch", "date"}
STATUSES = {"pass", "fail", "n/a", "skipped", "error"}


def _finite(value: object) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    return True


@pytest.mark.slow
def test_quick_run_on_cpu_without_optional_packages(tmp_path: Path) -> None:
    out = tmp_path / "out"
    tic = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", BLOCKED_RUN, "--quick", "--device", "cpu", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    wall = time.monotonic() - tic
    assert proc.returncode == 0, proc.stderr[-3000:]
    [path] = out.glob("gpu_suite-quick-cpu-*.json")
    payload = json.loads(path.read_text())
    assert payload["complete"] and payload["mode"] == "quick" and payload["gpu"] is None
    assert payload["seconds"] < 120 and wall < 180
    rows = payload["rows"]
    assert {r["section"] for r in rows} == {s.key for s in gpu_sections.SECTIONS}
    assert [s["key"] for s in payload["sections"]] == [s.key for s in gpu_sections.SECTIONS]
    for r in rows:
        assert set(r) == ROW_KEYS and r["status"] in STATUSES, r
        assert r["status"] != "error", r
        assert r["device"].startswith("cpu") and r["torch"] and r["date"]
        assert _finite(r["numbers"]), r
        if r["status"] == "skipped":
            assert r["note"], r
        else:  # CUDA-only targets and toy sizes: measured, never judged on a quick CPU run
            assert r["status"] == "n/a" and r["result"] and r["numbers"], r
    by_name = {r["name"]: r for r in rows}
    assert by_name["conv4 K=4 N=16 eager"]["numbers"]["e2e_images_per_s"] > 0
    assert by_name["conv4 K=4 N=16 compiled"]["status"] == "skipped"
    assert by_name["resnet32 K=2 N=4 peak memory"]["numbers"]["peak_host_rss_gb"] > 0  # from the child process
    views = by_name["views on cpu vs CPU statistics"]["numbers"]
    assert all(views["checks"][k] < views["limits"][k] for k in views["checks"])
    assert by_name["GEDI 2 steps without divergence"]["result"].startswith("ok")
    assert "not installed: ray, optuna, mlflow" in by_name["4-trial sweep, gpus_per_trial 0.25"]["note"]
    assert "== rrscale GPU suite" in proc.stdout and "wrote" in proc.stdout


def test_bad_input_is_one_line_and_writes_nothing(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "images.txt").write_text("x")
    cases = [
        (["--data", str(tmp_path / "missing.npz")], "--data"),
        (["--data", str(tmp_path / "images.txt")], "--data"),
        (["--wheels", str(empty)], "--wheels"),
        (["--time-limit", "0"], "--time-limit"),
        (["--sections", "views,warp"], "--sections: unknown warp"),
    ]
    for argv, key in cases:
        assert gpu_suite.main([*argv, "--out", str(out), "--device", "cpu"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and key in err, err
    assert not out.exists()


def _wheel(folder: Path, name: str, body: str) -> Path:
    """A minimal pure-Python wheel (what fetch_gpu_wheels.sh hands over, minus the download)."""
    path = folder / f"{name}-0.1-py3-none-any.whl"
    info = f"{name}-0.1.dist-info"
    files = {f"{name}/__init__.py": body,
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{f},,\n" for f in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as zf:
        for arcname, text in files.items():
            zf.writestr(arcname, text)
    return path


def test_install_wheels_puts_them_in_a_fresh_folder(tmp_path: Path) -> None:
    _wheel(tmp_path, "rrscale_wheel_probe", "VALUE = 7\n")
    target = gpu_suite.install_wheels(tmp_path)
    assert (target / "rrscale_wheel_probe" / "__init__.py").read_text() == "VALUE = 7\n"
    shutil.rmtree(target)
    (tmp_path / "rrscale_wheel_probe-0.1-py3-none-any.whl").write_bytes(b"not a zip")
    with pytest.raises(RuntimeError):
        gpu_suite.install_wheels(tmp_path)


def test_largest_fitting_doubles_then_bisects() -> None:
    tried: list[int] = []

    def fails_above(limit: int):
        def fails(n: int) -> str | None:
            tried.append(n)
            return "out of memory" if n > limit else None
        return fails

    far = time.monotonic() + 60
    assert gpu_sections.largest_fitting(fails_above(700), 64, 32768, 3, far) == (640, 704)
    assert tried == [64, 128, 256, 512, 1024, 768, 640, 704]
    assert gpu_sections.largest_fitting(fails_above(10**9), 64, 1024, 3, far) == (1024, None)  # the cap
    assert gpu_sections.largest_fitting(fails_above(10), 64, 1024, 3, far) == (0, 64)  # nothing fits
    tried.clear()
    assert gpu_sections.largest_fitting(fails_above(700), 64, 32768, 3, time.monotonic() - 1) == (0, None)
    assert tried == []  # past the deadline nothing runs


def test_search_trials_catch_failures_and_save_each_trial(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA search's own logic with a fake step: above 700 images it runs out of memory, at
    1,024 it fails otherwise (as cuDNN can on huge tensors); torch.cuda's bookkeeping is stubbed."""
    def fake_stepper(device: torch.device, backbone: str, k: int):
        def step(n: int) -> None:
            if n == 1024:
                raise RuntimeError("cuDNN error: CUDNN_STATUS_NOT_SUPPORTED\nmore")
            if n > 700:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
        return step

    monkeypatch.setattr(gpu_sections, "_e2e_stepper", fake_stepper)
    monkeypatch.setattr(gpu_sections.gc, "collect", lambda: 0)  # seconds in a big test process, no finding
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    for name in ("reset_peak_memory_stats", "synchronize", "empty_cache"):
        monkeypatch.setattr(torch.cuda, name, lambda *args, **kwargs: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *args, **kwargs: 5e9)
    saved: list[list[dict]] = []
    gpu_sections._search_trials(torch.device("cpu"), 64, 32768, 3, time.monotonic() + 60,
                                lambda trials: saved.append(list(trials)))
    assert [len(t) for t in saved] == list(range(1, 9))  # saved after every trial
    assert torch.backends.cudnn.benchmark is False
    trials = saved[-1]
    assert [(t["N"], t["fits"]) for t in trials] == [(64, True), (128, True), (256, True), (512, True),
                                                     (1024, False), (768, False), (640, True), (704, False)]
    assert trials[4]["reason"] == "RuntimeError: cuDNN error: CUDNN_STATUS_NOT_SUPPORTED"
    got = gpu_sections.summarise_search(trials, 32768)
    assert (got["largest_N"], got["first_failing_N"], got["failure"]) == (640, 704, "out of memory")
    assert got["views_per_step"] == 32 * 640 and got["peak_allocated_gb_at_largest"] == 5.0
    assert gpu_sections.summarise_search(trials[:4], 512)["first_failing_N"] is None


def test_busy_summary_averages_the_middle_of_the_active_window() -> None:
    util = [0, 0, 40, 90, 95, 100, 95, 90, 30, 0]
    got = gpu_sections.busy_summary(util)
    assert got["active_samples"] == 7 and got["mean_active"] == pytest.approx(540 / 7)
    assert got["middle_samples"] == 5 and got["mean_middle"] == pytest.approx(94)
    assert gpu_sections.busy_summary([0.0, 0.0])["mean_middle"] is None


def test_the_optional_gedi_cifar_section_runs_only_when_asked_and_scores_all_three_rows(tmp_path: Path) -> None:
    """A full run leaves ``gedi_cifar`` out unless named; --quick includes it. Its rows (GEDI,
    no-gen, random-init k-means) run at toy size on CPU (scipy present here, unlike the blocked
    quick run above, where the section says skipped)."""
    names = lambda sections: [s.key for s in sections]  # noqa: E731
    assert "gedi_cifar" not in names(gpu_suite.chosen_sections([], quick=False))
    assert "gedi_cifar" in names(gpu_suite.chosen_sections([], quick=True))
    assert names(gpu_suite.chosen_sections(["gedi_cifar"], quick=False)) == ["gedi_cifar"]
    from rrscale.config import validate
    from rrscale.data.sources import load_data

    spec = {"name": "synthetic", "synthetic_size": 256}
    data = load_data(validate({"data": spec}, "test").data, seed=0)
    suite = gpu_sections.Suite(device=torch.device("cpu"), quick=True, data=data, data_spec=spec, out=tmp_path,
                               env={})
    [row] = list(gpu_sections.gedi_cifar_rows(suite))
    assert row["status"] == "n/a" and "--quick" in row["note"], row
    numbers = row["numbers"]
    assert set(numbers) == {"gedi", "gedi_nogen", "random_init", "verdict"}
    assert numbers["gedi"]["status"] == "ok" and 0.0 <= numbers["gedi"]["nmi"] <= 1.0
    assert 0.0 <= numbers["random_init"]["kmeans_nmi"] <= 1.0
    assert f"{numbers['gedi_nogen']['nmi']:.3f}" in row["result"]
    full = gpu_sections.Suite(device=torch.device("cpu"), quick=False, data=data, data_spec=spec, out=tmp_path,
                              env={})
    [row] = list(gpu_sections.gedi_cifar_rows(full))
    assert row["status"] == "skipped" and "--data" in row["note"]
