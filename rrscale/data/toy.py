"""Two-dimensional toy sets for GEDI's cheap CPU check: two moons and two circles.

GEDI (Sansone & Manhaeve, arXiv:2401.00873, docs/methods.md §2) reports clustering NMI on these
two sets over 5 runs. Both are generated here with numpy only: points are drawn at uniformly
random angles on the noise-free curves, Gaussian noise is added, and the result is standardised
with the *analytic* mean and standard deviation of that distribution, so every call (train or
test, any seed) uses exactly the same affine map and the data has roughly zero mean and unit
variance per coordinate. Classes are balanced (``n // 2`` and ``n - n // 2`` points) and the
rows are shuffled, all from one ``numpy.random.default_rng(seed)``: same arguments, same arrays.
"""

from __future__ import annotations

import math

import numpy as np


def _check(n: int, noise: float) -> None:
    if n < 2:
        raise ValueError(f"toy data needs n >= 2 points (one per class), got {n}")
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise}")


def _finish(
    rng: np.random.Generator, points: np.ndarray, labels: np.ndarray, mean: np.ndarray, std: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    order = rng.permutation(len(labels))
    x = ((points - mean) / std)[order].astype(np.float32)
    return x, labels[order].astype(np.int64)


def make_moons(n: int, seed: int, noise: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Two interleaving half circles: ``(n, 2)`` float32 points and ``(n,)`` int64 labels in {0, 1}.

    Class 0 lies on (cos t, sin t), class 1 on (1 - cos t, 1/2 - sin t), t ~ U[0, pi], plus
    N(0, noise^2) per coordinate. With E[sin t] = 2/pi and E[sin^2 t] = E[cos^2 t] = 1/2 the
    pooled mean is (1/2, 1/4) and the variances are 3/4 + noise^2 and 9/16 - 1/pi + noise^2,
    which standardise the output.
    """
    _check(n, noise)
    rng = np.random.default_rng(seed)
    n0 = n // 2
    t = rng.uniform(0.0, math.pi, size=n)
    outer = np.stack([np.cos(t[:n0]), np.sin(t[:n0])], axis=1)
    inner = np.stack([1.0 - np.cos(t[n0:]), 0.5 - np.sin(t[n0:])], axis=1)
    points = np.concatenate([outer, inner]) + rng.normal(0.0, noise, size=(n, 2))
    labels = np.concatenate([np.zeros(n0), np.ones(n - n0)])
    mean = np.array([0.5, 0.25])
    std = np.sqrt(np.array([0.75, 9.0 / 16.0 - 1.0 / math.pi]) + noise**2)
    return _finish(rng, points, labels, mean, std)


def make_circles(n: int, seed: int, noise: float = 0.05, factor: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Two concentric circles: ``(n, 2)`` float32 points and ``(n,)`` int64 labels in {0, 1}.

    Class 0 lies on the unit circle, class 1 on the circle of radius ``factor`` (0 < factor < 1),
    angles ~ U[0, 2 pi), plus N(0, noise^2) per coordinate. The mean is 0 and each coordinate
    has variance (1 + factor^2) / 4 + noise^2, which standardises the output.
    """
    _check(n, noise)
    if not 0.0 < factor < 1.0:
        raise ValueError(f"factor (inner radius / outer radius) must be in (0, 1), got {factor}")
    rng = np.random.default_rng(seed)
    n0 = n // 2
    t = rng.uniform(0.0, 2.0 * math.pi, size=n)
    radius = np.concatenate([np.ones(n0), np.full(n - n0, factor)])
    points = radius[:, None] * np.stack([np.cos(t), np.sin(t)], axis=1) + rng.normal(0.0, noise, size=(n, 2))
    labels = np.concatenate([np.zeros(n0), np.ones(n - n0)])
    std = math.sqrt((1.0 + factor**2) / 4.0 + noise**2)
    return _finish(rng, points, labels, np.zeros(2), np.full(2, std))
