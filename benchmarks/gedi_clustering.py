"""GEDI clustering: the 2-D toy sets with the vector defaults, and CIFAR-10 with conv4.

GEDI (Sansone & Manhaeve, arXiv:2401.00873; docs/methods.md §2) clusters with its own head
(argmax of the c cluster logits). Every comparison is GEDI against "GEDI no-gen" (the same model
and settings with ``lambda_gen = 0``), the ablation the paper compares with; each row is a full
training run through the engine's ``fit`` and ``final_evaluation``, and a run whose loss explodes
is recorded with status ``failed`` and its error instead of stopping the benchmark.

``toy``: two moons and two circles, 5 seeds each, with the settings ``rrscale train`` uses when
the file leaves them unset (``VECTOR_GEDI_DEFAULTS``). Reports NMI mean ± std and per seed, and one
figure per dataset: GEDI and no-gen side by side, test points coloured by cluster, SGLD samples
as crosses, the energy landscape (LSE) as shading. Target: GEDI NMI >= 0.95 on both, >= no-gen.

``cifar``: the settings of ``search_spaces/gedi-cifar.yaml`` (conv4) on CIFAR-10: GEDI vs no-gen
vs k-means on the features of the same backbone at random init. Stability is part of the result:
no divergence-guard trip, and >= 50 % of the clusters in use (or c = 10 all used) on the test
split and in the last epoch. ``cifar_run`` is the same run as a function; ``compare_on`` runs it
on data already loaded (benchmarks/gpu_suite.py's ``gedi_cifar`` section).

    python benchmarks/gedi_clustering.py toy                       # moons + circles, seeds 1-5
    python benchmarks/gedi_clustering.py toy --datasets moons --seeds 1 2
    python benchmarks/gedi_clustering.py cifar --epochs 10         # full CIFAR-10 (CPU: hours)
    python benchmarks/gedi_clustering.py cifar --root ../shared/data/cifar10-mini --epochs 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from common import result_header, write_result
from rrscale.config import ExperimentConfig, load_config
from rrscale.data.sources import DataBundle, load_data
from rrscale.engine.clustering import cluster_acc, kmeans, nmi
from rrscale.engine.evaluate import extract_features
from rrscale.engine.loop import LocalHooks, fit, final_evaluation, pick_device, seed_everything
from rrscale.methods import build_method
from rrscale.methods.base import TrainingDiverged

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
RESULTS = Path(__file__).parent / "results"
CIFAR_CONFIG = REPO / "search_spaces" / "gedi-cifar.yaml"
TOY_DATASETS = ("moons", "circles")
TOY_SEEDS = (1, 2, 3, 4, 5)
TOY_TARGET_NMI = 0.95
NOGEN = ["method.lambda_gen=0.0"]
QUIET = ["train.progress=false", "train.knn_every=0"]


class EpochLog(LocalHooks):
    """No files; prints each epoch's metrics as one JSON line (a multi-hour CPU run shows progress)."""

    def __init__(self, label: str) -> None:
        super().__init__(None)
        self.label = label

    def report(self, metrics: dict[str, Any], state: dict[str, Any] | None, final: bool = False) -> None:
        if not final:
            print(json.dumps({"row": self.label, **metrics}), flush=True)


def train_and_score(cfg: ExperimentConfig, data: DataBundle, device: torch.device,
                    hooks: LocalHooks | None = None) -> tuple[dict[str, Any], Any]:
    """One run: fit, then the engine's final evaluation (NMI, ACC, clusters used, probe...).

    Returns ``(row, method)``; a run stopped by the divergence guard gives ``status: failed``
    with the guard's message and ``method = None``.
    """
    row: dict[str, Any] = {"status": "ok"}
    tic = time.perf_counter()
    try:
        result = fit(cfg, data, hooks=hooks or LocalHooks(None), device=device)
    except TrainingDiverged as exc:
        row.update(status="failed", error=str(exc), seconds=time.perf_counter() - tic)
        return row, None
    row["train_seconds"] = result.train_seconds
    row["history"] = [{k: v for k, v in h.items() if k != "epoch_seconds"} for h in result.history]
    scores = final_evaluation(cfg, result.method, data, device, None)
    row.update({k: v for k, v in scores.items() if isinstance(v, (int, float))})
    return row, result.method


