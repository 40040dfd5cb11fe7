"""The sections of ``benchmarks/gpu_suite.py``: each one a function that yields result rows.

A section takes the :class:`Suite` (device, data, sizes, time left) and yields rows made by
:func:`measured`, :func:`skipped` or :func:`errored`; the runner in gpu_suite.py adds the
device, versions, date and section to each and writes the JSON after every row, so a run cut
short keeps what it measured. Adding a section is one line in :data:`SECTIONS` (key, title,
function, budget in seconds for the full and the ``--quick`` run); the budgets of the full run
add up to under the suite's 10 minutes, so give a new one time from ``ray`` (absent on a
torch-only GPU machine) or raise ``--time-limit``. A section too long for that budget is
``optional``: the full run leaves it out unless ``--sections`` names it (``--quick`` runs it).

Everything here imports only the pure-PyTorch layers of rrscale; Ray, Optuna and MLflow are
used only through a ``rrscale tune`` subprocess in the ``ray`` section, when they are installed.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import math
import os
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from argparse import Namespace
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import gedi_step
import throughput
from common import timed, timing_method
from rrscale.config import load_config
from rrscale.data.sources import DataBundle
from rrscale.data.view_stats import MEAN, STD, device_statistics
from rrscale.data.views import ImageViews
from rrscale.engine.evaluate import extract_features, linear_probe
from rrscale.engine.loop import LocalHooks, fit, train_step
from rrscale.methods import TrainingDiverged

MEMORY_TARGET_GB = 8.0  # resnet32 K=32 N=64, allocated tensors, 1 GB = 1e9 bytes
RATIO_TARGET = 0.8  # end-to-end images/s over the compute-only ceiling
PROBE_TARGET_S = 30.0  # 100 probe epochs on 50,000 cached features
PROBE_IMAGES = 50_000
BUSY_TARGET = 85.0  # % GPU utilisation during a 4-trial sweep on one GPU
# bf16 vs fp32 with the same seed: both runs see the same data order and the same views and
# differ only by rounding. Measured on the CPU (bf16 autocast forced; conv4 K=4 N=32, 4 epochs x
# 40 steps, synthetic 2,000, seeds 1 and 2): per-epoch mean loss within 0.6 %, final kNN top-1
# within 0.3 points (up to 3.8 points at an intermediate epoch); another seed instead moves the
# loss by 7.3 % and the kNN by 12 points. The limits sit between the two, with room for CUDA's
# own kernels (and TF32 convolutions in the "fp32" run): 3 % per epoch on the loss, 5 points on
# the final kNN.
LOSS_REL_TOL = 0.03
KNN_TOL = 0.05


@dataclass
class Suite:
    """What every section needs: where it runs, at which size, on which data, until when."""

    device: torch.device
    quick: bool
    data: DataBundle
    data_spec: dict[str, Any]  # the ``data:`` section naming the same data, for subprocesses
    out: Path  # artefacts of this run (sweep logs, child results)
    env: dict[str, str]  # environment for child processes: PYTHONPATH reaches rrscale and the wheels
    deadline: float = math.inf  # time.monotonic() at which the running section's budget ends

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def time_left(self) -> float:
        return self.deadline - time.monotonic()


def measured(
    name: str,
    *,
    settings: dict[str, Any],
    numbers: dict[str, Any],
    target: str,
    result: str,
    ok: bool | None = None,
    applies: bool = True,
    note: str = "",
) -> dict[str, Any]:
    """A row that ran. Its status is pass/fail when the target applies here, else n/a."""
    status = "n/a" if ok is None or not applies else ("pass" if ok else "fail")
    return {"name": name, "status": status, "target": target, "result": result, "settings": settings,
            "numbers": numbers, "note": note}


def skipped(name: str, reason: str, settings: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"name": name, "status": "skipped", "target": "", "result": "", "settings": settings or {},
            "numbers": {}, "note": reason}


def errored(name: str, why: BaseException | str, settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """A row whose measurement failed: the error is the finding (e.g. torch.compile failing)."""
    return {"name": name, "status": "error", "target": "", "result": "", "settings": settings or {},
            "numbers": {}, "note": first_line(why) if isinstance(why, BaseException) else why}


def first_line(exc: BaseException, limit: int = 300) -> str:
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def not_judged(s: Suite, *, cuda: bool = True, full: bool = True) -> str:
    """Why a target does not apply to this run ("" when it does): it is a CUDA target and the
    suite runs on the CPU, or it is set for the full sizes and this is ``--quick``."""
    reasons = []
    if cuda and not s.cuda:
        reasons.append("CPU: the target is for CUDA")
    if full and s.quick:
        reasons.append("--quick: toy sizes, the target is for the full run")
    return "; ".join(reasons)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- 1 throughput


def throughput_rows(s: Suite) -> Iterator[dict[str, Any]]:
    """RR end to end (views made on the device + step) against the ceiling (views already made),
    through benchmarks/throughput.py's ``measure_row``: bf16 autocast and channels_last on CUDA,
    eager first, then torch.compile (whose first steps include the compilation)."""
    shapes = [("conv4", 4, 16)] if s.quick else [("conv4", 32, 64), ("resnet32", 32, 64), ("conv4", 4, 128)]
    if not s.quick:  # the slowest compilation last, where the time budget can cut it
        shapes = [shapes[0], shapes[2], shapes[1]]
    steps, warmup = (3, 1) if s.quick else (50, 10)
    for compiled in (False, True):
        for backbone, k, n in shapes:
            name = f"{backbone} K={k} N={n} {'compiled' if compiled else 'eager'}"
            settings = {"backbone": backbone, "K": k, "N": n, "compile": compiled, "amp": "bf16" if s.cuda else "off",
                        "channels_last": s.cuda, "steps": steps, "warmup": warmup,
                        "images_resident": len(s.data.train.x)}
            if compiled and not s.cuda:
                yield skipped(name, "torch.compile rows run on CUDA only (an inductor CPU build takes minutes)",
                              settings)
                continue
            need = (20 if s.quick else 60) if compiled else (3 if s.quick else 15)
            if s.time_left() < need:
                yield skipped(name, f"time budget: {s.time_left():.0f} s left, a row needs ~{need} s", settings)
                continue
            args = Namespace(steps=steps, warmup=warmup, compile=compiled, baseline=False, root="")
            tic = time.monotonic()
            try:
                m, error = throughput.measure_row(backbone, k, n, args, s.data, s.device), None
            except Exception as exc:  # a failing compile or kernel is a finding, not the end of the suite
                m, error = {}, errored(name, exc, settings)
            if compiled:
                torch._dynamo.reset()
            free_memory(s.device)
            if error is not None:
                yield error
                continue
            m["row_seconds"] = time.monotonic() - tic
            ratio = m["e2e_over_ceiling"]
            why = not_judged(s)
            yield measured(
                name, settings=settings, numbers=m, target=f"e2e >= {RATIO_TARGET} x ceiling",
                result=f"e2e {m['e2e_images_per_s']:,.0f} img/s = {ratio:.2f} x ceiling "
                       f"({m['ceiling_images_per_s']:,.0f}); views {m['views_ms_per_step']:.1f} ms/step",
                ok=ratio >= RATIO_TARGET, applies=not why, note=why,
            )


# ----------------------------------------------------------------------------- 2 memory


def largest_fitting(
    fails: Callable[[int], str | None], start: int, cap: int, refine: int, deadline: float
) -> tuple[int, int | None]:
    """(largest n that fits, smallest n seen failing or None) for ``fails(n)`` (None = it fits).

    Doubles from ``start`` until a failure or ``cap``, then bisects ``refine`` times between the
    last fit and the first failure; stops early at ``deadline`` (time.monotonic()). 0 = even
    ``start`` failed.
    """
    fit, failed = 0, None
    n = start
    while n <= cap and time.monotonic() < deadline:
        if fails(n) is not None:
            failed = n
            break
        fit, n = n, n * 2
    if failed is not None and fit:
        for _ in range(refine):
            if failed - fit <= 1 or time.monotonic() >= deadline:
                break
            mid = (fit + failed) // 2
            if fails(mid) is None:
                fit = mid
            else:
                failed = mid
    return fit, failed


def _e2e_stepper(device: torch.device, backbone: str, k: int) -> Callable[[int], None]:
    """One training-loop step (views of random uint8 images on the device + ``train_step``) per call."""
    cfg = load_config(None, [f"backbone.name={backbone}", f"method.K={k}"])
    cuda = device.type == "cuda"
    method = timing_method(cfg, device)
    optimizer = torch.optim.Adam(method.parameters(), lr=1e-3)
    views = ImageViews(cfg.views, MEAN, STD, channels_last=cuda)
    gen = torch.Generator(device=device).manual_seed(0)

    def step(n: int) -> None:
        x = torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, device=device, generator=gen)
        with torch.no_grad():
            v = views(x, k, gen)
        train_step(method, optimizer, v, n, amp=cuda)

    return step


def _peak(device: torch.device, backbone: str, k: int, n: int) -> dict[str, float]:
    """Peak memory of training steps: one step warms up (cuDNN autotuning allocates workspaces
    then), the peak of the next two is the steady state."""
    step = _e2e_stepper(device, backbone, k)
    if device.type != "cuda":
        for _ in range(3):
            step(n)
        return {"peak_host_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9}
    step(n)
    torch.cuda.synchronize(device)
    with_autotune = torch.cuda.max_memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    for _ in range(2):
        step(n)
    torch.cuda.synchronize(device)
    return {"peak_allocated_gb": torch.cuda.max_memory_allocated(device) / 1e9,
            "peak_reserved_gb": torch.cuda.max_memory_reserved(device) / 1e9,
            "peak_first_step_gb": with_autotune / 1e9}


def _search_trials(device: torch.device, start: int, cap: int, refine: int, deadline: float,
                   save: Callable[[list[dict[str, Any]]], None]) -> None:
    """Try conv4 K=32 batches as :func:`largest_fitting` picks them; ``save`` gets the trials so
    far after each one. cuDNN autotuning is off (its trial workspaces would decide the outcome);
    every failure is caught and the cache emptied before the next trial."""
    step = _e2e_stepper(device, "conv4", 32)
    torch.backends.cudnn.benchmark = False  # after the stepper: timing_method turns it on
    trials: list[dict[str, Any]] = []

    def fails(n: int) -> str | None:
        torch.cuda.reset_peak_memory_stats(device)
        tic = time.monotonic()
        reason = None
        try:
            for _ in range(2):
                step(n)
            torch.cuda.synchronize(device)
        except torch.cuda.OutOfMemoryError:
            reason = "out of memory"
        except RuntimeError as exc:  # e.g. a cuBLAS/cuDNN allocation failure or a size limit
            reason = first_line(exc)
        free_memory(device)
        trials.append({"N": n, "fits": reason is None, "reason": reason, "seconds": time.monotonic() - tic,
                       "peak_allocated_gb": torch.cuda.max_memory_allocated(device) / 1e9})
        save(trials)
        return reason

    largest_fitting(fails, start, cap, refine, deadline)


def summarise_search(trials: list[dict[str, Any]], cap: int) -> dict[str, Any]:
    """The largest batch that fitted and the smallest failing one above it, from the trials."""
    fit = max((t["N"] for t in trials if t["fits"]), default=0)
    above = [t for t in trials if not t["fits"] and t["N"] > fit]
    failed = min(above, key=lambda t: t["N"]) if above else None
    at_fit = next((t for t in trials if t["fits"] and t["N"] == fit), None)
    return {"largest_N": fit, "views_per_step": 32 * fit, "first_failing_N": failed["N"] if failed else None,
            "failure": failed["reason"] if failed else None,
            "peak_allocated_gb_at_largest": at_fit["peak_allocated_gb"] if at_fit else None,
            "cap": cap, "trials": trials}


def memory_probe(device: str, backbone: str, k: int, n: int, search: dict[str, int] | None, until: float,
                 result: str) -> None:
    """Section 2's measurements in a child process (see :func:`memory_rows`), saved to the JSON
    file ``result`` after every step so that a crash or a kill keeps what was measured. The
    search starts no trial after ``until`` (seconds since the epoch: the parent's clock)."""
    deadline = time.monotonic() + (until - time.time())
    dev = torch.device(device)
    out: dict[str, Any] = {}

    def save(key: str, value: Any) -> None:
        out[key] = value
        tmp = Path(result + ".tmp")
        tmp.write_text(json.dumps(out))
        os.replace(tmp, result)

    save("peak", _peak(dev, backbone, k, n))
    free_memory(dev)
    if search is not None:
        _search_trials(dev, deadline=deadline, save=lambda trials: save("trials", list(trials)), **search)


CHILD = "import json, sys; import gpu_sections as g; g.memory_probe(**json.load(open(sys.argv[1])))"


def run_child(s: Suite, kwargs: dict[str, Any], timeout: float) -> tuple[dict[str, Any], str]:
    """:func:`memory_probe` in a fresh process, so that an out-of-memory search or a CUDA error
    that poisons the context leaves nothing behind in the suite's process. Returns what the
    child saved and "" or, when it failed or was killed, why."""
    work = Path(tempfile.mkdtemp(prefix="memory-", dir=s.out))
    result = work / "result.json"
    (work / "args.json").write_text(json.dumps({**kwargs, "result": str(result)}))
    try:
        proc = subprocess.run([sys.executable, "-c", CHILD, str(work / "args.json")], env=s.env,
                              capture_output=True, text=True, timeout=timeout)
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        problem = "" if proc.returncode == 0 else f"child process exited with {proc.returncode}: {tail[0][:300]}"
    except subprocess.TimeoutExpired:
        problem = f"child process killed after {timeout:.0f} s (time budget)"
    got = json.loads(result.read_text()) if result.exists() else {}
    shutil.rmtree(work, ignore_errors=True)
    return got, problem


def memory_rows(s: Suite) -> Iterator[dict[str, Any]]:
    """Peak GPU memory of resnet32 K=32 N=64 and the largest conv4 K=32 batch, in a child process."""
    k, n = (2, 4) if s.quick and not s.cuda else (32, 64)
    peak_name = f"resnet32 K={k} N={n} peak memory"
    largest_name = "largest conv4 K=32 batch that fits"
    settings = {"backbone": "resnet32", "K": k, "N": n, "amp": "bf16" if s.cuda else "off", "channels_last": s.cuda,
                "measured": "steps 2-3 (step 1 warms up cuDNN autotuning)"}
    search = {"start": 64, "cap": 512 if s.quick else 32768, "refine": 1 if s.quick else 3} if s.cuda else None
    # no search trial starts in the last 10 s of the budget; one in flight gets 30 s past it
    kwargs = {"device": str(s.device), "backbone": "resnet32", "k": k, "n": n, "search": search,
              "until": time.time() + s.time_left() - 10}
    got, problem = run_child(s, kwargs, timeout=max(10.0, s.time_left() + 30))
    peak = got.get("peak")
    target = f"peak allocated <= {MEMORY_TARGET_GB:g} GB"
    if peak is None:
        yield errored(peak_name, problem or "the child process saved no result", settings)
    elif s.cuda:
        yield measured(peak_name, settings=settings, numbers=peak, target=target,
                       result=f"{peak['peak_allocated_gb']:.2f} GB allocated, {peak['peak_reserved_gb']:.2f} GB reserved",
                       ok=peak["peak_allocated_gb"] <= MEMORY_TARGET_GB, applies=(k, n) == (32, 64))
    else:
        yield measured(peak_name, settings=settings, numbers=peak, target=target,
                       result=f"CPU process peak RSS {peak['peak_host_rss_gb']:.2f} GB (imports included)",
                       applies=False, note=not_judged(s, full=False))
    search_settings = {**(search or {}), "backbone": "conv4", "K": 32, "cudnn_benchmark": False,
                       "steps_per_trial": 2}
    if search is None:
        yield skipped(largest_name, "CUDA only: on the CPU an oversize batch swaps instead of raising "
                      "out-of-memory", search_settings)
        return
    if not got.get("trials"):
        yield errored(largest_name, problem or "no trial ran", search_settings)
        return
    big = summarise_search(got["trials"], search["cap"])
    result = f"N={big['largest_N']:,} fits ({big['views_per_step']:,} views/step)"
    if big["first_failing_N"] is not None:
        result += f", N={big['first_failing_N']:,} does not ({big['failure']})"
    elif big["largest_N"] >= search["cap"]:
        result += f"; the search cap {search['cap']:,} was reached"
    else:
        result += "; stopped by the time budget before a batch failed"
    yield measured(largest_name, settings=search_settings, numbers=big, target="none (a measurement)",
                   result=result, note=problem)


# ----------------------------------------------------------------------------- 3 views


def views_rows(s: Suite) -> Iterator[dict[str, Any]]:
    """The statistics check of tests/test_views.py (rrscale.data.view_stats.device_statistics)
    with the views made on this device, against the CPU's float32 views."""
    tic = time.monotonic()
    images = 64 if s.quick and not s.cuda else 256  # the CPU compares with itself: fewer images do
    checks = device_statistics(s.device, n=images)
    bad = [c.describe() for c in checks if not c.ok]
    why = not_judged(s, full=False)
    cpu = "compared CPU bf16/channels_last views with CPU float32 ones" if why else ""
    yield measured(
        f"views on {s.device.type} vs CPU statistics",
        settings={"images": images, "views_per_image": 8, "outputs": ["float32", "bfloat16"], "channels_last": True},
        numbers={"checks": {c.name: c.value for c in checks}, "limits": {c.name: c.limit for c in checks},
                 "seconds": time.monotonic() - tic},
        target="every statistic within its measured limit (tests/test_views.py)",
        result=f"{len(checks) - len(bad)}/{len(checks)} checks within limits",
        ok=not bad, applies=not why, note="; ".join(filter(None, [why, cpu, *bad])),
    )


# ----------------------------------------------------------------------------- 4 bf16 vs fp32


def amp_rows(s: Suite) -> Iterator[dict[str, Any]]:
    """The same short RR run with train.amp true and false: same seed, data order and views."""
    k, n, epochs, steps, knn = (4, 16, 2, 3, 200) if s.quick else (32, 64, 5, 150, 2000)
    settings = {"backbone": "conv4", "K": k, "N": n, "epochs": epochs, "steps_per_epoch": steps, "knn_subset": knn,
                "seed": 1, "loss_rel_tol": LOSS_REL_TOL, "knn_tol": KNN_TOL}
    runs: dict[str, dict[str, Any]] = {}
    for amp in (True, False):
        cfg = load_config(None, ["backbone.name=conv4", f"method.K={k}", f"train.batch_size={n}",
                                 f"train.epochs={epochs}", f"train.steps_per_epoch={steps}", "train.knn_every=1",
                                 f"data.knn_subset={knn}", "train.progress=false", f"train.amp={amp}",
                                 "train.seed=1"])
        tic = time.monotonic()
        result = fit(cfg, s.data, hooks=LocalHooks(None), device=s.device)
        history = result.history
        runs["bf16" if amp else "fp32"] = {
            "loss": [h["loss"] for h in history], "knn_top1": history[-1].get("knn_top1"),
            "images_per_s": result.images_per_s, "seconds": time.monotonic() - tic}
        free_memory(s.device)
    b, f = runs["bf16"], runs["fp32"]
    loss_diff = max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(b["loss"], f["loss"]))
    knn_diff = abs(b["knn_top1"] - f["knn_top1"]) if b["knn_top1"] is not None else None
    numbers = {"bf16": b, "fp32": f, "max_rel_loss_diff": loss_diff, "knn_abs_diff": knn_diff,
               "bf16_speedup": b["images_per_s"] / f["images_per_s"]}
    ok = loss_diff <= LOSS_REL_TOL and (knn_diff is None or knn_diff <= KNN_TOL)
    knn_text = f", kNN {b['knn_top1']:.3f} vs {f['knn_top1']:.3f}" if knn_diff is not None else ", no labels: no kNN"
    why = not_judged(s)
    cpu = "" if s.cuda else "the engine autocasts on CUDA only, so both runs were fp32"
    yield measured(
        "bf16 vs fp32 short RR run", settings=settings, numbers=numbers,
        target=f"per-epoch loss within {LOSS_REL_TOL:.0%}, final kNN within {KNN_TOL:g}",
        result=f"loss differs by up to {loss_diff:.1%}{knn_text}; bf16 {numbers['bf16_speedup']:.2f}x the fp32 speed",
        ok=ok, applies=not why, note="; ".join(filter(None, [why, cpu])),
    )


