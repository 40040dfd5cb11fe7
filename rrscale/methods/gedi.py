"""GEDI: generative and discriminative self-supervised clustering with one backbone.

Sansone & Manhaeve, "A Bayesian Unification of Self-Supervised Clustering and Energy-Based
Models", arXiv:2401.00873 (TMLR 2025 as "Unifying Self-Supervised Clustering and Energy-Based
Models"); docs/methods.md §2. A backbone and a projector give c cluster logits z(x); with the
temperature tau they define both a cluster posterior p(y|x) = softmax(z(x)/tau) and an
energy-based model E(x) = -LSE(x), LSE(x) = logsumexp_y z_y(x)/tau. The objective

    L = lambda_gen * L_GEN + 0.5 * L_UNIF + 0.5 * beta * L_INV

penalises the three failure modes of cluster-based SSL: L_UNIF cluster collapse, L_INV label
permutations between views, L_GEN representation collapse. No stop-gradient, no momentum
encoder. ``lambda_gen = 0`` is the "GEDI no-gen" ablation and then costs exactly the
discriminative forward pass: no sampler, no buffer, no extra forward.

Design choices (the paper leaves them open or methods.md states them loosely):

* Uniformity marginal from view 1 only, as methods.md writes it. View 2's assignments are tied
  to view 1's by L_INV, so they inherit the balance; and using one view keeps L_UNIF the
  cross-entropy of one batch marginal, comparable across K.
* L_UNIF is the cross-entropy from the uniform prior u = 1/c to the batch marginal,
  -(1/c) sum_c log pbar_c, the parenthetical definition in methods.md. The formula there omits
  the 1/c; that version is c times larger (0.5 * 2048 * log 2048 ~ 7.8e3 at its optimum for the
  default c), which would swamp beta * L_INV and nearly trip ``divergence_limit`` at step 0.
  The two differ only by that constant factor, so this is a weighting choice, stated here.
* L_INV exactly as methods.md: one direction, -mean_i sum_c P2_ic log P1_ic, gradients through
  both P2 and log P1. The two views are i.i.d. augmentations, so the reversed direction has the
  same expectation; averaging both would only reduce variance and is not what the paper writes.
* The generative term uses view 1 (the same images as the marginal) plus N(0, data_noise^2)
  input noise, and evaluates LSE of data and samples in one forward pass **in eval mode**: the
  energy whose likelihood is maximised is then the same function SGLD samples from (eval-mode
  BatchNorm), the samples never enter BatchNorm's batch or running statistics, and data and
  samples are scored by the same normalisation.
* Divergence guard: the step fails with :class:`TrainingDiverged` when the loss, or the mean
  LSE of data or samples, is non-finite or exceeds ``divergence_limit`` in magnitude. The LSE
  check matters because an exploding EBM can keep L_GEN (a difference) small while both
  LSE terms run away.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rrscale.config import GediConfig
from rrscale.engine.clustering import ari, auroc, cluster_acc, nmi
from rrscale.methods.base import TrainingDiverged
from rrscale.methods.sgld import PersistentSGLD, eval_mode, langevin, uniform_noise
from rrscale.nets.heads import projector

EVAL_BATCH = 1024
"""Rows per forward pass in :meth:`Gedi.extra_evaluation` (memory only, no effect on results)."""
PLOT_SAMPLES = 64
"""SGLD samples shown in ``sgld_samples.png`` (an 8 x 8 grid for images)."""
PLOT_POINTS = 2000
"""At most this many test points in the 2-D scatter plot."""


def uniformity_loss(logits1: torch.Tensor) -> torch.Tensor:
    """L_UNIF = -(1/c) sum_c log pbar_c, pbar = mean_i softmax(logits1)_i (cross-entropy u -> pbar).

    ``logits1``: ``(n, c)`` tempered logits z(x^1)/tau of view 1. Scalar; minimum log c exactly
    when the batch marginal is uniform, large when the batch collapses onto few clusters.
    Computed as a logsumexp over the batch of log-softmaxes, so a cluster no sample uses gives a
    large finite value instead of log(0).
    """
    if logits1.dim() != 2 or logits1.shape[0] == 0:
        raise ValueError(f"uniformity_loss expects (n, c) logits with n >= 1, got {tuple(logits1.shape)}")
    n = logits1.shape[0]
    log_marginal = torch.logsumexp(F.log_softmax(logits1.float(), dim=1), dim=0) - math.log(n)
    return -log_marginal.mean()


def invariance_loss(logits1: torch.Tensor, logits2: torch.Tensor) -> torch.Tensor:
    """L_INV = -mean_i sum_c P2_ic log P1_ic with P_v = softmax(logits_v), gradients through both.

    ``logits1``, ``logits2``: ``(n, c)`` tempered logits of two views of the same n images. The
    swapped-view cross-entropy ties the assignments of the two views (and so fixes the label
    permutation); no stop-gradient on either side (docs/methods.md §2).
    """
    if logits1.shape != logits2.shape or logits1.dim() != 2:
        raise ValueError(
            f"invariance_loss expects two (n, c) logits of equal shape, got {tuple(logits1.shape)} "
            f"and {tuple(logits2.shape)}"
        )
    p2 = F.softmax(logits2.float(), dim=1)
    return -(p2 * F.log_softmax(logits1.float(), dim=1)).sum(dim=1).mean()


def marginal_entropy(logits: torch.Tensor) -> torch.Tensor:
    """H(pbar) = -sum_c pbar_c log pbar_c of the batch-mean posterior pbar = mean_i softmax(logits)_i.

    ``logits``: ``(n, c)`` tempered logits. Scalar in [0, log c]: log c when the batch spreads
    evenly over all clusters, 0 when every sample puts all its mass on the same cluster
    (cluster collapse). Unlike L_UNIF it does not grow without bound, so it reads as "how many
    clusters the batch uses" (exp(H) is that number for an even spread).
    """
    if logits.dim() != 2 or logits.shape[0] == 0:
        raise ValueError(f"marginal_entropy expects (n, c) logits with n >= 1, got {tuple(logits.shape)}")
    log_marginal = torch.logsumexp(F.log_softmax(logits.float(), dim=1), dim=0) - math.log(logits.shape[0])
    return -(log_marginal.exp() * log_marginal).sum()


def assignment_summary(counts: torch.Tensor) -> dict[str, float]:
    """Collapse metrics from ``counts`` ``(c,)``, the argmax assignments per cluster over an epoch.

    ``train_clusters_used``: clusters with at least one assignment. ``train_top_cluster_share``:
    fraction of all assignments in the largest cluster (1.0 = collapsed onto one cluster). Counting over the
    whole epoch matters: a batch of 64 can use at most 64 of c = 2048 clusters, so a per-batch
    count averaged over an epoch under-counts whenever c exceeds the batch.
    """
    total = float(counts.sum())
    if total <= 0:
        return {"train_clusters_used": 0.0, "train_top_cluster_share": 0.0}
    return {
        "train_clusters_used": float((counts > 0).sum()),
        "train_top_cluster_share": float(counts.max()) / total,
    }


def generative_loss(lse_data: torch.Tensor, lse_sample: torch.Tensor) -> torch.Tensor:
    """L_GEN = -(mean LSE(x_data) - mean LSE(x_sampled)): contrastive divergence for the EBM.

    ``lse_data``: ``(n,)``, ``lse_sample``: ``(m,)``. Its gradient is the maximum-likelihood
    gradient of p(x) ∝ exp(LSE(x)) when the samples come from the model (persistent SGLD).
    """
    return -(lse_data.float().mean() - lse_sample.float().mean())


def energy_magnitude(lse_data: torch.Tensor, lse_sample: torch.Tensor) -> torch.Tensor:
    """mean LSE(x_data)^2 + mean LSE(x_sampled)^2: the energy-magnitude penalty of Du & Mordatch
    ("Implicit Generation and Generalization in Energy-Based Models", NeurIPS 2019).

    Contrastive divergence only fixes energy differences; when the sampler lags, raising LSE on
    the data without bound lowers L_GEN for ever. This keeps both energies near zero. Not part
    of GEDI's objective: ``method.energy_reg`` weights it, 0 (off) by default.
    """
    return lse_data.float().pow(2).mean() + lse_sample.float().pow(2).mean()


def shuffle_pixels(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image of ``x`` ``(N, C, H, W)`` with its H*W pixel positions randomly permuted.

    A pixel keeps its C values together, so colour statistics are kept and only spatial
    structure is destroyed: a harder OOD set than noise. One permutation per image.
    """
    if x.dim() != 4:
        raise ValueError(f"shuffle_pixels expects (N, C, H, W) images, got shape {tuple(x.shape)}")
    n, c, h, w = x.shape
    order = torch.rand(n, h * w, generator=generator, device=generator.device).argsort(dim=1).to(x.device)
    flat = x.reshape(n, c, h * w)
    return torch.gather(flat, 2, order.unsqueeze(1).expand(n, c, h * w)).reshape(n, c, h, w)


