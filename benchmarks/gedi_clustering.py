"""Clustering quality at equal epochs: GEDI vs GEDI no-gen vs RR + k-means on CIFAR-10 mini.

GEDI (Sansone & Manhaeve, arXiv:2401.00873; docs/methods.md §2) clusters with its own head
(argmax of the c cluster logits); RR (Patacchiola & Storkey 2020) has no cluster head, so it is
scored by k-means (k = number of classes) on its frozen backbone features. For a like-for-like
view of the representations, every method also gets the k-means score on its backbone
features (``kmeans_nmi`` / ``kmeans_acc``) and the paper's linear probe (``probe_top1``).

Each row is one full ``rrscale`` run through the engine's ``run_experiment`` (same data, same
epochs, same seed, same batch); a run whose loss explodes is recorded with status ``failed``
and its error instead of stopping the benchmark.

    python benchmarks/gedi_clustering.py                        # 20 epochs each on cifar10-mini
    python benchmarks/gedi_clustering.py --epochs 50 --set train.lr=1e-4
    python benchmarks/gedi_clustering.py --gedi-set method.clusters=2048   # the paper's c
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from common import result_header
from rrscale.config import ExperimentConfig, load_config
from rrscale.data.sources import load_data
from rrscale.engine.clustering import cluster_acc, kmeans, nmi
from rrscale.engine.evaluate import extract_features
from rrscale.engine.loop import LocalHooks, fit, final_evaluation, pick_device
from rrscale.methods.base import TrainingDiverged

MINI = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-mini"
ROWS: dict[str, list[str]] = {
    "gedi": ["method.name=gedi", "method.lambda_gen=1.0"],
    "gedi_nogen": ["method.name=gedi", "method.lambda_gen=0.0"],
    "rr": ["method.name=relational"],
}


def _config(row: list[str], args: argparse.Namespace) -> ExperimentConfig:
    common = [
        f"data.root={args.root}",
        "data.name=cifar10",
        f"backbone.name={args.backbone}",
        f"backbone.norm={args.norm}",
        f"train.epochs={args.epochs}",
        f"train.batch_size={args.batch}",
        f"train.seed={args.seed}",
        f"train.device={args.device}",
        "train.knn_every=0",
        "train.progress=false",
        f"probe.epochs={args.probe_epochs}",
    ]
    gedi = [f"method.clusters={args.clusters}", *args.gedi_set] if row[0] == "method.name=gedi" else []
    rr = [f"method.K={args.rr_k}"] if row[0] == "method.name=relational" else []
    return load_config(None, [*common, *row, *gedi, *rr, *args.set])


def run_row(name: str, cfg: ExperimentConfig, data, device: torch.device, args: argparse.Namespace) -> dict:
    row: dict = {"row": name, "method": cfg.method.model_dump(mode="json"), "status": "ok"}
    tic = time.perf_counter()
    try:
        result = fit(cfg, data, hooks=LocalHooks(None), device=device)
    except TrainingDiverged as exc:
        row.update(status="failed", error=str(exc), seconds=time.perf_counter() - tic)
        return row
    row["train_seconds"] = result.train_seconds
    scores = final_evaluation(cfg, result.method, data, device, None)
    row.update({k: v for k, v in scores.items() if isinstance(v, (int, float))})
    symmetric = bool(getattr(result.method, "symmetric_input", False))
    feats = extract_features(result.method.backbone, data.probe_test.x, data.train.mean, data.train.std,
                             symmetric=symmetric, device=device)
    labels = data.probe_test.y
    assign = kmeans(feats, data.probe_test.num_classes, seed=args.seed)
    row["kmeans_nmi"] = nmi(assign, labels)
    row["kmeans_acc"] = cluster_acc(assign, labels)
    if name == "rr":  # RR has no cluster head: its clustering score is k-means on its features
        row["nmi"], row["acc"] = row["kmeans_nmi"], row["kmeans_acc"]
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=str(MINI), help="CIFAR-10 Parquet folder (default: ../shared/data/cifar10-mini)")
    p.add_argument("--epochs", type=int, default=20, help="SSL epochs, the same for every method")
    p.add_argument("--probe-epochs", type=int, default=100)
    p.add_argument("--backbone", default="conv4")
    p.add_argument("--norm", default="batch", choices=["batch", "group", "none"])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--clusters", type=int, default=10, help="GEDI clusters c (10 = classes, so ACC is Hungarian)")
    p.add_argument("--rr-k", type=int, default=4, help="RR views per image")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every row")
    p.add_argument("--gedi-set", action="append", default=[], metavar="KEY=VALUE", help="override for GEDI rows")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args(argv)
    device = pick_device(args.device)
    data = load_data(_config(ROWS["rr"], args).data, seed=args.seed)
    rows = []
    for name in args.rows:
        row = run_row(name, _config(ROWS[name], args), data, device, args)
        print(json.dumps(row), flush=True)
        rows.append(row)
    payload = {
        **result_header("gedi_clustering", device),
        "dataset": args.root,
        "train_images": len(data.train.x),
        "test_images": len(data.probe_test.x),
        "epochs": args.epochs,
        "backbone": args.backbone,
        "norm": args.norm,
        "batch": args.batch,
        "seed": args.seed,
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    tag = "cuda" if device.type == "cuda" else "cpu"
    path = args.out / f"gedi_clustering-{tag}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