# ----------------------------------------------------------------------------- 5 probe


def probe_rows(s: Suite) -> Iterator[dict[str, Any]]:
    """The paper's linear probe (100 epochs, batch 128, Adam 1e-3) on cached features of 50,000
    images: backbone features are extracted once, then only the linear layer trains."""
    cfg = load_config(None, ["backbone.name=conv4"])
    backbone = timing_method(cfg, s.device).backbone
    train, test = s.data.probe_train, s.data.probe_test
    tic = time.monotonic()
    feats = extract_features(backbone, train.x, train.mean, train.std, device=s.device)
    test_feats = extract_features(backbone, test.x, train.mean, train.std, device=s.device)
    if s.cuda:
        torch.cuda.synchronize(s.device)
    extract_s = time.monotonic() - tic
    labels, test_labels, classes = train.y.to(s.device), test.y.to(s.device), max(train.num_classes, 1)
    notes = []
    if not bool((labels >= 0).all()) or not bool((test_labels >= 0).all()):
        gen = torch.Generator().manual_seed(0)
        classes = 10
        labels = torch.randint(0, classes, (len(labels),), generator=gen).to(s.device)
        test_labels = torch.randint(0, classes, (len(test_labels),), generator=gen).to(s.device)
        notes.append("unlabelled data: random labels (the timing does not depend on them)")
    if not s.quick and len(feats) < PROBE_IMAGES:
        reps = math.ceil(PROBE_IMAGES / len(feats))
        feats, labels = feats.repeat(reps, 1)[:PROBE_IMAGES], labels.repeat(reps)[:PROBE_IMAGES]
        notes.append(f"features of {len(train.x):,} images repeated to {PROBE_IMAGES:,}")
    epochs = 2 if s.quick else 100
    why = not_judged(s)
    linear_probe(feats, labels, test_feats, test_labels, classes, epochs=1)  # warm-up: kernels, allocator
    top1: list[float] = []
    seconds = timed(lambda: top1.append(linear_probe(feats, labels, test_feats, test_labels, classes,
                                                      epochs=epochs)), 1, 0, s.device)
    yield measured(
        f"linear probe: {epochs} epochs, {len(feats):,} features",
        settings={"backbone": "conv4 (untrained: only the time matters)", "epochs": epochs, "batch_size": 128,
                  "lr": 1e-3, "train_features": len(feats), "test_features": len(test_feats),
                  "feature_dim": int(feats.shape[1])},
        numbers={"probe_seconds": seconds, "extract_seconds": extract_s, "probe_top1": top1[0],
                 "steps": epochs * math.ceil(len(feats) / 128)},
        target=f"100 epochs on {PROBE_IMAGES:,} features <= {PROBE_TARGET_S:g} s",
        result=f"{seconds:.2f} s ({extract_s:.2f} s to extract the features)",
        ok=seconds <= PROBE_TARGET_S, applies=not why, note="; ".join([*filter(None, [why]), *notes]),
    )


