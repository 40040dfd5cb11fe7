"""Two-dimensional toy sets for GEDI's cheap CPU check: two moons and two circles.

GEDI (Sansone & Manhaeve, arXiv:2401.00873, docs/methods.md §2) reports clustering NMI on these
two sets over 5 runs. Both are generated here with numpy only: points are drawn at uniformly
random angles on the noise-free curves, Gaussian noise is added, and a fixed per-coordinate
affine map (not fitted to the sample, so train and test of any seed share it) places the
noise-free curves exactly on [-1, 1] in each coordinate; only the noise reaches slightly past.

Why [-1, 1] and not zero mean / unit variance: GEDI's SGLD buffer starts from U(-1, 1) noise
and methods.md §2 requires the data in that same range. With standardised moons (range about
[-2, 2]) the chains start in the centre square only, mix slowly out of it, and the
contrastive-divergence term then lowers the energy of the moons' central parts relative to
their ends; on two moons that steered GEDI's clusters into a "centre vs ends" split.

Classes are balanced (``n // 2`` and ``n - n // 2`` points) and the rows are shuffled, all from
one ``numpy.random.default_rng(seed)``: same arguments, same arrays.
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
    rng: np.random.Generator, points: np.ndarray, labels: np.ndarray, centre: np.ndarray, half_range: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    order = rng.permutation(len(labels))
    x = ((points - centre) / half_range)[order].astype(np.float32)
    return x, labels[order].astype(np.int64)


def make_moons(n: int, seed: int, noise: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Two interleaving half circles: ``(n, 2)`` float32 points and ``(n,)`` int64 labels in {0, 1}.

    Class 0 lies on (cos t, sin t), class 1 on (1 - cos t, 1/2 - sin t), t ~ U[0, pi], plus
    N(0, noise^2) per coordinate. The noise-free curves span x in [-1, 2] and y in [-1/2, 1],
    mapped onto [-1, 1] by centre (1/2, 1/4) and half-range (3/2, 3/4).
    """
    _check(n, noise)
    rng = np.random.default_rng(seed)
    n0 = n // 2
    t = rng.uniform(0.0, math.pi, size=n)
    outer = np.stack([np.cos(t[:n0]), np.sin(t[:n0])], axis=1)
    inner = np.stack([1.0 - np.cos(t[n0:]), 0.5 - np.sin(t[n0:])], axis=1)
    points = np.concatenate([outer, inner]) + rng.normal(0.0, noise, size=(n, 2))
    labels = np.concatenate([np.zeros(n0), np.ones(n - n0)])
    return _finish(rng, points, labels, np.array([0.5, 0.25]), np.array([1.5, 0.75]))


def make_circles(n: int, seed: int, noise: float = 0.05, factor: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Two concentric circles: ``(n, 2)`` float32 points and ``(n,)`` int64 labels in {0, 1}.

    Class 0 lies on the unit circle, class 1 on the circle of radius ``factor`` (0 < factor < 1),
    angles ~ U[0, 2 pi), plus N(0, noise^2) per coordinate. The outer circle already spans
    [-1, 1], so the map is the identity.
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
    return _finish(rng, points, labels, np.zeros(2), np.ones(2))
