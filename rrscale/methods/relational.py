"""Self-supervised relational reasoning (Patacchiola & Storkey, NeurIPS 2020, arXiv:2006.05849).

K augmentations ("views") of each of the n images of a mini-batch go through the backbone in
one pass; a relation head learns to tell whether two view representations come from the same
image (positive, target 1) or not (negative, target 0). The recipe (docs/methods.md §1):

- features are augmentation-major, ``(K*n, d)``: rows ``[a*n:(a+1)*n]`` are view ``a``;
- for every view pair ``a < b`` in lexicographic order, the positive is ``agg(F_a, F_b)`` and
  the one negative is ``agg(F_a, roll(F_b, s))`` with the image shift ``s`` starting at 1 per
  mini-batch, growing by 1 per pair and wrapping back to 1 when it reaches n;
- the head scores all ``2P`` rows (``P = n*K(K-1)/2``) at once; loss is the sigmoid focal loss.

The official code builds the pairs with a Python loop over view pairs; here the row indices are
built once per ``(n, K, device)`` with tensor ops and cached, so a step is one gather.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from rrscale.config import RelationalConfig
from rrscale.nets.heads import relation_head

AGGREGATIONS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "cat": lambda fa, fb: torch.cat([fa, fb], dim=1),
    "sum": lambda fa, fb: fa + fb,
    "mean": lambda fa, fb: (fa + fb) * 0.5,
    "max": torch.maximum,
}


def aggregate(fa: torch.Tensor, fb: torch.Tensor, how: str) -> torch.Tensor:
    """Combine paired rows ``fa, fb`` of shape ``(M, d)`` into the relation head's input.

    ``cat`` gives ``(M, 2d)`` with ``fa`` (the lower view) first, the paper's best choice;
    ``sum``, ``mean`` and ``max`` are element-wise and give ``(M, d)``.
    """
    if how not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {how!r}; expected one of: {', '.join(AGGREGATIONS)}")
    if fa.shape != fb.shape:
        raise ValueError(f"aggregate needs equal shapes, got {tuple(fa.shape)} and {tuple(fb.shape)}")
    return AGGREGATIONS[how](fa, fb)


@lru_cache(maxsize=64)
def _pair_indices(n: int, k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    a, b = torch.triu_indices(k, k, offset=1)  # row-major: (0,1), (0,2), ..., (0,K-1), (1,2), ...
    shifts = torch.arange(a.numel()) % (n - 1) + 1  # 1, 2, ..., n-1, 1, 2, ...
    i = torch.arange(n)
    anchor = a[:, None] * n + i
    positive = b[:, None] * n + i
    # torch.roll(block, s)[i] == block[(i - s) mod n]; `%` on tensors is a floor modulo.
    negative = b[:, None] * n + (i[None, :] - shifts[:, None]) % n
    return tuple(t.reshape(-1).to(device) for t in (anchor, positive, negative))  # type: ignore[return-value]


def pair_indices(
    n: int, k: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row indices of RR's pairs into the augmentation-major ``(k*n, d)`` feature matrix.

    Returns ``(anchor_rows, positive_rows, negative_rows)``, each int64 of length
    ``P = n * k*(k-1)/2``, ordered pair by pair (lexicographic ``a < b``) and image by image
    within a pair. Pair ``p`` uses the image shift ``s_p = 1 + (p mod (n-1))``: 1 at the start of
    the mini-batch, +1 per pair, back to 1 on reaching n, so a negative never pairs an image with
    itself. Cached per ``(n, k, device)``; the returned tensors are shared, do not modify them.
    """
    if n < 2:
        raise ValueError(f"relational reasoning needs at least 2 images per batch for negatives, got n={n}")
    if k < 2:
        raise ValueError(f"relational reasoning needs at least 2 views per image, got K={k}")
    return _pair_indices(n, k, torch.device(device))