# ----------------------------------------------------------------------------- 6 GEDI


class _Recorder:
    """Training-loop hooks that keep each epoch's metrics (so a run that diverges still shows
    how far it got) and never resume."""

    def __init__(self) -> None:
        self.history: list[dict[str, Any]] = []

    def report(self, metrics: dict[str, Any], state: dict[str, Any] | None, final: bool = False) -> None:
        self.history.append(metrics)

    def load_state(self) -> dict[str, Any] | None:
        return None


def gedi_rows(s: Suite) -> Iterator[dict[str, Any]]:
    """GEDI's step cost with vs without the generative term (benchmarks/gedi_step.py's
    ``measure``), then 200 training steps with the paper's defaults without divergence."""
    batch = 8 if s.quick else 64
    args = Namespace(backbone="conv4", batch=batch, steps=1 if s.quick else 10, warmup=0 if s.quick else 3)
    rows = {name: gedi_step.measure(name, gedi_step.ROWS[name], args, s.device) for name in ("gedi", "gedi_nogen")}
    free_memory(s.device)
    ratio = rows["gedi"]["seconds_per_step"] / rows["gedi_nogen"]["seconds_per_step"]
    why = not_judged(s, cuda=False)
    yield measured(
        "GEDI step: generative term on / off", settings={**vars(args), "amp": "bf16" if s.cuda else "off"},
        numbers={"full_over_nogen": ratio, "gedi": rows["gedi"], "gedi_nogen": rows["gedi_nogen"]},
        target=f"full / no-gen <= {gedi_step.BUDGET:g}x",
        result=f"{rows['gedi']['seconds_per_step'] * 1e3:.1f} ms vs {rows['gedi_nogen']['seconds_per_step'] * 1e3:.1f} ms"
               f" per step = {ratio:.1f}x",
        ok=ratio <= gedi_step.BUDGET, applies=not why, note=why,
    )
    want = 2 if s.quick else 200
    per_epoch = min(want if s.quick else 50, math.ceil(len(s.data.train.x) / batch))
    epochs = math.ceil(want / per_epoch)
    settings = {"method": "gedi (paper defaults: c=2048, tau=0.1, 20 SGLD steps)", "backbone": "conv4",
                "batch": batch, "epochs": epochs, "steps_per_epoch": per_epoch, "seed": 1}
    cfg = load_config(None, ["method.name=gedi", "backbone.name=conv4", f"train.batch_size={batch}",
                             f"train.epochs={epochs}", f"train.steps_per_epoch={per_epoch}", "train.knn_every=0",
                             "train.progress=false", "train.seed=1"])
    tic = time.monotonic()
    epochs_done = _Recorder()
    try:
        fit(cfg, s.data, hooks=epochs_done, device=s.device)
        error = ""
    except TrainingDiverged as exc:
        error = str(exc)
    history = epochs_done.history
    free_memory(s.device)
    keys = ("loss", "unif", "inv", "gen", "lse_data", "lse_sample", "train_clusters_used")
    numbers = {"steps": epochs * per_epoch, "seconds": time.monotonic() - tic, "epochs_completed": len(history),
               "per_epoch": [{key: h[key] for key in keys if key in h} for h in history]}
    last = history[-1] if history else {}
    yield measured(
        f"GEDI {epochs * per_epoch} steps without divergence", settings=settings, numbers=numbers,
        target=f"{want} steps, loss and mean LSE finite and within divergence_limit",
        result=(f"diverged: {error[:120]}" if error else
                f"ok: last epoch loss {last['loss']:.3f}, LSE data {last['lse_data']:.2f} / samples "
                f"{last.get('lse_sample', float('nan')):.2f}, {last['train_clusters_used']:.0f} clusters used"),
        ok=not error, applies=not why, note="; ".join(filter(None, [why, error])),
    )


