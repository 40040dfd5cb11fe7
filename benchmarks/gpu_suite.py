"""One prepared command that proves rrscale's CUDA path: 7 timed sections (+1 optional), one JSON file, one table.

A GPU machine is lent rarely and briefly, often with Python, torch, torchvision and numpy
only. Run this once from the repository root there and read the table:

    python benchmarks/gpu_suite.py --out results --wheels wheels        # full: < 10 minutes on one H200
    python benchmarks/gpu_suite.py --quick --out /tmp/gpu-suite          # every section, toy sizes, < 2 min, CPU too
    python benchmarks/gpu_suite.py --out results --data cifar10.npz      # real images instead of synthetic ones

Wheels: rrscale's config needs pydantic and pyyaml; nothing else beyond torch, torchvision and
numpy is imported (Ray, Optuna and MLflow only by section 7, in a subprocess, when installed).
On a machine with internet, ``benchmarks/fetch_gpu_wheels.sh wheels`` downloads pydantic,
pydantic-core, annotated-types, typing-extensions, typing-inspection and pyyaml for CPython
3.12 on manylinux x86_64 (another Python: ``PYTHON_VERSION=3.11 benchmarks/fetch_gpu_wheels.sh
wheels``); hand the folder in with ``--wheels``: the suite installs them with ``pip install
--no-index --no-deps`` into a temporary folder put first on sys.path, then imports rrscale.

Data: synthetic 10-class images by default (50,000 train, 10,000 test; 512 with ``--quick``).
``--data`` takes a ``.npz`` written by ``rrscale data convert cifar10:ROOT cifar10.npz``
(``x_train``, ``y_train``, ``x_test``, ``y_test``: uint8 N x 32 x 32 x 3 images, int64 labels)
or a ``.npy`` of uint8 images alone (then unlabelled); numpy reads both, no pyarrow needed.
All of CIFAR-10 is ~170 MB as .npz; ``--fraction 0.2`` makes a ~57 MB copy (10,000 train
images, the 10,000 test images whole).

Sections (each row: device, torch version, date, settings, numbers, status against a target):
  1 throughput  RR end to end (views made on the GPU + step) vs the compute-only ceiling (views
                already made): conv4 K=32 N=64, resnet32 K=32 N=64, conv4 K=4 N=128; bf16 +
                channels_last, eager and torch.compile. Target e2e >= 0.8 x ceiling.
  2 memory      peak GPU memory of resnet32 K=32 N=64 (target <= 8 GB) and the largest conv4
                K=32 batch that fits (doubling + bisection, out-of-memory caught, in a child process).
  3 views       the view-statistics check of tests/test_views.py with the views made on the GPU.
  4 amp         the same short RR run with bf16 autocast and in fp32: loss per epoch and kNN.
  5 probe       the 100-epoch linear probe on cached features of 50,000 images (target <= 30 s).
  6 gedi        GEDI step with vs without its generative term (target <= 25x); 200 steps with
                the paper's defaults without divergence.
  7 ray         if Ray, Optuna and MLflow are installed: a 4-trial sweep at gpus_per_trial 0.25
                with the GPU's utilisation sampled (target >= 85 % busy), and 2-worker DDP when
                2 GPUs exist; otherwise the rows say skipped and why.
  8 gedi_cifar  optional (about 4-7 minutes alone, so the full run leaves it out): the CIFAR-10
                run of benchmarks/gedi_clustering.py (search_spaces/gedi-cifar.yaml, 10 epochs,
                GEDI vs no-gen vs k-means on random-init features) on --data; needs scipy.
                  python benchmarks/gpu_suite.py --out results --data cifar10.npz --sections gedi_cifar

Timing: CUDA events after warm-up (wall clock on CPU). Each section has a time budget; rows
that would overrun it are skipped and say so, and the whole run stops starting sections at
--time-limit. Statuses: pass / fail (target met or not), n/a (ran, but the target does not
apply: CPU, or --quick sizes), skipped (did not run, with the reason), error (the measurement
raised: the error is the finding). The JSON (OUT/gpu_suite-MODE-DEVICE-DATE.json) is rewritten
after every row, so a run cut short keeps what it measured. Exit code 0 once it ran, whatever
the statuses; 2 for bad input (one line, nothing started, nothing written).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

STARTED = time.monotonic()  # the time limit counts the wheel install, imports and data generation too
HERE = Path(__file__).resolve().parent
REPO = HERE.parent
EXIT_BAD_INPUT = 2
TIME_LIMIT_S = {"full": 560.0, "quick": 110.0}
SIZES = {"full": 50_000, "quick": 512}  # synthetic train images


def _fail(message: str) -> int:
    print(f"gpu_suite: error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gpu_suite.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for the JSON result and the sections' logs")
    p.add_argument("--quick", action="store_true", help="every section at toy size (< 2 minutes, runs on CPU too)")
    p.add_argument("--data", type=Path, help=".npz (x_train, y_train, x_test, y_test) or .npy (images) uint8 arrays")
    p.add_argument("--wheels", type=Path, help="folder of wheels to install first (pydantic, pyyaml and their needs)")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto", help="default: CUDA when available")
    p.add_argument("--sections", default="", help="comma-separated section keys to run (default: all but the optional "
                                                 "gedi_cifar, which --quick includes)")
    p.add_argument("--time-limit", type=float,
                   help="seconds from the start after which no section starts (default 560; quick 110)")
    p.add_argument("--note", default="", help="free text stored in the JSON (e.g. 'machine shared with other jobs')")
    return p.parse_args(argv)


def check_inputs(args: argparse.Namespace) -> str | None:
    """The first problem with the command line, as one line, before anything starts."""
    if args.wheels is not None and not sorted(args.wheels.glob("*.whl")):
        return f"--wheels {args.wheels}: expected a folder of .whl files (benchmarks/fetch_gpu_wheels.sh makes one)"
    if args.data is not None:
        if args.data.suffix.lower() not in (".npz", ".npy"):
            return f"--data {args.data}: expected a .npz or .npy file (rrscale data convert NAME:ROOT FILE.npz)"
        if not args.data.is_file():
            return f"--data {args.data}: expected an existing file (not found)"
    if args.out.exists() and not args.out.is_dir():
        return f"--out {args.out}: expected a folder (a file is in the way)"
    if args.time_limit is not None and args.time_limit <= 0:
        return f"--time-limit: expected a positive number of seconds (got {args.time_limit:g})"
    return None


def chosen_sections(keys: list[str], quick: bool) -> list[Any]:
    """The sections ``--sections`` names, in suite order; without names every section except
    the optional ones in a full run (they would overrun its 10 minutes), all of them with --quick."""
    import gpu_sections as gs

    return [sec for sec in gs.SECTIONS if sec.key in keys or (not keys and (quick or not sec.optional))]


def install_wheels(folder: Path) -> Path:
    """``pip install --no-index --no-deps`` every wheel of ``folder`` into a fresh temporary folder."""
    target = Path(tempfile.mkdtemp(prefix="rrscale-wheels-"))
    wheels = [str(p) for p in sorted(folder.glob("*.whl"))]
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile",
                           "--disable-pip-version-check", "--target", str(target), *wheels],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        shutil.rmtree(target, ignore_errors=True)
        lines = (proc.stderr or proc.stdout).strip().splitlines() or [f"pip exited with {proc.returncode}"]
        raise RuntimeError(lines[-1])
    return target


def _git_sha() -> str | None:
    try:
        proc = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() or None


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("torch", "torchvision", "numpy", "pydantic", "pyyaml"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _write_atomic(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def print_table(payload: dict[str, Any]) -> None:
    rows = payload["rows"]
    print(f"\n== rrscale GPU suite: {payload['device']}, torch {payload['torch']}, {payload['mode']}, "
          f"{payload['seconds']:.0f} s ==")
    print(f"{'section':<11}{'row':<44}{'status':<9}result  [target]")
    for r in rows:
        text = r["result"] or r["note"]
        target = f"  [{r['target']}]" if r["target"] and r["status"] in ("pass", "fail") else ""
        print(f"{r['section']:<11}{r['name'][:43]:<44}{r['status']:<9}{text}{target}")
    counts = {s: sum(r["status"] == s for r in rows) for s in ("pass", "fail", "n/a", "skipped", "error")}
    print("  ".join(f"{k}: {v}" for k, v in counts.items()))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    problem = check_inputs(args)
    if problem:
        return _fail(problem)
    paths = [str(HERE), str(REPO)]
    if args.wheels is None:
        return run(args, paths)
    try:
        site = install_wheels(args.wheels)
    except RuntimeError as exc:
        return _fail(f"--wheels {args.wheels}: pip could not install them: {exc}")
    try:
        return run(args, [str(site), *paths])
    finally:
        shutil.rmtree(site, ignore_errors=True)


def run(args: argparse.Namespace, paths: list[str]) -> int:
    """Everything after the command-line checks, with ``paths`` (wheels, benchmarks, repo) first on sys.path."""
    sys.path[:0] = paths
    try:
        import pydantic  # noqa: F401  (rrscale.config needs both)
        import yaml  # noqa: F401
    except ImportError as exc:
        return _fail(f"rrscale needs pydantic and pyyaml ({exc}); hand them in with --wheels DIR "
                     "(benchmarks/fetch_gpu_wheels.sh DIR downloads them)")

    import torch

    import gpu_sections as gs
    from common import result_header
    from rrscale.config import ConfigError, VECTOR_DATASETS, DATASET_NAMES, validate
    from rrscale.data.arrays import dataset_name
    from rrscale.data.sources import DataError, load_data

    keys = [k.strip() for k in args.sections.split(",") if k.strip()]
    known = [sec.key for sec in gs.SECTIONS]
    unknown = [k for k in keys if k not in known]
    if unknown:
        return _fail(f"--sections: unknown {', '.join(unknown)}; expected some of {', '.join(known)}")
    sections = chosen_sections(keys, args.quick)
    if args.device == "cuda" and not torch.cuda.is_available():
        return _fail("--device cuda: expected a CUDA GPU (torch.cuda.is_available() is False)")
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    mode = "quick" if args.quick else "full"

    if args.data is not None:
        root = args.data.resolve()
        try:
            name = dataset_name(root)
        except (OSError, ValueError) as exc:
            return _fail(f"--data {args.data}: cannot read it: {exc}")
        generated = ("synthetic", *VECTOR_DATASETS)
        spec: dict[str, Any] = {"name": name if name in DATASET_NAMES and name not in generated else "parquet",
                                "root": str(root)}
    else:
        spec = {"name": "synthetic", "synthetic_size": SIZES[mode]}
    tic = time.monotonic()
    try:
        data = load_data(validate({"data": spec}, "--data").data, seed=0)
    except (ConfigError, DataError) as exc:
        return _fail(f"--data {args.data}: {exc}")
    if not data.train.is_image:
        return _fail(f"--data {args.data}: expected images")

    args.out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([*paths, *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]])
    suite = gs.Suite(device=device, quick=args.quick, data=data, data_spec=spec, out=args.out.resolve(), env=env)
    header = result_header("gpu_suite", device)
    gpu = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        gpu = {"name": props.name, "capability": f"{props.major}.{props.minor}", "count": torch.cuda.device_count(),
               "memory_gib": round(props.total_memory / 2**30, 1), "multiprocessors": props.multi_processor_count}
    tag = re.sub(r"[^a-z0-9]+", "-", gpu["name"].lower()).strip("-") if gpu else "cpu"
    path = args.out / f"gpu_suite-{mode}-{tag}-{dt.date.today().isoformat()}.json"
    limit = args.time_limit or TIME_LIMIT_S[mode]
    payload: dict[str, Any] = {
        **header, "mode": mode, "gpu": gpu, "versions": _versions(), "git": _git_sha(), "argv": sys.argv[1:],
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "note": args.note,
        "data": {"spec": spec, "train_images": len(data.train.x), "test_images": len(data.probe_test.x),
                 "fingerprint": data.fingerprint, "load_seconds": time.monotonic() - tic},
        "time_limit_s": limit, "seconds": 0.0, "complete": False, "sections": [], "rows": [],
    }
    end = STARTED + limit

    def record(sec: gs.Section, row: dict[str, Any]) -> None:
        row = {"section": sec.key, **row, "device": header["device"], "torch": header["torch"],
               "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
        payload["rows"].append(row)
        payload["seconds"] = time.monotonic() - STARTED
        _write_atomic(path, payload)
        print(f"[{sec.key}] {row['name']}: {row['status']} {row['result'] or row['note']}", flush=True)

    print(f"gpu_suite: {mode} run on {header['device']}, data {spec}, writing {path}", flush=True)
    for sec in sections:
        tic = time.monotonic()
        left = end - tic
        if left < 5:
            record(sec, gs.skipped("(section)", f"suite time limit of {limit:.0f} s reached"))
        else:
            suite.deadline = tic + min(sec.quick_budget_s if args.quick else sec.budget_s, left)
            try:
                for row in sec.rows(suite):
                    record(sec, row)
            except Exception as exc:  # the section's remaining rows are lost; the suite goes on
                row = gs.errored("(section)", exc)
                row["numbers"]["traceback"] = traceback.format_exc()[-3000:]
                record(sec, row)
            gs.free_memory(device)
        payload["sections"].append({"key": sec.key, "title": sec.title, "seconds": time.monotonic() - tic,
                                    "budget_s": sec.quick_budget_s if args.quick else sec.budget_s})
    payload["seconds"] = time.monotonic() - STARTED
    payload["complete"] = True
    _write_atomic(path, payload)
    print_table(payload)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
