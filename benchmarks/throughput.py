"""RR training throughput: end to end vs the compute ceiling vs an official-style pipeline.

Measured in one process, one run, side by side:

* ``e2e``: rrscale's path — the uint8 dataset on the device, a device permutation, K views of
  each batch made in one batched pass (``ImageViews``), then ``engine.loop.train_step``.
* ``ceiling``: the same backbone + relation head + loss and the same ``train_step`` on views
  that already sit on the device (no augmentation at all).
* ``official`` (``--baseline``): the shape of the official code's pipeline — torchvision PIL
  transforms applied K times per image inside 2 DataLoader workers, then a Python loop over
  view pairs that concatenates and rolls features pair by pair — with the same backbone,
  head, loss and optimiser.

images/s counts source images (not views) per second. Peak device memory and peak host RSS
are recorded per row; the process holds the CIFAR-10 training set while measuring.

    python benchmarks/throughput.py --rows cpu --baseline      # the 2-core CPU row
    python benchmarks/throughput.py --rows gpu                 # the three H100 rows
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import transforms

from common import result_header, timed, timing_method, write_result
from rrscale.config import ExperimentConfig, load_config
from rrscale.data.sources import load_data
from rrscale.data.views import ImageViews
from rrscale.engine.loop import train_step
from rrscale.methods import build_method
from rrscale.methods.relational import aggregate, focal_loss

ROWS = {
    "gpu": [("conv4", 32, 64), ("resnet32", 32, 64), ("conv4", 4, 128)],
    "cpu": [("conv4", 4, 32)],
}
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10"


def _config(backbone: str, k: int, n: int, root: str) -> ExperimentConfig:
    data = [f"data.root={root}"] if root else ["data.name=synthetic", "data.synthetic_size=50000"]
    return load_config(None, [*data, f"backbone.name={backbone}", f"method.K={k}", f"train.batch_size={n}"])


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class _OfficialStyleViews(torch.utils.data.Dataset):
    """K independent PIL-transformed views per image, the way the official loader builds them."""

    def __init__(self, images: np.ndarray, k: int, mean, std) -> None:
        self.images, self.k = images, k
        self.transform = transforms.Compose([
            transforms.RandomResizedCrop(32, scale=(0.08, 1.0)),
            transforms.RandomHorizontalFlip(),
            transforms.RandomApply([transforms.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8),
            transforms.RandomGrayscale(p=0.2),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        img = Image.fromarray(self.images[i])
        return [self.transform(img) for _ in range(self.k)]


def _official_style_step(method, optimizer, batch: list[torch.Tensor], device: torch.device) -> None:
    """Per-pair Python loop over view pairs (cat + roll per pair), then the same head and loss."""
    n = batch[0].shape[0]
    feats = method.backbone(torch.cat(batch).to(device)).split(n)
    rows, targets, shift = [], [], 1
    for a in range(len(feats)):
        for b in range(a + 1, len(feats)):
            rows.append(aggregate(feats[a], feats[b], "cat"))
            rows.append(aggregate(feats[a], torch.roll(feats[b], shifts=shift, dims=0), "cat"))
            targets += [torch.ones(n, device=device), torch.zeros(n, device=device)]
            shift = shift + 1 if shift + 1 < n else 1
    logits = method.head(torch.cat(rows)).squeeze(1)
    loss = focal_loss(logits, torch.cat(targets))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def measure_row(backbone: str, k: int, n: int, args, data, device: torch.device) -> dict:
    cfg = _config(backbone, k, n, args.root)
    cuda = device.type == "cuda"
    method = timing_method(cfg, device)
    model = torch.compile(method) if args.compile else method
    optimizer = torch.optim.Adam(method.parameters(), lr=1e-3)
    x_dev = data.train.x.to(device)
    views = ImageViews(cfg.views, data.train.mean, data.train.std, channels_last=cuda)
    gen = torch.Generator(device=device).manual_seed(0)
    order = torch.randperm(len(x_dev), device=device)
    cursor = [0]

    def e2e() -> None:
        start = cursor[0] % (len(order) - n)
        cursor[0] += n
        with torch.no_grad():
            v = views(x_dev[order[start : start + n]], k, gen)
        train_step(model, optimizer, v, n, amp=cuda)

    fixed = views(x_dev[:n], k, gen)

    def ceiling() -> None:
        train_step(model, optimizer, fixed, n, amp=cuda)

    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    t_ceiling = timed(ceiling, args.steps, args.warmup, device)
    t_e2e = timed(e2e, args.steps, args.warmup, device)
    row = {
        "backbone": backbone, "K": k, "N": n,
        "e2e_images_per_s": n / t_e2e,
        "ceiling_images_per_s": n / t_ceiling,
        "e2e_over_ceiling": t_ceiling / t_e2e,
        "peak_device_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
    }
    with torch.no_grad():
        row["views_ms_per_step"] = 1000 * timed(lambda: views(x_dev[:n], k, gen), args.steps, 2, device)
    if args.baseline:
        ds = _OfficialStyleViews(data.train.x.numpy(), k, data.train.mean, data.train.std)
        loader = torch.utils.data.DataLoader(ds, batch_size=n, shuffle=True, num_workers=2, drop_last=True,
                                             persistent_workers=True)
        it = iter(loader)
        off_method = build_method(cfg, 3, None).to(device)
        off_opt = torch.optim.Adam(off_method.parameters(), lr=1e-3)
        t_off = timed(lambda: _official_style_step(off_method, off_opt, next(it), device),
                       args.baseline_steps, 3, device)
        row["official_style_images_per_s"] = n / t_off
        row["e2e_over_official_style"] = t_off / t_e2e
        del it, loader
    row["peak_host_rss_gb"] = _rss_gb()
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", choices=["cpu", "gpu", "all"], default="cpu")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--baseline", action="store_true", help="also time the official-style pipeline")
    p.add_argument("--baseline-steps", type=int, default=30)
    p.add_argument("--compile", action="store_true", help="torch.compile the method")
    p.add_argument("--root", default=str(SHARED) if SHARED.exists() else "", help="CIFAR-10 Parquet folder")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args(argv)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    rows = ROWS["cpu"] + ROWS["gpu"] if args.rows == "all" else ROWS[args.rows]
    data = load_data(_config("conv4", 4, 32, args.root).data)
    results = []
    for backbone, k, n in rows:
        row = measure_row(backbone, k, n, args, data, device)
        print(json.dumps(row), flush=True)
        results.append(row)
    payload = {
        **result_header("throughput", device),
        "dataset": args.root or "synthetic (50,000 images)",
        "train_images_resident": len(data.train.x),
        "compile": args.compile,
        "steps": args.steps,
        "rows": results,
    }
    tag = "cuda" if device.type == "cuda" else "cpu"
    write_result(args.out / f"throughput-{tag}-{args.rows}.json", payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
