"""What the online linear probe costs, and which features it should train on (issue 10).

``cost`` (default): the training step of conv4 K=4 N=64 and, right after each step, the probe's
extra work, every call timed in the same process (thread CPU time on a CPU, so the other jobs
on a shared machine do not count; synchronised wall time on a GPU); the overhead is the median
over steps of extra / step. Variants timed:

* ``clean_shipped`` -- what rrscale does: an eval-mode forward of the un-augmented first
  quarter of the batch (``probe_batch``) plus one Adam step of the linear classifier;
* ``clean_half``, ``clean_full`` -- the same on half / all of the batch;
* ``view`` -- the alternative: only the classifier step on features the SSL forward already
  made (one augmented view), i.e. no extra backbone pass.

``variants``: does the choice matter for the signal? Trains the first ``--configs`` of
``signal_fidelity.CONFIGS`` at quickstart scale on cifar10-mini through the engine, with a set
of probes trained side by side on the same steps (clean vs one view, several learning rates;
the view features are caught by a forward hook on the backbone during the SSL forward), and
reports each one's top-1 per epoch, its gap to the final linear probe and its Spearman rank
correlation with it. Instrumentation: the loop's probe factory is replaced for these runs.

    python benchmarks/online_probe.py                       # cost, CPU (or the GPU if present)
    nice -n 10 python benchmarks/online_probe.py variants   # ~4 min on one CPU core
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

from common import result_header, timing_method, write_result
from rrscale.config import load_config
from rrscale.data.sources import load_data
from rrscale.data.views import build_views
from rrscale.engine import loop
from rrscale.engine.online_probe import PROBE_LR, OnlineProbe, probe_batch
from signal_fidelity import QUICKSTART, config_dict, overrides

CIFAR_MEAN, CIFAR_STD = (0.491, 0.482, 0.447), (0.247, 0.243, 0.262)
VARIANT_LRS = (1e-3, 3e-3, 1e-2, 3e-2)


def cost(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    cfg = load_config(None, ["backbone.name=conv4", "method.K=4", f"train.batch_size={args.batch}"])
    method = timing_method(cfg, device)
    optimizer = torch.optim.Adam(method.parameters(), lr=1e-3)
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randint(0, 256, (args.batch, 32, 32, 3), dtype=torch.uint8, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    views = build_views(cfg.views, x[:1], CIFAR_MEAN, CIFAR_STD, dtype=torch.float32,
                        channels_last=device.type == "cuda")
    probe = OnlineProbe(64, 10, mean=CIFAR_MEAN, std=CIFAR_STD, symmetric=False, device=device, seed=0)
    amp = device.type == "cuda"
    shipped, half = probe_batch(args.batch), args.batch // 2
    given = torch.randn(args.batch, 64, device=device)

    def ssl_step() -> None:
        with torch.no_grad():
            batch_views = views(x, 4, gen)
        loop.train_step(method, optimizer, batch_views, args.batch, amp=amp)

    def view_step() -> None:  # the classifier step alone, on features the SSL pass already made
        loss = F.cross_entropy(probe.classifier(given[:shipped]), y[:shipped])
        probe.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        probe.optimizer.step()

    candidates = {
        "clean_shipped": lambda: probe.step(method.backbone, x[:shipped], y[:shipped]),
        "clean_half": lambda: probe.step(method.backbone, x[:half], y[:half]),
        "clean_full": lambda: probe.step(method.backbone, x, y),
        "view": view_step,
    }
    def clock() -> float:
        """CPU time of this thread on a CPU (other processes' load is not counted: the machine is
        shared), wall time after a synchronize on a GPU."""
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            return time.perf_counter()
        return time.thread_time()

    for _ in range(args.warmup):
        ssl_step()
        for extra in candidates.values():
            extra()
    base: list[float] = []
    ratios: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(args.repeats * args.steps):  # every step timed, the extras right after it
        t0 = clock()
        ssl_step()
        step = clock() - t0
        base.append(step)
        for name, extra in candidates.items():
            t0 = clock()
            extra()
            ratios[name].append((clock() - t0) / step)
    return {
        "setting": f"conv4 K=4 N={args.batch}, {'bf16 autocast' if amp else 'fp32'}, Adam",
        "clock": "CUDA-synchronised wall time" if device.type == "cuda" else "thread CPU time",
        "steps_timed": len(base), "warmup": args.warmup,
        "step_seconds_median": statistics.median(base),
        "overhead_median": {name: statistics.median(r) for name, r in ratios.items()},
        "overhead_quartiles": {name: [float(q) for q in np.percentile(r, [25, 75])] for name, r in ratios.items()},
        "probe_batch_shipped": shipped,
        "target": "clean_shipped <= 0.05 of the step",
    }


class _SideBySide:
    """Stands in for the loop's online probe: trains several probes on the same steps."""

    def __init__(self, cfg: Any, data: Any, method: Any, device: torch.device, log: list[dict[str, float]]) -> None:
        train = data.train

        def make(lr: float) -> OnlineProbe:
            return OnlineProbe(int(method.backbone.feature_dim), train.num_classes, mean=train.mean,
                               std=train.std, symmetric=False, device=device, seed=cfg.train.seed, lr=lr)

        self.clean = {lr: make(lr) for lr in VARIANT_LRS}
        self.view = {lr: make(lr) for lr in VARIANT_LRS}
        self.log = log
        self.view_feats = torch.empty(0)

        def catch(module: Any, inputs: Any, output: torch.Tensor) -> None:
            if module.training:  # the SSL forward (evaluation passes run in eval mode)
                self.view_feats = output.detach().float()

        method.backbone.register_forward_hook(catch)

    def step(self, backbone: Any, x: torch.Tensor, y: torch.Tensor) -> None:
        for probe in self.clean.values():
            probe.step(backbone, x, y)
        feats = self.view_feats[: len(y)]  # rows [0:n] are view 1 of the batch, in batch order
        for probe in self.view.values():
            loss = F.cross_entropy(probe.classifier(feats), y)
            probe.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            probe.optimizer.step()

    def top1(self, features: torch.Tensor, labels: torch.Tensor) -> float:
        record = {f"clean@{lr:g}": p.top1(features, labels) for lr, p in self.clean.items()}
        record.update({f"view@{lr:g}": p.top1(features, labels) for lr, p in self.view.items()})
        self.log.append(record)
        return record[f"clean@{PROBE_LR:g}"]

    def state_dict(self) -> dict[str, Any]:
        return {}


