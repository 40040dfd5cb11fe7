"""The online linear probe: a label-trained linear classifier that follows the backbone as it trains.

solo-learn's idea (an online classifier on detached features gives a probe-like score every
epoch), written for this loop. Choices and why:

* Features of the **un-augmented** training images, extracted like the final linear probe
  extracts them (eval mode, BatchNorm running statistics, no augmentation, no gradient): the
  online probe then trains on the same kind of features it is scored on and that the final
  probe and the kNN see. Features of one augmented view from the SSL forward pass would cost
  almost nothing (0.4 % of a step instead of 4.2 %), but they come from train-mode BatchNorm
  on crops down to 8 % of the image, would need every method to hand them out (GEDI calls its
  backbone many times per step), and trained the probe measurably worse: on 8 quickstart-scale
  runs the clean-feature probe ended 2.7 points under the final linear probe, the one-view
  probe 6.6 points (``benchmarks/online_probe.py variants``, Adam 1e-2, epoch 4).
* The first quarter of each training batch (``PROBE_BATCH_FRACTION``): the probe's step is one
  eval-mode forward of those images plus a tiny classifier step; on a conv4 K=4 N=64 CPU step
  (``benchmarks/online_probe.py``, thread CPU time, medians of 300 steps) a quarter costs 4.2 %,
  half 4.5 %, the whole batch 7.2 % (target <= 5 %; part of it is a fixed per-call cost).
* Its own Adam optimiser at ``PROBE_LR`` and its own parameters, outside the method, so the
  SSL optimiser, DDP's gradient buckets and the backbone's gradients never see it; the
  features come from a ``no_grad`` pass, so nothing can flow back. Its initialisation uses a
  forked RNG: the global random stream (GEDI's SGLD draws from it) is the same with and
  without the probe.
* Under DDP each rank trains its copy on its own shard and the copies' gradients are averaged
  (one all-reduce of ``d*classes + classes`` numbers per step), so every rank holds the same
  probe, as if it had seen the whole batch; rank 0 scores and checkpoints it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rrscale.engine import dist
from rrscale.engine.evaluate import extract_features

PROBE_LR = 1e-2
"""Adam learning rate of the online probe: 10x the offline protocol's 1e-3, because the online
probe sees a quarter of the data once per epoch instead of all of it 100 times; of 1e-3, 3e-3,
1e-2 and 3e-2 it ended closest to the final probe (benchmarks/online_probe.py variants)."""
PROBE_BATCH_FRACTION = 0.25
"""Share of each training batch the probe trains on (its cost is one eval-mode forward of it)."""


class OnlineProbe:
    """Linear(d, classes) trained on detached eval-mode features of un-augmented training images.

    ``step`` takes one Adam step on a batch of uint8 images (NHWC) or vectors and their labels;
    ``top1`` scores ready-made features of the held-out slice. ``state_dict`` holds the
    classifier and its optimiser, so a resumed run continues the same probe.
    """

    def __init__(
        self,
        feature_dim: int,
        num_classes: int,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        symmetric: bool,
        device: torch.device,
        seed: int,
        lr: float = PROBE_LR,
    ) -> None:
        if feature_dim < 1 or num_classes < 2:
            raise ValueError(f"online probe needs feature_dim >= 1 and >= 2 classes, "
                             f"got {feature_dim} and {num_classes}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.classifier = nn.Linear(feature_dim, num_classes).to(device)
        self.optimizer = torch.optim.Adam(self.classifier.parameters(), lr=lr)
        self.mean, self.std, self.symmetric, self.device = tuple(mean), tuple(std), symmetric, device

    def step(self, backbone: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One optimiser step on ``(x, y)``; returns the detached cross-entropy."""
        feats = extract_features(backbone, x, self.mean, self.std, symmetric=self.symmetric,
                                 device=self.device)
        loss = F.cross_entropy(self.classifier(feats), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if dist.is_distributed():
            params = [p for p in self.classifier.parameters() if p.grad is not None]
            flat = dist.sum_across(torch.cat([p.grad.reshape(-1) for p in params])) / dist.world_size()
            for p, g in zip(params, flat.split([p.numel() for p in params])):
                p.grad.copy_(g.view_as(p))
        self.optimizer.step()
        return loss.detach()

    @torch.no_grad()
    def top1(self, features: torch.Tensor, labels: torch.Tensor) -> float:
        """Top-1 accuracy (a fraction) of the probe on ``features``; 0.0 for an empty slice."""
        if len(features) == 0:
            return 0.0
        pred = self.classifier(features.float().to(self.device)).argmax(dim=1)
        return int((pred == labels.to(pred.device)).sum()) / len(pred)  # an exact fraction, as linear_probe

    def state_dict(self) -> dict[str, Any]:
        return {"classifier": self.classifier.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.classifier.load_state_dict(state["classifier"])
        self.optimizer.load_state_dict(state["optimizer"])


def probe_batch(n: int) -> int:
    """How many images of an ``n``-image training batch the probe trains on (at least 1)."""
    return max(1, int(n * PROBE_BATCH_FRACTION))
