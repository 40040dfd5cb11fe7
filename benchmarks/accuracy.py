"""RR accuracy in the official notebook's setting, on the full CIFAR-10 Parquet copy.

conv4, K=4, N=64, BCE (focal gamma=0, no alpha), 10 SSL epochs, then the linear probe for
10 epochs (the notebook's smoke setting, 52.33 % on lossless CIFAR-10) and for the paper's
100 epochs, both on the same checkpoint. The shared copy went through JPEG q75 once, so expect
about 2 points under lossless numbers. Writes ``results/accuracy-<device>.json``.

    python benchmarks/accuracy.py                       # the notebook setting
    python benchmarks/accuracy.py --set method.K=32 --set train.epochs=50 --tag k32
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

import torch

from common import write_result
from rrscale.cli import main as rrscale
from rrscale.engine.loop import describe_device, pick_device

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10"
NOTEBOOK = [
    "backbone.name=conv4", "method.K=4", "train.batch_size=64", "method.focal_gamma=0",
    "method.focal_alpha=null", "train.epochs=10", "probe.epochs=10", "train.progress=false",
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=str(SHARED))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--tag", default="notebook")
    p.add_argument("--runs", type=Path, default=Path("runs/benchmark-accuracy"))
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args(argv)
    overrides = [f"data.root={args.root}", *NOTEBOOK, *args.overrides]
    run_dir = args.runs / args.tag
    tic = time.perf_counter()
    argv_train = ["train", "--fresh", "--out", str(run_dir)]
    for o in overrides:
        argv_train += ["--set", o]
    if rrscale(argv_train) != 0:
        return 1
    train_wall = time.perf_counter() - tic
    summary = json.loads((run_dir / "summary.json").read_text())
    tic = time.perf_counter()
    if rrscale(["probe", str(run_dir / "checkpoint.pt"), "--set", "probe.epochs=100", "--out",
                str(run_dir / "probe100")]) != 0:
        return 1
    probe100_wall = time.perf_counter() - tic
    probe100 = json.loads((run_dir / "probe100" / "probe.json").read_text())
    device = pick_device("auto")
    payload = {
        "benchmark": "accuracy",
        "tag": args.tag,
        "device": describe_device(device),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "dataset": f"{args.root} (CIFAR-10 via JPEG q75: ~2 points under lossless)",
        "overrides": overrides,
        "ssl_epochs": summary["epochs"],
        "probe_top1_10_epochs": summary["probe_top1"],
        "probe_top1_100_epochs": probe100["probe_top1"],
        "knn_top1": summary["knn_top1"],
        "images_per_s": summary["images_per_s"],
        "ssl_train_seconds": summary["seconds"],
        "train_and_probe10_wall_seconds": train_wall,
        "probe100_wall_seconds": probe100_wall,
        "reference": "official notebook: 52.33 % (conv4, K=4, BCE, 10+10 epochs, lossless CIFAR-10)",
        "history": summary["history"],
    }
    tag = "cuda" if device.type == "cuda" else "cpu"
    print(json.dumps({k: v for k, v in payload.items() if k != "history"}, indent=2))
    write_result(args.out / f"accuracy-{args.tag}-{tag}.json", payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