def variants(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    runs = []
    data = None
    for index in range(args.configs):
        cfg = load_config(QUICKSTART, overrides("cifar10-mini", 1, config_dict("axes", index)))
        data = data or load_data(cfg.data, seed=cfg.train.seed)
        log: list[dict[str, float]] = []
        factory = lambda c, d, m, dev: _SideBySide(c, d, m, dev, log)  # noqa: E731
        with mock.patch.object(loop, "_online_probe", factory):
            result = loop.fit(cfg, data, hooks=loop.LocalHooks(None), device=device)
        final = loop.final_evaluation(cfg, result.method, data, device, None)["probe_top1"]
        runs.append({"config": config_dict("axes", index), "probe_top1": final, "epochs": log})
        print(f"config {index}: probe {final:.3f}", file=sys.stderr, flush=True)
    names = list(runs[0]["epochs"][0])
    finals = [r["probe_top1"] for r in runs]
    epochs = len(runs[0]["epochs"])
    summary = {}
    for name in names:
        per_epoch = [[r["epochs"][e][name] for r in runs] for e in range(epochs)]
        summary[name] = {
            "mean_top1": [float(np.mean(v)) for v in per_epoch],
            "mean_gap_to_final_probe": [float(np.mean(np.asarray(finals) - np.asarray(v))) for v in per_epoch],
            "spearman_with_final_probe": [float(spearmanr(v, finals)[0]) for v in per_epoch],
        }
    return {"scale": "quickstart.yaml on cifar10-mini (2,000 images, 4 epochs), seed 1",
            "configs": args.configs, "summary": summary, "runs": runs}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", nargs="?", default="cost", choices=("cost", "variants"))
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=10, help="cost: repeats x steps steps are timed")
    p.add_argument("--configs", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = loop.pick_device("auto")
    body = cost(args, device) if args.what == "cost" else variants(args, device)
    payload = {**result_header(f"online_probe_{args.what}", device), "threads": args.threads,
               "machine": "shared (2 CPU cores, other engineers' jobs running)" if device.type == "cpu" else "",
               **body}
    print(json.dumps({k: v for k, v in payload.items() if k != "runs"}, indent=1))
    write_result(args.out / f"online_probe_{args.what}-{'cuda' if device.type == 'cuda' else 'cpu'}.json", payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