class Gedi(nn.Module):
    """GEDI method: ``backbone`` -> ``projector`` -> c cluster logits (Sansone & Manhaeve 2024).

    ``forward(views, n)`` takes two views per image in augmentation-major layout, ``(2n, ...)``
    with pixels in [-1, 1] (``symmetric_input``), and returns the loss of docs/methods.md §2 and
    detached metrics: ``loss``, ``unif``, ``inv``, ``lse_data``, ``marginal_entropy`` (entropy of
    view 1's batch-mean posterior) and, when ``lambda_gen > 0``, ``gen`` and ``lse_sample``. The
    argmax clusters of all 2n views go into an epoch histogram that :meth:`end_epoch` turns into
    ``train_clusters_used`` and ``train_top_cluster_share`` for the whole epoch.
    Without the generative term ``lse_data`` is the mean LSE of the clean view 1 (free to
    compute); with it, the mean LSE of the noisy view 1 scored in eval mode, as in L_GEN.
    """

    views_per_image = 2
    symmetric_input = True

    def __init__(self, cfg: GediConfig, backbone: nn.Module) -> None:
        super().__init__()
        feature_dim = getattr(backbone, "feature_dim", None)
        if not isinstance(feature_dim, int) or feature_dim < 1:
            raise ValueError("GEDI needs a backbone with an int attribute feature_dim (its pooled feature width)")
        if cfg.K != self.views_per_image:
            raise ValueError(f"GEDI uses exactly {self.views_per_image} views per image, got method.K={cfg.K}")
        if cfg.projector_norm == "backbone":
            raise ValueError(
                "GEDI needs a concrete method.projector_norm (batch, group or none); 'backbone' is resolved "
                "against backbone.norm by ExperimentConfig.resolved_method()"
            )
        self.cfg = cfg
        self.backbone = backbone
        self.projector = projector(feature_dim, cfg.projector_width, cfg.clusters, norm=cfg.projector_norm)
        self.sampler = PersistentSGLD(cfg.sgld) if cfg.lambda_gen > 0 else None
        self._assigned: torch.Tensor | None = None
        self.last_epoch_clusters_used: int | None = None

    def _count_assignments(self, z: torch.Tensor) -> None:
        """Add the argmax clusters of ``z`` ``(m, c)`` to this epoch's histogram (on device, no sync)."""
        if self._assigned is None or self._assigned.device != z.device:
            self._assigned = torch.zeros(self.cfg.clusters, device=z.device)
        self._assigned.index_add_(0, z.argmax(dim=1), torch.ones(z.shape[0], device=z.device))

    def end_epoch(self, reduce: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, float]:
        """Epoch-level collapse metrics over every view seen since the last call, then reset.

        ``reduce`` sums a tensor over data-parallel ranks (the identity on one process); every
        rank must call this together. Returns :func:`assignment_summary` of the epoch's argmax
        assignments (the training loop adds them to the epoch's metrics).
        """
        counts = self._assigned
        if counts is None:
            counts = torch.zeros(self.cfg.clusters, device=next(self.parameters()).device)
        out = assignment_summary(reduce(counts))
        self._assigned = None
        self.last_epoch_clusters_used = int(out["train_clusters_used"])
        return out

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Tempered cluster logits z(x)/tau, ``(N, ...) -> (N, c)``, in fp32 even under autocast."""
        return self.projector(self.backbone(x)).float() / self.cfg.tau

    def lse(self, x: torch.Tensor) -> torch.Tensor:
        """LSE(x) = logsumexp_y z_y(x)/tau, ``(N, ...) -> (N,)``: the unnormalised log p(x)."""
        return torch.logsumexp(self.logits(x), dim=1)

    def energy(self, x: torch.Tensor) -> torch.Tensor:
        """E(x) = -LSE(x), ``(N, ...) -> (N,)``."""
        return -self.lse(x)

    def forward(self, views: torch.Tensor, n: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss and detached metrics for ``views`` of shape ``(2n, ...)`` (rows [0:n] = view 1)."""
        if views.shape[0] != self.views_per_image * n or n < 1:
            raise ValueError(
                f"GEDI expects {self.views_per_image} views per image in augmentation-major layout: "
                f"views.shape[0] == 2*n, got {views.shape[0]} rows for n={n}"
            )
        z = self.logits(views)
        z1, z2 = z[:n], z[n:]
        unif = uniformity_loss(z1)
        inv = invariance_loss(z1, z2)
        loss = 0.5 * unif + 0.5 * self.cfg.beta * inv
        self._count_assignments(z.detach())
        metrics = {"unif": unif.detach(), "inv": inv.detach(), "marginal_entropy": marginal_entropy(z1.detach())}
        if self.sampler is None:
            metrics["lse_data"] = torch.logsumexp(z1.detach(), dim=1).mean()
        else:
            lse_data, lse_sample = self._generative(self.sampler, views[:n])
            gen = generative_loss(lse_data, lse_sample)
            loss = loss + self.cfg.lambda_gen * gen
            if self.cfg.energy_reg > 0:
                loss = loss + self.cfg.energy_reg * energy_magnitude(lse_data, lse_sample)
            metrics.update(gen=gen.detach(), lse_data=lse_data.detach().mean(), lse_sample=lse_sample.detach().mean())
        metrics["loss"] = loss.detach()
        self._check_divergence(metrics)
        return loss, metrics

    def _generative(self, sampler: PersistentSGLD, x_data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """LSE of noisy ``x_data`` ``(n, ...)`` and of ``sampler``'s negatives, ``(n,)`` and ``(m,)``, in eval mode."""
        m = self.cfg.sgld.batch_size or x_data.shape[0]
        samples = sampler.sample(self, self.lse, m, x_data).to(x_data.dtype)
        noisy = x_data + self.cfg.sgld.data_noise * torch.randn_like(x_data)
        with eval_mode(self):
            lse = self.lse(torch.cat([noisy, samples.to(memory_format=_memory_format(x_data))]))
        return lse[: x_data.shape[0]], lse[x_data.shape[0] :]

    def _check_divergence(self, metrics: dict[str, torch.Tensor]) -> None:
        """Raise TrainingDiverged when loss or mean LSEs are non-finite or beyond the limit (one sync)."""
        names = [k for k in ("loss", "lse_data", "lse_sample") if k in metrics]
        values = torch.stack([metrics[k].float() for k in names])
        limit = self.cfg.divergence_limit
        if bool((values.isfinite() & (values.abs() <= limit)).all()):
            return
        shown = ", ".join(f"{k}={float(v):.4g}" for k, v in metrics.items())
        raise TrainingDiverged(
            f"GEDI training diverged: loss or mean LSE non-finite or beyond divergence_limit={limit:g} ({shown}); "
            f"try a smaller train.lr, method.sgld.step_size or method.lambda_gen, or a larger method.tau"
        )

    @torch.no_grad()
    def _scores(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Argmax cluster ``(N,)`` and LSE ``(N,)`` of ``x`` in chunks; call in eval mode."""
        preds, lses = [], []
        for start in range(0, x.shape[0], EVAL_BATCH):
            z = self.logits(x[start : start + EVAL_BATCH])
            preds.append(z.argmax(dim=1))
            lses.append(torch.logsumexp(z, dim=1))
        return torch.cat(preds), torch.cat(lses)

    def extra_evaluation(
        self,
        x_test: torch.Tensor,
        y_test: torch.Tensor,
        out_dir: Path | None,
        ood: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, float]:
        """Clustering, OOD and sample scores on the model-ready test split (docs/methods.md §2).

        ``x_test`` ``(N, ...)`` is scaled like the training views, ``y_test`` ``(N,)`` holds labels
        (negative = unlabelled, skipped for NMI/ACC). Returns:

        * ``nmi``, ``ari``, ``acc``: argmax cluster vs labels (ARI is chance-adjusted: the fair
          objective when a sweep varies ``clusters``, since NMI grows with over-clustering). ACC uses the Hungarian one-to-one map when
          ``clusters >= classes`` (the standard metric; surplus clusters count as errors) and
          the best-overlap (majority) map otherwise, where one-to-one would have to leave
          classes unmatched. ``clusters_used``: distinct argmax clusters on the test set.
        * ``collapsed``: 1.0 when the model assigns everything to one cluster, on the test set
          or over the last training epoch's views; else 0.0.
        * ``ood_auroc_noise``: LSE(x) separating x_test from U(-1, 1) noise of the same shape;
          ``ood_auroc_shuffled`` (images only): from x_test with pixel positions shuffled per
          image; ``ood_auroc_<name>`` for each model-ready set in ``ood`` (e.g. ``svhn``). The
          OOD sets are drawn from a fixed-seed generator, so reruns score the same sets.
        * With ``out_dir``: ``sgld_samples.png``, a grid of SGLD samples (images) or, for
          vector data, a scatter of samples over the test points coloured by cluster, on
          the LSE landscape (2-D data).
        """
        out: dict[str, float] = {}
        with eval_mode(self):
            pred, lse_in = self._scores(x_test)
            labelled = y_test >= 0
            if bool(labelled.any()):
                p, y = pred[labelled], y_test[labelled]
                classes = int(torch.unique(y).numel())
                out["nmi"] = nmi(p, y)
                out["ari"] = ari(p, y)
                out["acc"] = cluster_acc(p, y, "hungarian" if self.cfg.clusters >= classes else "majority")
            out["clusters_used"] = float(torch.unique(pred).numel())
            out["collapsed"] = float(out["clusters_used"] <= 1 or self.last_epoch_clusters_used == 1)
            gen = torch.Generator(device=x_test.device).manual_seed(0)
            noise = torch.rand(x_test.shape, generator=gen, device=x_test.device, dtype=x_test.dtype) * 2 - 1
            ood_sets: dict[str, torch.Tensor] = {"noise": noise}
            if x_test.dim() == 4:
                ood_sets["shuffled"] = shuffle_pixels(x_test, gen)
            ood_sets.update(ood or {})
            for name, x_ood in ood_sets.items():
                out[f"ood_auroc_{name}"] = auroc(lse_in, self._scores(x_ood)[1])
        if out_dir is not None:
            self._save_samples(x_test, Path(out_dir) / "sgld_samples.png")
        return out

    def plot_samples(self, like: torch.Tensor, count: int) -> torch.Tensor:
        """``count`` samples: the persistent chains if training used them, else short-run SGLD from noise."""
        if self.sampler is not None and self.sampler.buffer is not None:
            return self.sampler.sample(self, self.lse, min(count, self.cfg.sgld.buffer_size), like)
        with eval_mode(self):
            start = uniform_noise((count, *like.shape[1:]), like.device)
            return langevin(self.lse, start, self.cfg.sgld.steps, self.cfg.sgld.step_size, self.cfg.sgld.noise)

    def draw_plane(self, ax: Any, x: torch.Tensor, title: str) -> None:
        """On matplotlib axes ``ax``: vector points ``x`` ``(N, d)`` coloured by cluster and SGLD
        samples as black crosses (first two coordinates); for 2-D data also the energy landscape
        (LSE, dark = low energy) as filled contours.
        """
        samples = self.plot_samples(x, PLOT_SAMPLES * 8).float().cpu().numpy()
        pts_t = x[:PLOT_POINTS]
        with eval_mode(self):
            clusters = self._scores(pts_t)[0].cpu().numpy()
        pts = pts_t.float().cpu().numpy()
        if pts.shape[1] == 2:
            lo = np.minimum(pts.min(0), samples.min(0)) - 0.5
            hi = np.maximum(pts.max(0), samples.max(0)) + 0.5
            gx, gy = np.meshgrid(np.linspace(lo[0], hi[0], 120), np.linspace(lo[1], hi[1], 120))
            grid = torch.tensor(np.stack([gx.ravel(), gy.ravel()], 1), dtype=x.dtype, device=x.device)
            with eval_mode(self):
                field = self._scores(grid)[1].cpu().numpy().reshape(gx.shape)
            ax.contourf(gx, gy, field, levels=30, cmap="Greys", alpha=0.6)
        ax.scatter(pts[:, 0], pts[:, 1], c=clusters % 10, s=4, cmap="tab10", vmin=0, vmax=9,
                   label="test data (colour: cluster)")
        ax.scatter(samples[:, 0], samples[:, 1], s=6, c="black", marker="x", label="SGLD samples")
        ax.legend(loc="upper right", fontsize="small")
        ax.set_title(title)

    def _save_samples(self, x_test: torch.Tensor, path: Path) -> None:
        """Write the sample figure atomically: an image grid, or samples and clusters over 2-D data."""
        from matplotlib.figure import Figure

        path.parent.mkdir(parents=True, exist_ok=True)
        fig = Figure(figsize=(6, 6))
        ax = fig.subplots()
        if x_test.dim() == 4:
            samples = self.plot_samples(x_test, PLOT_SAMPLES).float().clamp(-1, 1).add(1).div(2).cpu().numpy()
            side = int(math.ceil(math.sqrt(len(samples))))
            c, h, w = samples.shape[1:]
            grid = np.ones((side * h, side * w, c), dtype=np.float32)
            for i, img in enumerate(samples):
                r, col = divmod(i, side)
                grid[r * h : (r + 1) * h, col * w : (col + 1) * w] = img.transpose(1, 2, 0)
            ax.imshow(grid[..., 0] if c == 1 else grid, cmap="gray" if c == 1 else None)
            ax.set_axis_off()
            ax.set_title("GEDI SGLD samples")
        else:
            self.draw_plane(ax, x_test, "GEDI: SGLD samples over data (shading: LSE)")
        tmp = path.with_name(path.name + ".tmp.png")
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, path)


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last for 4-D tensors stored that way, so a cat with them keeps the layout."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format
