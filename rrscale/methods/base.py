"""The narrow contract every self-supervised method satisfies (a Protocol, not a base class)."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class Method(Protocol):
    """A method is an ``nn.Module`` holding its backbone and heads.

    ``forward(views, n)`` takes ``views`` in augmentation-major layout, shape ``(K*n, ...)``
    (rows ``[0:n]`` are view 1 of every image, ``[n:2n]`` view 2, ...), and returns the scalar
    loss plus detached metrics. ``views_per_image`` is K. ``symmetric_input`` asks the engine
    to scale pixels to [-1, 1] instead of the dataset's mean/std (GEDI's SGLD needs it).
    """

    backbone: nn.Module
    views_per_image: int
    symmetric_input: bool

    def __call__(self, views: torch.Tensor, n: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...

    def extra_evaluation(
        self, x_test: torch.Tensor, y_test: torch.Tensor, out_dir: Path | None
    ) -> dict[str, float]:
        """Method-specific end-of-run scores (GEDI: NMI/ACC/OOD); ``x_test`` is model-ready."""
        ...


class TrainingDiverged(RuntimeError):
    """Raised by a method when its loss explodes; the engine ends the run with status "failed"."""