def _stats(values: Sequence[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.pstdev(values) if len(values) > 1 else 0.0}


# ----------------------------------------------------------------------------- toy sets


def toy_config(dataset: str, seed: int, extra: Sequence[str] = ()) -> ExperimentConfig:
    """The config ``rrscale train --set data.name=DATASET --set method.name=gedi`` resolves to."""
    return load_config(None, [f"data.name={dataset}", "method.name=gedi", f"train.seed={seed}", *QUIET, *extra])


def toy_benchmark(datasets: Sequence[str], seeds: Sequence[int], device: torch.device, out: Path,
                  extra: Sequence[str] = ()) -> dict[str, Any]:
    """GEDI vs no-gen over ``seeds`` on each toy set; writes the JSON and one PNG per dataset."""
    from matplotlib.figure import Figure

    tag = device.type
    results: dict[str, Any] = {}
    for dataset in datasets:
        rows: dict[str, list[dict[str, Any]]] = {"gedi": [], "gedi_nogen": []}
        shown: dict[str, Any] = {}
        for seed in seeds:
            for name, sets in (("gedi", []), ("gedi_nogen", NOGEN)):
                cfg = toy_config(dataset, seed, [*extra, *sets])
                data = load_data(cfg.data, seed=seed)
                row, method = train_and_score(cfg, data, device)
                row = {"seed": seed, **{k: v for k, v in row.items() if k != "history"},
                       "last_epoch": row.get("history", [{}])[-1]}
                rows[name].append(row)
                print(json.dumps({"dataset": dataset, "row": name, **{k: row.get(k) for k in
                                  ("seed", "status", "nmi", "acc", "clusters_used", "train_seconds")}}), flush=True)
                if method is not None and name not in shown:
                    x_test = data.probe_test.x.to(device)
                    shown[name] = (method.eval(), x_test, row)
        summary = {}
        for name, runs in rows.items():
            values = [r.get("nmi", 0.0) for r in runs]  # a failed run clusters nothing: NMI 0
            summary[name] = {"nmi": _stats(values), "nmi_per_seed": values,
                             "failed": sum(r["status"] != "ok" for r in runs), "runs": runs}
        gedi, nogen = summary["gedi"]["nmi"]["mean"], summary["gedi_nogen"]["nmi"]["mean"]
        summary["target_met"] = gedi >= TOY_TARGET_NMI and gedi >= nogen
        config = toy_config(dataset, seeds[0], extra)
        summary["config"] = config.training_dict()
        fig = Figure(figsize=(12, 6))
        for ax, name in zip(fig.subplots(1, 2), ("gedi", "gedi_nogen")):
            if name in shown:
                method, x_test, row = shown[name]
                label = "GEDI" if name == "gedi" else "GEDI no-gen (lambda_gen = 0)"
                method.draw_plane(ax, x_test, f"{dataset}, {label}, seed {row['seed']}: NMI {row['nmi']:.3f}")
            else:
                ax.set_axis_off()
                ax.set_title(f"{dataset}, {name}: every seed diverged")
        fig.suptitle(f"GEDI on {dataset}: clusters (colour), SGLD samples (x), LSE landscape (dark = low energy)")
        png = out / f"gedi_toy-{dataset}-{tag}.png"
        out.mkdir(parents=True, exist_ok=True)
        fig.savefig(png, dpi=90)
        summary["figure"] = png.name
        results[dataset] = summary
        print(json.dumps({"dataset": dataset, "gedi": summary["gedi"]["nmi"], "nogen": summary["gedi_nogen"]["nmi"],
                          "target_met": summary["target_met"]}), flush=True)
    payload = {**result_header("gedi_toy", device), "seeds": list(seeds), "target_nmi": TOY_TARGET_NMI,
               "extra_overrides": list(extra), "datasets": results}
    write_result(out / f"gedi_toy-{tag}.json", payload)
    return payload


# ----------------------------------------------------------------------------- CIFAR-10


def cifar_config(epochs: int, root: Path | str, device: str, seed: int, extra: Sequence[str] = ()) -> ExperimentConfig:
    """The GEDI settings of ``search_spaces/gedi-cifar.yaml`` (its search axes are not used here)."""
    sets = [f"data.root={root}", f"train.epochs={epochs}", f"train.device={device}", f"train.seed={seed}",
            *QUIET, *extra]
    return load_config(CIFAR_CONFIG, sets)


def _kmeans_scores(method: Any, data: DataBundle, cfg: ExperimentConfig, device: torch.device) -> dict[str, float]:
    """k-means (k = classes) on the backbone's test-split features: the representation's own clustering."""
    feats = extract_features(method.backbone, data.probe_test.x, data.train.mean, data.train.std,
                             symmetric=True, device=device)
    assign = kmeans(feats, data.probe_test.num_classes, seed=cfg.train.seed)
    return {"kmeans_nmi": nmi(assign, data.probe_test.y), "kmeans_acc": cluster_acc(assign, data.probe_test.y)}


def _stable(row: dict[str, Any], clusters: int) -> bool:
    """No guard trip, no collapse, and >= 50 % of clusters used (c = 10: all 10) on test and last epoch."""
    if row.get("status") != "ok" or row.get("collapsed", 1.0):
        return False
    need = clusters if clusters <= 10 else clusters / 2
    last = row.get("history", [{}])[-1].get("train_clusters_used", 0.0)
    return row.get("clusters_used", 0.0) >= need and last >= need


def compare_on(data: DataBundle, device: torch.device, epochs: int, *, root: Path | str, seed: int = 1,
               extra: Sequence[str] = (), rows: Sequence[str] = ("gedi", "gedi_nogen", "random_init"),
               log: bool = True) -> tuple[dict[str, Any], dict[str, bool]]:
    """The rows of :func:`cifar_run` on already loaded ``data`` (the GPU suite hands its own).

    ``root`` is only recorded in each row's config. Returns ``(rows, verdict)``: ``verdict`` says
    whether GEDI is stable and beats both baselines on NMI.
    """
    base = cifar_config(epochs, root, device.type, seed, extra)
    results: dict[str, Any] = {}
    for name in rows:
        tic = time.perf_counter()
        if name == "random_init":
            seed_everything(seed)
            method = build_method(base, 3, None).to(device).eval()
            row = {"status": "ok", **_kmeans_scores(method, data, base, device)}
        else:
            cfg = cifar_config(epochs, root, device.type, seed, [*extra, *(NOGEN if name == "gedi_nogen" else [])])
            row, method = train_and_score(cfg, data, device, EpochLog(name) if log else None)
            if method is not None:
                row.update(_kmeans_scores(method, data, cfg, device))
                row["stable"] = _stable(row, cfg.method.clusters)
        row["seconds_total"] = time.perf_counter() - tic
        results[name] = row
        if log:
            print(json.dumps({"row": name, **{k: v for k, v in row.items() if k != "history"}}), flush=True)
    gedi = results.get("gedi", {})
    verdict = {
        "stable": bool(gedi.get("stable")),
        "beats_nogen": "gedi_nogen" in results and gedi.get("nmi", 0.0) > results["gedi_nogen"].get("nmi", 0.0),
        "beats_random_kmeans": "random_init" in results
        and gedi.get("nmi", 0.0) > results["random_init"]["kmeans_nmi"],
    }
    verdict["target_met"] = all(verdict.values())
    return results, verdict


def cifar_run(device: str | torch.device = "auto", epochs: int = 10, *, root: Path | str = DATA / "cifar10",
              seed: int = 1, extra: Sequence[str] = (), rows: Sequence[str] = ("gedi", "gedi_nogen", "random_init"),
              out: Path | None = RESULTS) -> dict[str, Any]:
    """GEDI vs no-gen vs k-means on random-init features, on CIFAR-10 with the gedi-cifar.yaml settings.

    ``device``: "auto", "cpu", "cuda" or a torch.device; ``epochs``: SSL epochs of both trained
    rows; ``extra``: ``--set`` style overrides for every row (e.g. a larger batch on a GPU);
    ``rows``: any of gedi, gedi_nogen, random_init. Returns the result payload and, with
    ``out``, writes ``gedi_cifar-<device>.json`` there.
    """
    dev = device if isinstance(device, torch.device) else pick_device(device)
    dev_name = dev.type
    base = cifar_config(epochs, root, dev_name, seed, extra)
    data = load_data(base.data, seed=seed)
    results, verdict = compare_on(data, dev, epochs, root=root, seed=seed, extra=extra, rows=rows)
    payload = {**result_header("gedi_cifar", dev), "dataset": str(root), "train_images": len(data.train.x),
               "test_images": len(data.probe_test.x), "epochs": epochs, "seed": seed,
               "config": base.training_dict(), "extra_overrides": list(extra), "rows": results, "verdict": verdict}
    if out is not None:
        write_result(out / f"gedi_cifar-{dev_name}.json", payload)
    return payload


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="bench", required=True)
    toy = sub.add_parser("toy", help="moons and circles, GEDI vs no-gen, several seeds")
    toy.add_argument("--datasets", nargs="+", default=list(TOY_DATASETS), choices=list(TOY_DATASETS))
    toy.add_argument("--seeds", nargs="+", type=int, default=list(TOY_SEEDS))
    cifar = sub.add_parser("cifar", help="CIFAR-10 conv4: GEDI vs no-gen vs random-init k-means")
    cifar.add_argument("--root", type=Path, default=DATA / "cifar10", help="CIFAR-10 Parquet folder")
    cifar.add_argument("--epochs", type=int, default=10)
    cifar.add_argument("--seed", type=int, default=1)
    cifar.add_argument("--rows", nargs="+", default=["gedi", "gedi_nogen", "random_init"],
                       choices=["gedi", "gedi_nogen", "random_init"])
    for sp in (toy, cifar):
        sp.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
        sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every row")
        sp.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.bench == "toy":
        toy_benchmark(args.datasets, args.seeds, pick_device(args.device), args.out, args.set)
    else:
        cifar_run(args.device, args.epochs, root=args.root.resolve(), seed=args.seed, extra=args.set,
                  rows=args.rows, out=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
