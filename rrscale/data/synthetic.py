"""A generated 10-class image set whose classes survive the relational-reasoning augmentations.

Tests and smoke runs need images where self-supervised learning has something to find, without
a download. The RR views crop down to 8 % of the area (up to ~3.5x magnification), flip
horizontally, jitter brightness/contrast/saturation/hue strongly and sometimes drop colour. So
a class here is a *texture or structure* that looks alike in every crop, at every scale in
that range, in any colour, and in its mirror image:

==  ======================  =====================================================
 0  horizontal stripes      sinusoid along y
 1  vertical stripes        sinusoid along x
 2  diagonal stripes        at +45 or -45 degrees (a flip swaps them: same class)
 3  checkerboard            axis-aligned
 4  diamond checkerboard    the checkerboard turned 45 degrees
 5  rings                   concentric around a random centre
 6  spokes                  a star of 3-8 rays around a random centre
 7  blobs                   1-4 soft disks of random size and place
 8  cloudy noise            a sum of random low-frequency waves, no single direction
 9  dots                    a lattice of small round dots
==  ======================  =====================================================

Every image draws its own period (4-9 px), phase, small rotation (+-10 degrees), edge
sharpness, two random colours (which one is the foreground is random too), and pixel noise.
Phases and positions are random, so pixels alone say little, while the structure survives the
views. Measured with 2,000 train / 400 test images: a linear classifier on raw pixels 20-30 %, a
linear probe on a randomly initialised conv4 ~57 %, a small CNN trained with labels under the
RR augmentations ~95 % (87 % on augmented test views; 4,000 / 1,000 images, 12 epochs).
Chance is 10 %.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

SIZE = 32
NUM_CLASSES = 10
CLASS_NAMES = (
    "horizontal stripes",
    "vertical stripes",
    "diagonal stripes",
    "checkerboard",
    "diamond checkerboard",
    "rings",
    "spokes",
    "blobs",
    "cloudy noise",
    "dots",
)

_Pattern = Callable[[np.random.Generator, int], np.ndarray]


def _grid() -> tuple[np.ndarray, np.ndarray]:
    axis = np.arange(SIZE, dtype=np.float32) - (SIZE - 1) / 2
    ys, xs = np.meshgrid(axis, axis, indexing="ij")
    return ys[None], xs[None]


def _col(values: np.ndarray) -> np.ndarray:
    """Per-sample scalars shaped to broadcast over ``(n, SIZE, SIZE)``."""
    return values.astype(np.float32)[:, None, None]


def _squash(rng: np.random.Generator, wave: np.ndarray) -> np.ndarray:
    """Map a wave in about [-1, 1] to [0, 1] with a per-sample edge sharpness (soft to square)."""
    sharp = _col(rng.uniform(1.0, 5.0, len(wave)))
    return 0.5 + 0.5 * np.tanh(sharp * wave)


def _frequency(rng: np.random.Generator, n: int) -> np.ndarray:
    return _col(2 * np.pi / rng.uniform(4.0, 9.0, n))


def _rotated(rng: np.random.Generator, n: int, base_deg: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates along and across a direction ``base_deg`` (+-10 degrees of jitter)."""
    ys, xs = _grid()
    theta = _col(np.deg2rad(base_deg + rng.uniform(-10.0, 10.0, n)))
    return xs * np.cos(theta) + ys * np.sin(theta), -xs * np.sin(theta) + ys * np.cos(theta)


def _phase(rng: np.random.Generator, n: int) -> np.ndarray:
    return _col(rng.uniform(0.0, 2 * np.pi, n))


def _stripes(base_deg: float) -> _Pattern:
    def pattern(rng: np.random.Generator, n: int) -> np.ndarray:
        u, _ = _rotated(rng, n, base_deg)
        return _squash(rng, np.sin(_frequency(rng, n) * u + _phase(rng, n)))

    return pattern


def _diagonal(rng: np.random.Generator, n: int) -> np.ndarray:
    u, _ = _rotated(rng, n, rng.choice([45.0, -45.0], n))
    return _squash(rng, np.sin(_frequency(rng, n) * u + _phase(rng, n)))


def _checker(base_deg: float) -> _Pattern:
    def pattern(rng: np.random.Generator, n: int) -> np.ndarray:
        u, v = _rotated(rng, n, base_deg)
        f = _frequency(rng, n)
        return _squash(rng, 2 * np.sin(f * u + _phase(rng, n)) * np.sin(f * v + _phase(rng, n)))

    return pattern


