"""Statistics of batched views, to check the random augmentation against a reference batch.

Views are random, so a pipeline is compared with a reference (torchvision's per-image recipe,
or the CPU views when checking another device) through statistics that the recipe's
parameters move: per-channel mean and spread, the spread within a view, the chroma and the
share of gray views. The limits in :data:`STAT_TOL` were set by measurement (below). One
implementation serves the tests (tests/test_views.py) and the GPU suite
(benchmarks/gpu_suite.py), so the device check of the suite is the test's check.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rrscale.config import ViewsConfig
from rrscale.data.sources import FIXED_STATS
from rrscale.data.views import ImageViews

MEAN, STD = FIXED_STATS["cifar10"]

# Limits set by measurement (6 seeds, 2,048 views): torchvision against itself with other seeds
# differs by up to 0.061 / 0.027 / 0.009 / 0.012 / 0.022 on these; jitter_prob 1.0 or 0.6
# moves channel_std by 0.045-0.053, jitter strength 0.6/1.0 by 0.066-0.10, gray_prob 0.1/0.3
# moves gray_fraction by 0.09-0.10. channel_mean and view_std are sanity bounds (normalisation,
# gross crop errors); the crop scale and hue have their own, sharper tests in tests/test_views.py.
STAT_TOL = {
    "channel_mean": 0.1,
    "channel_std": 0.035,
    "view_std": 0.015,
    "chroma": 0.02,
    "gray_fraction": 0.05,
}
#: A CPU generator must drive another device's data to the same views up to float rounding.
SAME_GENERATOR_TOL = 1e-4


@dataclass(frozen=True)
class StatCheck:
    """One compared statistic: ``value`` (the largest difference) must stay below ``limit``."""

    name: str
    value: float
    limit: float
    ours: list[float]
    reference: list[float]

    @property
    def ok(self) -> bool:
        return self.value < self.limit

    def describe(self) -> str:
        return f"{self.name}: |diff| {self.value:.4g} (limit {self.limit:g}); ours {self.ours} reference {self.reference}"


def smooth_images(n: int, size: int = 32, channels: int = 3, seed: int = 0) -> torch.Tensor:
    """Natural-looking uint8 (n, size, size, C) images: upsampled low-res noise plus a gradient."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, channels, 4, 4, generator=g)
    img = torch.nn.functional.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
    ramp = torch.linspace(-0.2, 0.2, size).view(1, 1, 1, size) * torch.randn(n, channels, 1, 1, generator=g)
    img = (img + ramp + 0.05 * torch.randn(n, channels, size, size, generator=g)).clamp(0, 1)
    return (img * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def denorm(v: torch.Tensor, mean: Sequence[float] = MEAN, std: Sequence[float] = STD) -> torch.Tensor:
    return v * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)


def summary(v: torch.Tensor, mean: Sequence[float] = MEAN, std: Sequence[float] = STD) -> dict[str, torch.Tensor]:
    """Statistics of a batch of normalised float views (CPU) that the recipe's parameters move."""
    d = denorm(v, mean, std)
    spread = d.amax(1) - d.amin(1)  # per-pixel chroma
    return {
        "channel_mean": v.mean((0, 2, 3)),
        "channel_std": v.std((0, 2, 3)),
        "view_std": d.std((1, 2, 3)).mean(),
        "chroma": spread.mean(),
        "gray_fraction": (spread.flatten(1).amax(1) < 1e-4).float().mean(),
    }


def compare_statistics(
    ours: torch.Tensor, reference: torch.Tensor, tol: dict[str, float] | None = None, label: str = ""
) -> list[StatCheck]:
    """One :class:`StatCheck` per statistic in ``tol`` (default :data:`STAT_TOL`)."""
    a, b = summary(ours), summary(reference)
    prefix = f"{label} " if label else ""
    return [
        StatCheck(f"{prefix}{key}", (a[key] - b[key]).abs().max().item(), limit,
                  a[key].flatten().tolist(), b[key].flatten().tolist())
        for key, limit in (STAT_TOL if tol is None else tol).items()
    ]


def device_statistics(device: torch.device, n: int = 256, k: int = 8, seed: int = 3) -> list[StatCheck]:
    """The views made on ``device`` against the CPU's float32 views of the same images.

    For float32 and bfloat16 output in channels_last (what training uses on a GPU): every
    statistic of :data:`STAT_TOL` (bfloat16 rounds each channel differently, so a gray view is
    only exactly gray in float32: only the channel statistics are compared there). Then a CPU
    generator must drive ``device`` data to the CPU's very views. A wrong output dtype or
    memory format raises ``ValueError``.
    """
    x = smooth_images(n, seed=seed)
    cpu = ImageViews(ViewsConfig(), MEAN, STD)(x, k, torch.Generator().manual_seed(0))
    checks: list[StatCheck] = []
    for dtype in (torch.float32, torch.bfloat16):
        maker = ImageViews(ViewsConfig(), MEAN, STD, dtype=dtype, channels_last=True)
        views = maker(x.to(device), k, torch.Generator(device=device).manual_seed(0))
        if views.dtype != dtype or not views.is_contiguous(memory_format=torch.channels_last):
            raise ValueError(f"views on {device}: expected {dtype} in channels_last, got {views.dtype} "
                             f"with strides {views.stride()}")
        tol = {key: v for key, v in STAT_TOL.items() if dtype == torch.float32 or key.startswith("channel")}
        checks += compare_statistics(views.float().cpu(), cpu, tol, f"{device.type} {str(dtype)[6:]}")
    same = ImageViews(ViewsConfig(), MEAN, STD)(x.to(device), k, torch.Generator().manual_seed(0)).cpu()
    diff = (same - cpu).abs().max().item()
    checks.append(StatCheck(f"{device.type} views from a CPU generator", diff, SAME_GENERATOR_TOL, [], []))
    return checks
