"""What the engine's divergence guard costs per epoch.

The guard (``rrscale.engine.loop.check_diverged``) reads the epoch means that the loop already
copies to the host for its report, so it adds no device synchronisation; what remains is a few
float comparisons. Measured two ways: the guard call alone, and whole epochs of a small run with
the guard against the same run with the guard replaced by a no-op (interleaved, median of
repeats: the machine is shared, so only the ratio is meaningful).

    python benchmarks/divergence_guard.py --repeats 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import timeit
from pathlib import Path

import torch

from common import result_header
from rrscale.config import load_config
from rrscale.data.sources import load_data
from rrscale.engine import loop

SETTINGS = ["data.name=synthetic", "data.synthetic_size=512", "method.K=4", "train.batch_size=64",
            "train.epochs=3", "train.knn_every=0", "train.progress=false", "train.device=cpu"]


def guard_call_seconds() -> float:
    metrics = {"epoch": 1, "loss": 0.0871, "relation_acc": 0.61, "images_per_s": 812.0, "epoch_seconds": 0.6}
    runs = 100_000
    return min(timeit.repeat(lambda: loop.check_diverged(metrics, 100.0, 1), number=runs, repeat=5)) / runs


def epoch_seconds(guard: bool) -> float:
    cfg = load_config(None, SETTINGS)
    data = load_data(cfg.data, seed=cfg.train.seed)
    real = loop.check_diverged
    if not guard:
        loop.check_diverged = lambda *args, **kwargs: None
    try:
        result = loop.fit(cfg, data, hooks=loop.LocalHooks(None), device=torch.device("cpu"))
    finally:
        loop.check_diverged = real
    return statistics.median(h["epoch_seconds"] for h in result.history)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/divergence_guard-cpu.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    with_guard, without = [], []
    for _ in range(args.repeats):
        with_guard.append(epoch_seconds(True))
        without.append(epoch_seconds(False))
    call = guard_call_seconds()
    epoch = statistics.median(with_guard)
    result = {
        **result_header("divergence_guard", torch.device("cpu")),
        "settings": SETTINGS,
        "note": "2-core machine shared with other jobs; epochs interleaved guard/no-guard",
        "guard_call_us": call * 1e6,
        "epoch_seconds_with_guard": epoch,
        "epoch_seconds_without_guard": statistics.median(without),
        "epoch_ratio_with_over_without": epoch / statistics.median(without),
        "guard_share_of_epoch": call / epoch,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
