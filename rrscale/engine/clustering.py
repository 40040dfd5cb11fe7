"""Clustering and OOD scores: NMI, ARI, cluster accuracy, AUROC and a small k-means baseline.

These are the evaluation numbers of GEDI (Sansone & Manhaeve, arXiv:2401.00873, docs/methods.md
§2 "Evaluation"): NMI and ACC of the argmax cluster against the true labels, and AUROC of an
in-distribution score (GEDI uses LSE(x)) against an out-of-distribution set. All functions are
pure: arrays or tensors in, a float out; tensors may live on any device. scipy is imported
inside the two functions that use it: GEDI imports this module, and training must run where
only torch and numpy are installed (benchmarks/gpu_suite.py).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor | list[int] | list[float]
MAPPINGS = ("hungarian", "majority")


def _as_numpy(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _labels_pair(pred: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    p, y = _as_numpy(pred).reshape(-1), _as_numpy(labels).reshape(-1)
    if p.shape != y.shape:
        raise ValueError(f"pred and labels must have the same length, got {p.shape[0]} and {y.shape[0]}")
    if p.size == 0:
        raise ValueError("pred and labels must not be empty")
    return p, y


def contingency(pred: ArrayLike, labels: ArrayLike) -> np.ndarray:
    """Counts ``(clusters_present, classes_present)``: entry [i, j] = #points in cluster i of class j.

    Only values that occur are kept (rows/columns in sorted order of the values), so arbitrary
    integer ids (e.g. cluster 1733 out of 2048) cost nothing.
    """
    p, y = _labels_pair(pred, labels)
    _, p_idx = np.unique(p, return_inverse=True)
    _, y_idx = np.unique(y, return_inverse=True)
    table = np.zeros((p_idx.max() + 1, y_idx.max() + 1), dtype=np.int64)
    np.add.at(table, (p_idx, y_idx), 1)
    return table


def _entropy(counts: np.ndarray) -> float:
    prob = counts[counts > 0] / counts.sum()
    return float(-(prob * np.log(prob)).sum())


def nmi(pred: ArrayLike, labels: ArrayLike) -> float:
    """Normalised mutual information, arithmetic normalisation: I(P;Y) / ((H(P) + H(Y)) / 2).

    The arithmetic mean is scikit-learn's default, which is what the clustering literature
    (GEDI included) reports. Two constant labelings are a perfect match (1.0); if exactly one
    is constant the mutual information is 0 and so is the score. Range [0, 1], symmetric and
    invariant to renaming the clusters.
    """
    table = contingency(pred, labels).astype(np.float64)
    n = table.sum()
    h_p, h_y = _entropy(table.sum(1)), _entropy(table.sum(0))
    if h_p == 0.0 and h_y == 0.0:
        return 1.0
    joint = table / n
    outer = np.outer(table.sum(1), table.sum(0)) / (n * n)
    nz = joint > 0
    mi = float((joint[nz] * np.log(joint[nz] / outer[nz])).sum())
    return float(np.clip(mi / ((h_p + h_y) / 2.0), 0.0, 1.0))


def ari(pred: ArrayLike, labels: ArrayLike) -> float:
    """Adjusted Rand index (Hubert & Arabie 1985): pair agreement corrected for chance.

    Unlike NMI it does not reward over-clustering: spreading N points over many small clusters
    raises NMI (a sweep over ``method.clusters`` that maximises NMI drifts there) while ARI stays
    near 0. 1.0 for identical partitions (also when the chance term leaves nothing to adjust),
    about 0 for independent ones, negative below chance.
    """
    table = contingency(pred, labels).astype(np.float64)

    def pairs(counts: np.ndarray) -> float:
        return float((counts * (counts - 1) / 2.0).sum())

    index = pairs(table)
    rows, cols = pairs(table.sum(1)), pairs(table.sum(0))
    n = table.sum()
    expected = rows * cols / (n * (n - 1) / 2.0) if n > 1 else 0.0
    best = (rows + cols) / 2.0
    if best == expected:
        return 1.0
    return float((index - expected) / (best - expected))


def cluster_acc(
    pred: ArrayLike, labels: ArrayLike, mapping: Literal["hungarian", "majority"] = "hungarian"
) -> float:
    """Accuracy after mapping each cluster to a class.

    ``hungarian`` (the standard clustering ACC): the one-to-one cluster->class map maximising
    the matched count, found by ``scipy.optimize.linear_sum_assignment`` on the contingency
    table; with more clusters than classes the unmatched clusters count as errors, so
    over-clustering is penalised. ``majority`` (best overlap): each cluster maps to its most
    frequent class, several clusters may share a class; this is the meaningful choice when there
    are fewer clusters than classes, where a one-to-one map must leave classes unmatched anyway.
    """
    table = contingency(pred, labels)
    if mapping == "hungarian":
        from scipy.optimize import linear_sum_assignment

        rows, cols = linear_sum_assignment(table, maximize=True)
        matched = int(table[rows, cols].sum())
    elif mapping == "majority":
        matched = int(table.max(axis=1).sum())
    else:
        raise ValueError(f"unknown mapping {mapping!r}; expected one of: {', '.join(MAPPINGS)}")
    return matched / int(table.sum())


def auroc(scores_in: ArrayLike, scores_out: ArrayLike) -> float:
    """Area under the ROC curve for "in-distribution scores higher than OOD scores".

    Rank form (Mann-Whitney U): AUROC = (R_in - n_in (n_in + 1) / 2) / (n_in n_out), with R_in
    the sum of the in-distribution ranks in the pooled sample. Ties get average ranks, so a tie
    counts one half, exactly as the trapezoidal ROC area does. 1.0 = perfect separation, 0.5 =
    chance. Non-finite scores are rejected because their rank is meaningless.
    """
    s_in = _as_numpy(scores_in).astype(np.float64).reshape(-1)
    s_out = _as_numpy(scores_out).astype(np.float64).reshape(-1)
    if s_in.size == 0 or s_out.size == 0:
        raise ValueError(f"auroc needs non-empty score sets, got {s_in.size} in and {s_out.size} out")
    pooled = np.concatenate([s_in, s_out])
    if not np.isfinite(pooled).all():
        raise ValueError("auroc scores must be finite (got nan or inf)")
    from scipy.stats import rankdata

    ranks = rankdata(pooled)
    n_in, n_out = s_in.size, s_out.size
    u = ranks[:n_in].sum() - n_in * (n_in + 1) / 2.0
    return float(u / (n_in * n_out))


def kmeans(x: torch.Tensor, k: int, *, iters: int = 100, seed: int = 0, tol: float = 1e-6) -> torch.Tensor:
    """Lloyd's k-means with k-means++ seeding on ``x`` of shape ``(N, d)``; returns ``(N,)`` labels.

    Runs on ``x``'s device in fp32; used as the "features + k-means" clustering baseline for
    methods (such as RR) that have no cluster head. Stops after ``iters`` rounds or when the
    centres move less than ``tol`` (squared distance, summed). An emptied cluster is re-seeded
    at the point farthest from its centre so exactly ``k`` centres are always used.
    """
    if x.ndim != 2:
        raise ValueError(f"kmeans expects (N, d) features, got shape {tuple(x.shape)}")
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"kmeans needs 1 <= k <= N, got k={k} for N={n}")
    x = x.float()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    first = int(torch.randint(n, (1,), generator=gen))
    centres = x[first : first + 1]
    dist = torch.cdist(x, centres).squeeze(1) ** 2
    for _ in range(1, k):
        probs = (dist / dist.sum()).cpu() if dist.sum() > 0 else torch.full((n,), 1.0 / n)
        nxt = int(torch.multinomial(probs, 1, generator=gen))
        centres = torch.cat([centres, x[nxt : nxt + 1]])
        dist = torch.minimum(dist, ((x - x[nxt]) ** 2).sum(1))
    assign = torch.cdist(x, centres).argmin(1)
    for _ in range(iters):
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)
        new = sums / counts.clamp_min(1).unsqueeze(1)
        d_own = ((x - new[assign]) ** 2).sum(1)
        for empty in torch.nonzero(counts == 0).flatten().tolist():
            far = int(d_own.argmax())
            new[empty] = x[far]
            d_own[far] = 0
        shift = float(((new - centres) ** 2).sum())
        centres = new
        assign = torch.cdist(x, centres).argmin(1)
        if shift < tol:
            break
    return assign
