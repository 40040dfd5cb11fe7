"""Which per-epoch signal ranks trials the way the final linear probe does? (issue 10)

ASHA stops trials on a per-epoch signal (``tune.schedule_metric``) while the sweep is judged
by the end-of-run linear probe (``tune.metric: probe_top1``). This benchmark trains a fixed set
of 16 RR configurations that differ in K, aggregation, head width and lr, each to the end, at
the quickstart's scale (``search_spaces/quickstart.yaml``: conv4, 2,000 training images,
4 epochs, batch 64, probe 20 epochs), on cifar10-mini and on the synthetic set, for two seeds.
Every epoch it records kNN top-1, the online probe's top-1, the SSL loss and the relation
accuracy; at the end the linear probe of the quickstart (20 epochs, what the sweep ranks by)
and of the paper's protocol (100 epochs, same features). Then, per dataset and seed:

* Spearman rank correlation of each signal at each epoch with the final probe score
  (loss negated: lower is better);
* how many of the final top-3 survive a 1/2-halving at each epoch (one cut, 8 of 16 kept) and
  through ASHA rungs at epochs 1 and 2 (grace 1: synchronous successive halving 16 -> 8 -> 4;
  a random cut keeps 1.5 and 0.75 of them on average);
* the noise floor: the same configuration's final probe under the two seeds (Spearman between
  seeds, mean and largest absolute difference), against the spread between configurations.

Runs are cached one JSON line each under ``--runs`` so an interrupted benchmark continues where
it stopped. Writes ``results/signal_fidelity-<device>.json`` and a plot of rank correlation vs
epoch per signal (``.png`` next to it).

    nice -n 10 python benchmarks/signal_fidelity.py                  # everything (~40 min, 1 core)
    nice -n 10 python benchmarks/signal_fidelity.py --family augment --datasets cifar10-mini
    python benchmarks/signal_fidelity.py --datasets synthetic --seeds 1 --configs 4   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import spearmanr

from common import result_header
from rrscale.config import load_config
from rrscale.data.sources import DataBundle, load_data
from rrscale.engine.evaluate import extract_features, linear_probe
from rrscale.engine.loop import LocalHooks, fit, final_evaluation, pick_device

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "search_spaces" / "quickstart.yaml"
MINI = REPO.parent / "shared" / "data" / "cifar10-mini"
DATASETS: dict[str, list[str]] = {
    "cifar10-mini": ["data.name=cifar10", f"data.root={MINI}"],  # quickstart's fraction 0.4: 2,000 images
    "synthetic": ["data.name=synthetic", "data.synthetic_size=2000", "data.fraction=1.0"],
}
#: (K, aggregation, head width, lr): every level of each axis appears with several of the others.
CONFIGS: list[tuple[int, str, int, float]] = [
    (2, "cat", 128, 1e-3), (2, "sum", 32, 3e-3), (2, "max", 512, 3e-4), (2, "mean", 128, 5e-4),
    (2, "cat", 512, 2e-3), (4, "cat", 128, 1e-3), (4, "sum", 512, 5e-4), (4, "max", 32, 2e-3),
    (4, "mean", 128, 3e-3), (4, "cat", 32, 3e-4), (4, "sum", 128, 1e-3), (8, "cat", 128, 5e-4),
    (8, "sum", 32, 1e-3), (8, "max", 128, 3e-3), (8, "mean", 512, 1e-3), (8, "cat", 512, 2e-3),
]
#: A second family (``--family augment``): RR fixed at the quickstart's K=4, cat, 128, lr 1e-3, only
#: the augmentation strength varies (crop min scale x colour-jitter strength). A weaker
#: augmentation makes the relation task easier, so pretext signals (loss, relation accuracy) may
#: rank these configurations differently from the probe.
AUGMENT: list[tuple[float, float]] = [(c, j) for c in (0.08, 0.2, 0.35, 0.6) for j in (0.4, 1.0)]
#: Per-epoch signals and their direction (+1: higher is better).
SIGNALS = {"knn_top1": 1, "online_probe_top1": 1, "relation_acc": 1, "loss": -1}
TARGETS = ("probe_top1", "probe100_top1")
TOP = 3
#: ASHA with grace 1, reduction 2 and 4 epochs has rungs at epochs 1 and 2 (the quickstart before
#: this measurement); with grace 2 its one rung is epoch 2, i.e. the single cut at epoch 2.
ASHA_RUNGS = (1, 2)


def config_dict(family: str, index: int) -> dict[str, Any]:
    """The dotted keys one configuration of ``family`` sets."""
    if family == "augment":
        crop, jitter = AUGMENT[index]
        return {"views.crop_min_scale": crop, "views.jitter": jitter}
    k, agg, width, lr = CONFIGS[index]
    return {"method.K": k, "method.aggregation": agg, "method.head_width": width, "train.lr": lr}


FAMILIES = {"axes": len(CONFIGS), "augment": len(AUGMENT)}


def overrides(dataset: str, seed: int, config: dict[str, Any], extra: list[str] | None = None) -> list[str]:
    return [*DATASETS[dataset], f"train.seed={seed}", *(f"{k}={v}" for k, v in config.items()),
            "train.progress=false", *(extra or [])]


def run_one(family: str, dataset: str, seed: int, index: int, data: DataBundle,
            device: torch.device, extra: list[str]) -> dict[str, Any]:
    """Train one configuration to the end through the engine; per-epoch signals + final probes."""
    config = config_dict(family, index)
    cfg = load_config(QUICKSTART, overrides(dataset, seed, config, extra))
    result = fit(cfg, data, hooks=LocalHooks(None), device=device)
    final = final_evaluation(cfg, result.method, data, device, None)
    norm = data.train
    tr = extract_features(result.method.backbone, data.probe_train.x, norm.mean, norm.std, device=device)
    te = extract_features(result.method.backbone, data.probe_test.x, norm.mean, norm.std, device=device)
    probe100 = linear_probe(tr, data.probe_train.y, te, data.probe_test.y, data.probe_train.num_classes,
                            epochs=100, batch_size=cfg.probe.batch_size, lr=cfg.probe.lr, seed=cfg.train.seed)
    return {
        "family": family, "dataset": dataset, "seed": seed, "index": index, "config": config, "set": extra,
        "history": [{key: h[key] for key in ("epoch", *SIGNALS) if key in h} for h in result.history],
        "probe_top1": final["probe_top1"], "probe100_top1": probe100, "knn_top1_full": final["knn_top1"],
        "train_seconds": result.train_seconds, "images_per_s": result.images_per_s,
    }


def _spearman(a: list[float], b: list[float]) -> float:
    rho = spearmanr(a, b)[0]
    return float(rho) if math.isfinite(rho) else 0.0


def _top(values: list[float], n: int) -> set[int]:
    return set(int(i) for i in np.argsort(-np.asarray(values), kind="stable")[:n])


def _halving(scores_by_rung: list[list[float]]) -> list[int]:
    """Indices alive after each synchronous 1/2 cut, one cut per rung's scores."""
    alive = list(range(len(scores_by_rung[0])))
    out = []
    for scores in scores_by_rung:
        keep = max(1, len(alive) // 2)
        alive = sorted(alive, key=lambda i: -scores[i])[:keep]
        out.append(list(alive))
    return out


def analyse(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per dataset: rank correlations per signal/epoch/seed, top-3 kept by halving, noise floor."""
    out: dict[str, Any] = {}
    for dataset in sorted({r["dataset"] for r in runs}):
        by_seed: dict[int, list[dict[str, Any]]] = {}
        for r in sorted((r for r in runs if r["dataset"] == dataset), key=lambda r: r["index"]):
            by_seed.setdefault(r["seed"], []).append(r)
        seeds = sorted(by_seed)
        epochs = min(len(r["history"]) for rs in by_seed.values() for r in rs)
        entry: dict[str, Any] = {"seeds": seeds, "configs": len(by_seed[seeds[0]]), "epochs": epochs,
                                 "spearman": {}, "top3_kept_single_cut": {}, "top3_kept_asha": {}}
        for seed in seeds:
            rs = by_seed[seed]
            final = {t: [r[t] for r in rs] for t in TARGETS}
            top = _top(final["probe_top1"], TOP)
            entry.setdefault("final_probe", {})[str(seed)] = {
                "mean": float(np.mean(final["probe_top1"])), "std": float(np.std(final["probe_top1"])),
                "min": float(np.min(final["probe_top1"])), "max": float(np.max(final["probe_top1"])),
                "top3_indices": sorted(top),
                "spearman_probe20_vs_probe100": _spearman(final["probe_top1"], final["probe100_top1"]),
            }
            for signal, sign in SIGNALS.items():
                series = [[sign * r["history"][e].get(signal, math.nan) for r in rs] for e in range(epochs)]
                if any(math.isnan(v) for s in series for v in s):
                    continue
                for target in TARGETS:
                    rho = [_spearman(s, final[target]) for s in series]
                    entry["spearman"].setdefault(signal, {}).setdefault(target, {})[str(seed)] = rho
                half = len(rs) // 2
                entry["top3_kept_single_cut"].setdefault(signal, {})[str(seed)] = [
                    len(top & _top(s, half)) for s in series]
                rungs = [series[e - 1] for e in ASHA_RUNGS if e <= epochs]
                entry["top3_kept_asha"].setdefault(signal, {})[str(seed)] = [
                    len(top & set(alive)) for alive in _halving(rungs)]
        if len(seeds) >= 2:
            a, b = ([r["probe_top1"] for r in by_seed[s]] for s in seeds[:2])
            diff = np.abs(np.asarray(a) - np.asarray(b))
            centred = np.abs((np.asarray(a) - np.mean(a)) - (np.asarray(b) - np.mean(b)))
            entry["noise_floor"] = {
                "spearman_between_seeds": _spearman(a, b),
                "mean_abs_diff_between_seeds": float(diff.mean()), "max_abs_diff_between_seeds": float(diff.max()),
                # the seed also picks the 2,000-image subset: without the per-seed mean shift
                "mean_abs_diff_between_seeds_centred": float(centred.mean()),
                "std_between_configs": float(np.mean([np.std(a), np.std(b)])),
                "top3_shared_between_seeds": len(_top(a, TOP) & _top(b, TOP)),
            }
        entry["mean_over_seeds"] = {
            signal: {"spearman_probe_top1": np.mean(list(per["probe_top1"].values()), axis=0).round(3).tolist(),
                     "spearman_probe100_top1": np.mean(list(per["probe100_top1"].values()), axis=0).round(3).tolist(),
                     "top3_kept_asha": np.mean(list(entry["top3_kept_asha"][signal].values()), axis=0).tolist(),
                     "top3_kept_single_cut": np.mean(list(entry["top3_kept_single_cut"][signal].values()),
                                                     axis=0).tolist()}
            for signal, per in entry["spearman"].items()}
        entry["random_cut_expected_top3_kept"] = {"single_cut": TOP / 2, "asha": [TOP / 2**(i + 1)
                                                                                  for i in range(len(ASHA_RUNGS))]}
        out[dataset] = entry
    return out


def plot(analysis: dict[str, Any], path: Path, family: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(analysis), figsize=(6.2 * len(analysis), 4.4), squeeze=False)
    colours = {"knn_top1": "#1f77b4", "online_probe_top1": "#d62728", "relation_acc": "#2ca02c", "loss": "#7f7f7f"}
    for ax, (dataset, entry) in zip(axes[0], analysis.items()):
        epochs = np.arange(1, entry["epochs"] + 1)
        for signal, per_target in entry["spearman"].items():
            per_seed = np.array(list(per_target["probe_top1"].values()))
            label = signal if signal != "loss" else "-loss"
            ax.plot(epochs, per_seed.mean(axis=0), "-o", color=colours[signal], label=label)
            for row in per_seed:
                ax.plot(epochs, row, ".", color=colours[signal], alpha=0.45)
        floor = entry.get("noise_floor", {}).get("spearman_between_seeds")
        if floor is not None:
            ax.axhline(floor, ls="--", color="black", lw=1, label="final probe, seed vs seed")
        ax.axhline(0, color="black", lw=0.5)
        ax.set_ylim(-1, 1)
        ax.set_xticks(epochs)
        ax.set_xlabel("epoch")
        ax.set_ylabel("Spearman with final probe_top1")
        what = "augmentation strengths" if family == "augment" else "configs"
        ax.set_title(f"{dataset}: {entry['configs']} {what}, seeds {entry['seeds']} (dots: per seed)", fontsize=10)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2])
    p.add_argument("--family", default="axes", choices=list(FAMILIES),
                   help="axes: 16 configs over K/aggregation/head width/lr; augment: 8 augmentation strengths")
    p.add_argument("--configs", type=int, default=0, help="use the first N configs of the family (0: all)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="change the scale for every run, e.g. train.epochs=20 (ASHA_RUNGS assume 4 epochs)")
    p.add_argument("--runs", type=Path, default=Path("runs/signal_fidelity/runs.jsonl"))
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--analyse-only", action="store_true", help="no training: analyse the cached runs")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = pick_device("auto")
    args.runs.parent.mkdir(parents=True, exist_ok=True)
    count = args.configs or FAMILIES[args.family]
    cached = [json.loads(line) for line in args.runs.read_text().splitlines()] if args.runs.exists() else []
    mine = [r for r in cached if r.get("family", "axes") == args.family and r.get("set", []) == args.overrides]
    done = {(r["dataset"], r["seed"], r["index"]) for r in mine}
    for dataset in args.datasets if not args.analyse_only else []:
        for seed in args.seeds:
            todo = [i for i in range(count) if (dataset, seed, i) not in done]
            if not todo:
                continue
            first = load_config(QUICKSTART, overrides(dataset, seed, config_dict(args.family, 0), args.overrides))
            data = load_data(first.data, seed=seed)
            for i in todo:
                record = run_one(args.family, dataset, seed, i, data, device, args.overrides)
                mine.append(record)
                with open(args.runs, "a") as fh:
                    fh.write(json.dumps(record) + "\n")
                print(f"{dataset} seed {seed} config {i} {record['config']}: probe {record['probe_top1']:.3f}, "
                      f"{record['train_seconds']:.0f} s", file=sys.stderr, flush=True)
    runs = [r for r in mine if r["dataset"] in args.datasets and r["seed"] in args.seeds and r["index"] < count]
    analysis = analyse(runs)
    tag = "cuda" if device.type == "cuda" else "cpu"
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"signal_fidelity{'' if args.family == 'axes' else '-' + args.family}-{tag}.json"
    payload = {
        **result_header("signal_fidelity", device),
        "machine": "2 CPU cores shared with other engineers' jobs; run with nice -n 10, times are not clean",
        "threads": args.threads,
        "scale": "search_spaces/quickstart.yaml: conv4, 2,000 train images, 4 epochs, batch 64, "
                 "kNN k=50 on 2,000 bank / 1,000 query images, probe 20 epochs (and 100)",
        "family": args.family,
        "overrides": args.overrides,
        "configs": [config_dict(args.family, i) for i in range(count)],
        "train_seconds_all_runs": sum(r["train_seconds"] for r in runs),
        "analysis": analysis,
        "runs": runs,
    }
    path.write_text(json.dumps(payload, indent=2) + "\n")
    plot(analysis, path.with_suffix(".png"), args.family)
    print(json.dumps(analysis, indent=1))
    print(f"wrote {path} and {path.with_suffix('.png')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
