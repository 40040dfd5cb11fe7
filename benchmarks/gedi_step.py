"""Cost of GEDI's generative term: seconds per training step, GEDI vs GEDI no-gen vs RR.

GEDI (Sansone & Manhaeve, arXiv:2401.00873; docs/methods.md §2) adds persistent SGLD to every
step: ``sgld.steps`` (20) forward+backward passes over the sample batch, plus one forward over
noisy data and samples for the contrastive-divergence term. This measures what that costs
against the discriminative-only ablation (``lambda_gen = 0``) and against RR, all with the
same backbone, batch and already-made views on the device (augmentation excluded: it is the
same for every method), through the engine's own ``train_step`` (bf16 autocast on CUDA).

Rows: ``gedi`` (lambda_gen = 1, paper defaults otherwise: c = 2048, H = 2048, 20 SGLD steps),
``gedi_nogen`` (lambda_gen = 0), ``rr_k2`` (RR with the same 2 views per image) and ``rr_k32``
(RR at the paper's K = 32). The headline is ``full_over_nogen`` = t(gedi) / t(gedi_nogen);
the budget set for it is 25x.

    python benchmarks/gedi_step.py                         # CPU (and CUDA too when present)
    python benchmarks/gedi_step.py --devices cuda --steps 50
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from common import result_header, timed, timing_method
from rrscale.config import load_config
from rrscale.engine.loop import train_step

BUDGET = 25.0
ROWS: dict[str, list[str]] = {
    "gedi": ["method.name=gedi", "method.lambda_gen=1.0"],
    "gedi_nogen": ["method.name=gedi", "method.lambda_gen=0.0"],
    "rr_k2": ["method.name=relational", "method.K=2"],
    "rr_k32": ["method.name=relational", "method.K=32"],
}


def measure(name: str, overrides: list[str], args: argparse.Namespace, device: torch.device) -> dict:
    """Seconds per step of one method on random [-1, 1] views of shape (K*n, 3, 32, 32)."""
    cfg = load_config(None, [f"backbone.name={args.backbone}", f"train.batch_size={args.batch}", *overrides])
    cuda = device.type == "cuda"
    method = timing_method(cfg, device)
    optimizer = torch.optim.Adam(method.parameters(), lr=cfg.train.lr)
    k, n = int(method.views_per_image), args.batch
    views = torch.rand(k * n, 3, 32, 32, device=device) * 2 - 1
    if cuda:
        views = views.contiguous(memory_format=torch.channels_last)
        torch.cuda.reset_peak_memory_stats(device)
    seconds = timed(lambda: train_step(method, optimizer, views, n, amp=cuda), args.steps, args.warmup, device)
    return {
        "row": name,
        "overrides": overrides,
        "K": k,
        "N": n,
        "seconds_per_step": seconds,
        "images_per_s": n / seconds,
        "peak_device_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
    }


def run_device(device: torch.device, args: argparse.Namespace) -> dict:
    rows = {}
    for name, overrides in ROWS.items():
        row = measure(name, overrides, args, device)
        print(json.dumps(row), flush=True)
        rows[name] = row
    ratio = rows["gedi"]["seconds_per_step"] / rows["gedi_nogen"]["seconds_per_step"]
    return {
        **result_header("gedi_step", device),
        "backbone": args.backbone,
        "batch": args.batch,
        "amp_bf16": device.type == "cuda",
        "steps": args.steps,
        "warmup": args.warmup,
        "full_over_nogen": ratio,
        "budget_full_over_nogen": BUDGET,
        "within_budget": ratio <= BUDGET,
        "nogen_over_rr_k2": rows["gedi_nogen"]["seconds_per_step"] / rows["rr_k2"]["seconds_per_step"],
        "rows": list(rows.values()),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto = CPU, plus CUDA when available")
    p.add_argument("--backbone", default="conv4")
    p.add_argument("--batch", type=int, default=64, help="images per step (GEDI/RR batch N)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per row")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args(argv)
    devices = {"cpu": ["cpu"], "cuda": ["cuda"], "auto": ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])}
    args.out.mkdir(parents=True, exist_ok=True)
    for name in devices[args.devices]:
        payload = run_device(torch.device(name), args)
        path = args.out / f"gedi_step-{name}.json"
        path.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"{name}: full/no-gen = {payload['full_over_nogen']:.1f}x (budget {BUDGET:.0f}x); wrote {path}",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