# ----------------------------------------------------------------------------- 8 GEDI on CIFAR-10


def gedi_cifar_rows(s: Suite) -> Iterator[dict[str, Any]]:
    """benchmarks/gedi_clustering.py's CIFAR-10 comparison (search_spaces/gedi-cifar.yaml, 10
    epochs: GEDI vs no-gen vs k-means on random-init features) on the suite's ``--data``. Optional:
    alone it takes about as long as the other sections together (``--sections gedi_cifar``)."""
    name = "GEDI on CIFAR-10: stable, NMI above no-gen and random-init k-means"
    if importlib.util.find_spec("scipy") is None:
        yield skipped(name, "scipy is not installed (cluster accuracy uses its assignment solver)")
        return
    synthetic = s.data_spec["name"] == "synthetic"
    if synthetic and not s.quick:
        yield skipped(name, "needs --data with CIFAR-10 (rrscale data convert cifar10:ROOT cifar10.npz)")
        return
    import gedi_clustering

    epochs = 1 if s.quick else 10
    extra = [f"data.name={s.data_spec['name']}"]
    if s.quick:
        extra += ["train.steps_per_epoch=2", "train.batch_size=16", "probe.epochs=2", "method.sgld.buffer_size=64"]
    rows, verdict = gedi_clustering.compare_on(s.data, s.device, epochs, root=s.data_spec.get("root", ""),
                                               extra=extra, log=False)
    keys = ("status", "nmi", "acc", "probe_top1", "clusters_used", "stable", "train_seconds", "kmeans_nmi", "error")
    numbers = {row: {k: v for k, v in r.items() if k in keys} for row, r in rows.items()}
    gedi, nogen, rand = rows["gedi"], rows["gedi_nogen"], rows["random_init"]
    why = not_judged(s, cuda=False)
    yield measured(
        name, settings={"config": "search_spaces/gedi-cifar.yaml", "epochs": epochs, "overrides": extra},
        numbers={**numbers, "verdict": verdict},
        target="no guard trip, all 10 clusters used; NMI > no-gen and > k-means on random-init features",
        result=(f"NMI GEDI {gedi.get('nmi', 0.0):.3f} ({gedi['status']}, {gedi.get('clusters_used', 0):.0f} "
                f"clusters) vs no-gen {nogen.get('nmi', 0.0):.3f} vs random-init k-means {rand['kmeans_nmi']:.3f}"),
        ok=verdict["target_met"], applies=not why, note=why,
    )