def _centre(rng: np.random.Generator, n: int, spread: float) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = _grid()
    return ys - _col(rng.uniform(-spread, spread, n)), xs - _col(rng.uniform(-spread, spread, n))


def _rings(rng: np.random.Generator, n: int) -> np.ndarray:
    dy, dx = _centre(rng, n, 8.0)
    return _squash(rng, np.sin(_frequency(rng, n) * np.hypot(dy, dx) + _phase(rng, n)))


def _spokes(rng: np.random.Generator, n: int) -> np.ndarray:
    dy, dx = _centre(rng, n, 6.0)
    rays = _col(rng.integers(3, 9, n))
    return _squash(rng, np.sin(rays * np.arctan2(dy, dx) + _phase(rng, n)))


def _blobs(rng: np.random.Generator, n: int) -> np.ndarray:
    ys, xs = _grid()
    out = np.zeros((n, SIZE, SIZE), dtype=np.float32)
    count = rng.integers(1, 5, n)
    for k in range(4):
        cy, cx = (_col(rng.uniform(-12.0, 12.0, n)) for _ in range(2))
        radius = _col(rng.uniform(3.0, 8.0, n))
        disk = 1 / (1 + np.exp(np.hypot(ys - cy, xs - cx) - radius))
        out = np.maximum(out, disk * _col(count > k))
    return out


def _cloudy(rng: np.random.Generator, n: int, waves: int = 8) -> np.ndarray:
    ys, xs = _grid()
    total = np.zeros((n, SIZE, SIZE), dtype=np.float32)
    for _ in range(waves):
        theta = _col(rng.uniform(0.0, np.pi, n))
        f = _col(2 * np.pi / rng.uniform(8.0, 16.0, n))
        total += np.cos(f * (xs * np.cos(theta) + ys * np.sin(theta)) + _phase(rng, n))
    return _squash(rng, total / np.sqrt(waves / 2))


def _dots(rng: np.random.Generator, n: int) -> np.ndarray:
    u, v = _rotated(rng, n, 0.0)
    f = _frequency(rng, n)
    lattice = np.cos(f * u + _phase(rng, n)) + np.cos(f * v + _phase(rng, n))
    return _squash(rng, 2 * (lattice - 1.2))


_PATTERNS: tuple[_Pattern, ...] = (
    _stripes(90.0),
    _stripes(0.0),
    _diagonal,
    _checker(0.0),
    _checker(45.0),
    _rings,
    _spokes,
    _blobs,
    _cloudy,
    _dots,
)


def _paint(rng: np.random.Generator, pattern: np.ndarray) -> np.ndarray:
    """Two random colours, one dark and one light, in random roles, plus pixel noise."""
    n = len(pattern)
    dark = rng.uniform(0.05, 0.45, (n, 1, 1, 1)) + rng.normal(0.0, 0.15, (n, 1, 1, 3))
    light = rng.uniform(0.55, 0.95, (n, 1, 1, 1)) + rng.normal(0.0, 0.15, (n, 1, 1, 3))
    swap = rng.random((n, 1, 1, 1)) < 0.5
    fg, bg = np.where(swap, dark, light), np.where(swap, light, dark)
    img = bg + pattern[..., None] * (fg - bg)
    img = img + rng.normal(0.0, 1.0, img.shape) * rng.uniform(0.01, 0.06, (n, 1, 1, 1))
    return np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)


def make_synthetic(n: int, seed: int, stream: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images ``(n, 32, 32, 3)`` uint8 and int64 labels, balanced over the 10 classes.

    Same ``(n, seed, stream)``, same arrays. Train and test use different ``stream`` values so
    they are independent draws.
    """
    if n < 1:
        raise ValueError(f"synthetic data needs n >= 1 images, got {n}")
    rng = np.random.default_rng([seed, stream])
    labels = rng.permutation(np.arange(n) % NUM_CLASSES).astype(np.int64)
    pattern = np.empty((n, SIZE, SIZE), dtype=np.float32)
    for c, make in enumerate(_PATTERNS):
        rows = np.flatnonzero(labels == c)
        if len(rows):
            pattern[rows] = make(rng, len(rows))
    return _paint(rng, pattern), labels