def focal_loss(
    logits: torch.Tensor, targets: torch.Tensor, gamma: float = 2.0, alpha: float | None = 0.5
) -> torch.Tensor:
    """Sigmoid focal loss (Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017).

    ``logits`` and ``targets`` have the same shape ``(M,)``; returns the scalar
    ``mean(alpha_t * (1 - p_t)^gamma * BCE(logit, y))`` with ``p = sigmoid(logit)``,
    ``p_t = y*p + (1-y)*(1-p)`` and ``alpha_t = y*alpha + (1-y)*(1-alpha)`` (no ``alpha_t``
    factor when ``alpha`` is None). RR uses gamma=2, alpha=0.5; gamma=0, alpha=None is plain
    BCE-with-logits. Computed in fp32 whatever the logits' dtype, so bf16 autocast cannot
    underflow the small per-pair terms.
    """
    if gamma < 0:
        raise ValueError(f"focal gamma must be >= 0, got {gamma}")
    if alpha is not None and not 0.0 <= alpha <= 1.0:
        raise ValueError(f"focal alpha must be in [0, 1] or None, got {alpha}")
    if logits.shape != targets.shape:
        raise ValueError(
            f"logits and targets need equal shapes, got {tuple(logits.shape)} and {tuple(targets.shape)}"
        )
    x = logits.float()
    y = targets.float()
    loss = F.binary_cross_entropy_with_logits(x, y, reduction="none")
    if gamma != 0:
        p = torch.sigmoid(x)
        p_t = y * p + (1 - y) * (1 - p)
        loss = (1 - p_t).pow(gamma) * loss
    if alpha is not None:
        loss = (y * alpha + (1 - y) * (1 - alpha)) * loss
    return loss.mean()


class RelationalReasoning(nn.Module):
    """RR method module: backbone + relation head, ``forward(views, n) -> (loss, metrics)``.

    ``views`` is ``(K*n, ...)`` augmentation-major; all ``K*n`` views go through the backbone in
    one pass (BatchNorm sees all of them), pairs are gathered with :func:`pair_indices`, and the
    head scores the ``2P`` aggregated rows in one call. Metrics: ``loss`` and ``relation_acc``
    (fraction of pairs with ``(logit > 0) == target``), both detached.
    """

    symmetric_input = False

    def __init__(self, cfg: RelationalConfig, backbone: nn.Module) -> None:
        super().__init__()
        feature_dim = getattr(backbone, "feature_dim", None)
        if not isinstance(feature_dim, int):
            raise ValueError(f"backbone {type(backbone).__name__} has no int attribute 'feature_dim'")
        if cfg.aggregation not in AGGREGATIONS:
            raise ValueError(
                f"unknown aggregation {cfg.aggregation!r}; expected one of: {', '.join(AGGREGATIONS)}"
            )
        self.backbone = backbone
        self.aggregation = cfg.aggregation
        head_in = 2 * feature_dim if cfg.aggregation == "cat" else feature_dim
        self.head = relation_head(head_in, cfg.head_width, cfg.head_depth)
        self.views_per_image = cfg.K
        self.focal_gamma = cfg.focal_gamma
        self.focal_alpha = cfg.focal_alpha

    def forward(self, views: torch.Tensor, n: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        k = self.views_per_image
        if views.shape[0] != k * n:
            raise ValueError(f"expected K*n = {k}*{n} = {k * n} views, got {views.shape[0]}")
        feats = self.backbone(views)  # (K*n, d)
        anchor, positive, negative = pair_indices(n, k, feats.device)
        # (2P, d) each: rows [0:P] are the positives, rows [P:2P] the negatives, same anchors.
        fa = feats.index_select(0, anchor).repeat(2, 1)
        fb = feats.index_select(0, torch.cat([positive, negative]))
        logits = self.head(aggregate(fa, fb, self.aggregation)).squeeze(1)  # (2P,)
        p = anchor.numel()
        ones = logits.new_ones(p, dtype=torch.float32)
        targets = torch.cat([ones, torch.zeros_like(ones)])
        loss = focal_loss(logits, targets, self.focal_gamma, self.focal_alpha)
        with torch.no_grad():
            acc = ((logits > 0).float() == targets).float().mean()
        return loss, {"loss": loss.detach(), "relation_acc": acc}

    def extra_evaluation(
        self, x_test: torch.Tensor, y_test: torch.Tensor, out_dir: Path | None
    ) -> dict[str, float]:
        """RR has no scores beyond the shared linear probe and kNN."""
        return {}