# ----------------------------------------------------------------------------- 7 Ray


def busy_summary(util: list[float], trim: float = 0.2, active: float = 1.0) -> dict[str, Any]:
    """Mean GPU utilisation (%) while a sweep trains: over the active window (first to last
    sample >= ``active`` %) and over its middle (``trim`` cut from each end, where fewer
    trials run while they start and finish)."""
    on = [i for i, u in enumerate(util) if u >= active]
    if not on:
        return {"samples": len(util), "active_samples": 0, "mean_active": None, "mean_middle": None}
    window = util[on[0] : on[-1] + 1]
    cut = int(len(window) * trim)
    middle = window[cut : len(window) - cut] or window
    return {"samples": len(util), "active_samples": len(window), "mean_active": sum(window) / len(window),
            "mean_middle": sum(middle) / len(middle), "middle_samples": len(middle)}


class GpuSampler:
    """GPU utilisation of physical GPU ``index`` every ``period`` s, from NVML when pynvml is
    installed, else from ``nvidia-smi``; in a background thread while the context is open."""

    def __init__(self, index: int = 0, period: float = 0.2) -> None:
        self.index, self.period = index, period
        self.util: list[float] = []
        self.source = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> GpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception:  # not installed, or no NVML library in this container
            self._run_smi()
            return
        self.source = "nvml"
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(self.index)
            while not self._stop.wait(self.period):
                self.util.append(float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu))
        finally:
            pynvml.nvmlShutdown()

    def _run_smi(self) -> None:
        if shutil.which("nvidia-smi") is None:
            self.source = "none (no NVML, no nvidia-smi)"
            return
        self.source = "nvidia-smi"
        cmd = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i", str(self.index),
               "-lms", str(int(self.period * 1000))]
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) as proc:
            threading.Thread(target=lambda: (self._stop.wait(), proc.terminate()), daemon=True).start()
            for line in proc.stdout or []:
                if line.strip().isdigit():
                    self.util.append(float(line))


