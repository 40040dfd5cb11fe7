"""What a Tune trial costs before it trains: in-process loop vs a TorchTrainer per trial.

Runs ``search_spaces/quickstart.yaml`` (4 trials) once per trial mode on a fresh local Ray and
measures, per trial, the time from Tune starting the trial (driver clock) to the loop being
ready for its first training step (data loaded, model built, checkpoint looked up: the
``loop_ready_at`` the hooks report), and the sweep's trials/hour. Modes:

* ``inprocess``  the loop runs inside the Tune function (``ray.tune.report``), actors reused;
* ``trainer``    each trial starts a 1-worker ``TorchTrainer`` (Train V2 controller + worker
                 group + process group), as a multi-worker trial does;
* ``trainer2``   (``--two-workers``) each trial a 2-worker TorchTrainer (DDP, 1 CPU each).

The ASHA scheduler is switched off (``tune.scheduler=none``) so that every mode trains exactly
the same epochs; only the overhead differs. Results go to
``benchmarks/results/tune_overhead-<device>.json`` with the device, date and versions.

    python benchmarks/tune_overhead.py                      # cifar10-mini if present, else synthetic
    python benchmarks/tune_overhead.py --two-workers --set train.epochs=2
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
MINI = REPO.parent / "shared" / "data" / "cifar10-mini"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def device_name() -> tuple[str, str]:
    """(human name, file slug) of the machine the trials run on."""
    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
    else:
        model = ""
        try:
            model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                         if line.startswith("model name"))
        except (OSError, StopIteration):
            model = platform.processor() or platform.machine()
        name = f"{os.cpu_count()}-core CPU ({model})"
    slug = "cpu" if not torch.cuda.is_available() else re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    if slug == "cpu":
        slug = f"cpu-{os.cpu_count()}core"
    return name, slug


def run_mode(mode: str, overrides: list[str], work: Path) -> dict[str, Any]:
    from rrscale.config import load_config
    from rrscale.scale.tune import check_tune_config, run_tune

    name = f"overhead-{mode}"
    sets = [*overrides, f"tune.name={name}", f"tune.storage_path={work / 'ray_results'}",
            "tune.scheduler=none"]
    requested = "inprocess" if mode == "inprocess" else "trainer"
    if mode == "trainer2":
        sets += ["scaling.num_workers=2", "scaling.cpus_per_worker=1"]
    elif mode == "trainer":
        sets += ["scaling.num_workers=1", "scaling.cpus_per_worker=1"]
    path = REPO / "search_spaces" / "quickstart.yaml"
    cfg = load_config(path, sets)
    check_tune_config(cfg, path, requested_mode=requested)
    tic = time.perf_counter()
    rc = run_tune(cfg, path, requested_mode=requested)
    total = time.perf_counter() - tic
    sweep = json.loads((work / "ray_results" / name / "sweep.json").read_text())
    rows, summary = sweep["rows"], sweep["summary"]
    startups = [float(r["startup_seconds"]) for r in rows if r.get("startup_seconds") is not None]
    return {
        "mode": mode,
        "exit_code": rc,
        "trials": summary["trials"],
        "finished": summary["finished"],
        "max_concurrent_trials": summary["max_concurrent_trials"],
        "epochs_per_trial": cfg.train.epochs,
        "trial_start_to_first_step_s": {
            "per_trial": startups,
            "median": statistics.median(startups) if startups else None,
            "max": max(startups) if startups else None,
        },
        "trial_seconds_median": statistics.median(float(r["seconds"]) for r in rows if r.get("seconds")),
        "sweep_seconds": summary["wall_seconds"],
        "trials_per_hour": summary.get("trials_per_hour"),
        "command_seconds_incl_ray_start": total,
        "trials_per_hour_incl_ray_start": summary["trials"] / total * 3600,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config overrides for every mode")
    p.add_argument("--two-workers", action="store_true", help="also measure 2-worker TorchTrainer trials")
    p.add_argument("--modes", default="", help="comma-separated subset of inprocess,trainer,trainer2")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = p.parse_args(argv)

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("RRSCALE_TUNE_VERBOSE", "0")
    work = Path(tempfile.mkdtemp(prefix="rrbench-"))
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlflow.db'}")
    os.environ.setdefault("RRSCALE_DASHBOARD_PORT", str(_free_port()))
    ray_tmp = Path(tempfile.mkdtemp(prefix="rb", dir="/tmp"))
    os.environ.setdefault("RAY_TMPDIR", str(ray_tmp))
    overrides = list(args.overrides)
    if (MINI / "train.parquet").exists() and not os.environ.get("RRSCALE_DATA_ROOT"):
        os.environ["RRSCALE_DATA_ROOT"] = str(MINI)
    data = os.environ.get("RRSCALE_DATA_ROOT", "")
    if not data and not any(o.startswith("data.name=") for o in overrides):
        overrides.append("data.name=synthetic")
    modes = [m for m in (args.modes.split(",") if args.modes else
                         ["inprocess", "trainer", *(["trainer2"] if args.two_workers else [])]) if m]

    import ray
    import torch

    name, slug = device_name()
    results = []
    try:
        for mode in modes:
            print(f"== {mode}", flush=True)
            results.append(run_mode(mode, overrides, work))
            print(json.dumps(results[-1], indent=1), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    by = {r["mode"]: r for r in results}
    ratio = {}
    if "inprocess" in by and "trainer" in by:
        a, b = by["inprocess"], by["trainer"]
        ratio = {
            "startup_median_trainer_minus_inprocess_s": b["trial_start_to_first_step_s"]["median"]
            - a["trial_start_to_first_step_s"]["median"],
            "trials_per_hour_inprocess_over_trainer": a["trials_per_hour"] / b["trials_per_hour"],
        }
    payload = {
        "benchmark": "tune_overhead",
        "device": name,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "config": "search_spaces/quickstart.yaml",
        "overrides": overrides + ["tune.scheduler=none"],
        "data": data or "synthetic",
        "cpu_count": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
        "versions": {"ray": ray.__version__, "torch": torch.__version__, "python": platform.python_version()},
        "results": results,
        "comparison": ratio,
    }
    from common import write_result  # torch and rrscale load only once the trials are measured

    write_result(args.out / f"tune_overhead-{slug}.json", payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