def _small_data(s: Suite, images: int) -> dict[str, Any]:
    """The suite's ``data:`` section for a child run; generated data shrinks to ``images``,
    since every trial or worker generates its own copy."""
    return {**s.data_spec, "synthetic_size": images} if s.data_spec.get("name") == "synthetic" else dict(s.data_spec)


def _ray_env(s: Suite, folder: Path) -> dict[str, str]:
    """A private local Ray: its own temp dir and token (nothing in ~/.ray), never a RAY_ADDRESS."""
    env = {**s.env, "RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true", "RRSCALE_TUNE_VERBOSE": "0",
           "RAY_TMPDIR": tempfile.mkdtemp(prefix="rr-ray-", dir="/tmp"), "RAY_AUTH_TOKEN": secrets.token_hex(16),
           "RRSCALE_CACHE": str(folder / "cache")}
    env.pop("RAY_ADDRESS", None)
    return env


def _run_logged(cmd: list[str], cwd: Path, env: dict[str, str], log: Path, timeout: float) -> int | None:
    """Run ``cmd`` in its own process group with output to ``log``; None when it timed out
    (then the whole group, Ray's processes included, is terminated). Removes Ray's temp dir."""
    try:
        return _wait_logged(cmd, cwd, env, log, timeout)
    finally:
        shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)


def _wait_logged(cmd: list[str], cwd: Path, env: dict[str, str], log: Path, timeout: float) -> int | None:
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            return None


def _log_tail(log: Path) -> str:
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()] if log.exists() else []
    return lines[-1][:300] if lines else "no output"


def _sweep_row(s: Suite) -> dict[str, Any]:
    import yaml

    gpus = 0.25 if s.cuda else 0.0
    folder = s.out / "ray-sweep"
    folder.mkdir(parents=True, exist_ok=True)
    size = {"K": 32, "batch_size": 64, "epochs": 3, "steps": 300, "images": 10_000} if s.cuda else \
           {"K": 2, "batch_size": 32, "epochs": 2, "steps": 5, "images": 400}
    data = {**_small_data(s, size["images"]), "knn_subset": 2000 if s.cuda else 200}
    spec = {
        "data": data,
        "backbone": {"name": "conv4"},
        "method": {"name": "relational", "K": size["K"]},
        "train": {"epochs": size["epochs"], "batch_size": size["batch_size"], "steps_per_epoch": size["steps"],
                  "knn_every": 1, "progress": False},
        "probe": {"epochs": 5},
        "search": {"train.lr": {"loguniform": [3.0e-4, 3.0e-3]}},
        "tune": {"name": "gpu-suite", "num_samples": 4, "max_concurrent_trials": 4, "metric": "knn_top1",
                 "mode": "max", "scheduler": "none", "gpus_per_trial": gpus, "cpus_per_trial": 1.0 if s.cuda else 0.5,
                 "num_cpus": 0 if s.cuda else 2, "dashboard": False, "storage_path": str(folder / "ray")},
        "mlflow": {"experiment": "gpu-suite", "tracking_uri": f"sqlite:///{folder / 'mlflow.db'}"},
    }
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    settings = {"trials": 4, "gpus_per_trial": gpus, "config": str(path), "sampling": "every 0.2 s"}
    log = folder / "tune.log"
    tic = time.monotonic()
    with GpuSampler() if s.cuda else nullcontext() as sampler:
        rc = _run_logged([sys.executable, "-m", "rrscale.cli", "tune", str(path)], folder, _ray_env(s, folder), log,
                         s.time_left() - 5)
    wall = time.monotonic() - tic
    summary_file = folder / "ray" / "gpu-suite" / "sweep.json"
    summary = json.loads(summary_file.read_text())["summary"] if summary_file.exists() else {}
    busy = busy_summary(sampler.util) if sampler is not None else {}
    numbers = {"exit_code": rc, "wall_seconds": wall, "sweep": summary, "gpu_utilisation": busy,
               "sampler": sampler.source if sampler is not None else "none (CPU)", "log": str(log)}
    finished = int(summary.get("finished", 0))
    if rc is None:
        result = f"timed out after {wall:.0f} s (time budget); {finished}/4 trials finished"
    elif rc != 0 or not summary:
        result = f"rrscale tune exited with {rc}: {_log_tail(log)}"
    else:
        result = f"{finished}/4 trials finished in {wall:.0f} s"
    middle = busy.get("mean_middle")
    if middle is not None:
        result += f"; GPU busy {middle:.0f} % (middle 60 % of the active window)"
    ok = rc == 0 and finished == 4 and middle is not None and middle >= BUSY_TARGET
    return measured("4-trial sweep, gpus_per_trial 0.25", settings=settings, numbers=numbers,
                    target=f"4 trials finish, GPU busy >= {BUSY_TARGET:g} %", result=result, ok=ok, applies=s.cuda,
                    note="" if s.cuda else "CPU: the sweep ran with CPU trials; utilisation needs a GPU")


def _ddp_row(s: Suite) -> dict[str, Any]:
    name = "2-worker DDP (NCCL)"
    gpus = torch.cuda.device_count() if s.cuda else 0
    if gpus < 2:
        return skipped(name, f"needs 2 GPUs, this machine has {gpus}")
    folder = s.out / "ddp"
    folder.mkdir(parents=True, exist_ok=True)
    sets = [f"data.{key}={value}" for key, value in _small_data(s, 10_000).items()]
    sets += ["method.K=32", "train.epochs=2", "train.steps_per_epoch=200", "train.progress=false", "probe.epochs=5",
             "scaling.use_gpu=true", "scaling.gpus_per_worker=1"]
    cmd = [sys.executable, "-m", "rrscale.cli", "train", "--workers", "2", "--out", str(folder / "run")]
    for item in sets:
        cmd += ["--set", item]
    log = folder / "train.log"
    tic = time.monotonic()
    rc = _run_logged(cmd, folder, _ray_env(s, folder), log, s.time_left() - 5)
    summary_file = folder / "run" / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
    summary.pop("history", None)
    ok = rc == 0 and summary.get("status") == "ok" and summary.get("workers") == 2
    result = (f"{summary.get('images_per_s', 0):,.0f} images/s over 2 workers, probe {summary.get('probe_top1', 0):.3f}"
              if ok else f"rrscale train exited with {rc}: {_log_tail(log)}")
    return measured(name, settings={"workers": 2, "overrides": sets}, numbers={"exit_code": rc,
                    "wall_seconds": time.monotonic() - tic, "summary": summary, "log": str(log)},
                    target="2 workers train and report", result=result, ok=ok)


def ray_rows(s: Suite) -> Iterator[dict[str, Any]]:
    """Fractional GPUs in a sweep and DDP, through the rrscale CLI in subprocesses (only there
    do Ray, Optuna and MLflow get imported)."""
    names = ("4-trial sweep, gpus_per_trial 0.25", "2-worker DDP (NCCL)")
    missing = [m for m in ("ray", "optuna", "mlflow") if importlib.util.find_spec(m) is None]
    reason = ""
    if missing:
        reason = f"not installed: {', '.join(missing)} (the rest of the suite needs none of them)"
    elif s.quick:
        reason = "--quick starts no Ray (its start-up alone takes longer than a quick section)"
    if reason:
        for name in names:
            yield skipped(name, reason)
        return
    yield _sweep_row(s)
    yield _ddp_row(s)


@dataclass(frozen=True)
class Section:
    key: str
    title: str
    rows: Callable[[Suite], Iterator[dict[str, Any]]]
    budget_s: float  # the full run on one H200
    quick_budget_s: float
    optional: bool = False  # left out of the full run unless --sections names it


SECTIONS = [
    Section("throughput", "1 RR throughput: end to end vs ceiling", throughput_rows, 210, 25),
    Section("memory", "2 peak GPU memory, largest batch", memory_rows, 75, 25),
    Section("views", "3 views on the device vs CPU statistics", views_rows, 20, 15),
    Section("amp", "4 bf16 vs fp32", amp_rows, 60, 20),
    Section("probe", "5 linear probe on cached features", probe_rows, 45, 15),
    Section("gedi", "6 GEDI step cost and stability", gedi_rows, 45, 20),
    Section("ray", "7 Ray: fractional-GPU sweep, DDP", ray_rows, 90, 5),
    Section("gedi_cifar", "8 GEDI on CIFAR-10 (10 epochs; optional)", gedi_cifar_rows, 420, 20, optional=True),
]
