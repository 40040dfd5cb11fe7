"""Persistent SGLD: the sampler behind GEDI's generative (energy-based) term.

GEDI (Sansone & Manhaeve, arXiv:2401.00873, docs/methods.md §2) trains its energy model
E(x) = -LSE(x) by contrastive divergence and takes the negative samples from persistent
stochastic-gradient Langevin dynamics with JEM's recipe (Grathwohl et al., "Your Classifier is
Secretly an Energy Based Model", ICLR 2020): a replay buffer of past samples, each chain
restarted from U(-1, 1) noise with a small probability, ``steps`` updates
x <- x + step_size * grad_x LSE(x) + noise * eps, eps ~ N(0, I), and the end points written back.

Precision: the sampler runs under whatever autocast the caller has (bf16 on CUDA in the
engine). The chain state, the update and the buffer stay fp32, and GEDI computes its logits
and LSE in fp32; only the network's matmuls/convolutions run in bf16. Measured with CPU bf16
autocast on conv4 (batch, group and no norm) at tau = 0.1: the bf16 input gradient has cosine
similarity >= 0.97 (mean 0.99) with the fp32 one and 20-step chains end within 2.5% (relative
to the distance moved) of the fp32 chains; keeping the whole sampler in fp32 would slow the
dominant cost of a GEDI step for no measurable gain. ``tests/test_gedi.py`` keeps this checked.

The buffer lives on the data's device (no host round trip per step) and the whole batch of
chains is updated at once. It is created on the first call, in the shape of the data, so a
method that never samples (GEDI with lambda_gen = 0) never allocates it. It is not part of a
checkpoint: a resumed run restarts its chains from noise, as JEM's own buffer re-initialisation
does for a fraction of them at every step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from rrscale.config import SGLDConfig

Score = Callable[[torch.Tensor], torch.Tensor]
"""``(B, *shape) -> (B,)`` log-density up to a constant (GEDI: LSE(x)); differentiable in x."""


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Put every submodule of ``module`` in eval mode, then restore each one's own previous mode.

    Restoring per submodule (not ``module.train(was_training)``) keeps mixed states intact, e.g.
    a frozen BatchNorm inside a training model.
    """
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def uniform_noise(shape: tuple[int, ...], device: torch.device | str) -> torch.Tensor:
    """U(-1, 1) samples in fp32: the range data is scaled to for GEDI (``symmetric_input``)."""
    return torch.rand(shape, device=device).mul_(2.0).sub_(1.0)


def langevin(score: Score, x0: torch.Tensor, steps: int, step_size: float, noise: float) -> torch.Tensor:
    """``steps`` SGLD updates x <- x + step_size * grad_x score(x) + noise * eps from ``x0``.

    ``x0`` is ``(B, *shape)``; returns the end points ``(B, *shape)`` in fp32, detached. Only the
    gradient with respect to x is requested (``torch.autograd.grad``), so no parameter's
    ``.grad`` is touched. The chain state stays in fp32 even when ``score`` runs under bf16
    autocast: the gradient is cast up before the update, so small steps are not rounded away.
    Works inside ``torch.no_grad()`` callers (gradients are enabled locally).
    """
    x = x0.detach().float()
    with torch.enable_grad():
        for _ in range(steps):
            x.requires_grad_(True)
            (grad,) = torch.autograd.grad(score(x).sum(), x)
            x = x.detach() + step_size * grad.float()
            if noise > 0:
                x = x + noise * torch.randn_like(x)
    return x.detach()


class PersistentSGLD:
    """JEM-style persistent SGLD with a device-resident replay buffer (docs/methods.md §2).

    ``sample(model, score, batch_size, like)`` draws ``batch_size`` distinct buffer slots,
    restarts each chain from U(-1, 1) with probability ``cfg.reinit_prob``, runs
    ``cfg.steps`` Langevin steps with ``model`` in eval mode (BatchNorm uses running statistics,
    so the samples do not leak into the batch statistics; every submodule's mode is restored
    afterwards), writes the end points back to their slots and returns them detached.

    Counters for tests and monitoring: ``calls``, ``drawn`` (chains advanced) and
    ``reinitialised`` (a device tensor, so counting costs no host sync); ``reinit_rate`` is
    their ratio.
    """

    def __init__(self, cfg: SGLDConfig) -> None:
        self.cfg = cfg
        self.buffer: torch.Tensor | None = None
        self.calls = 0
        self.drawn = 0
        self.reinitialised: torch.Tensor | int = 0

    @property
    def reinit_rate(self) -> float:
        """Fraction of drawn chains that were restarted from noise (0.0 before the first call)."""
        return float(self.reinitialised) / self.drawn if self.drawn else 0.0

    def _buffer_for(self, like: torch.Tensor) -> torch.Tensor:
        shape = tuple(like.shape[1:])
        if self.buffer is None:
            self.buffer = uniform_noise((self.cfg.buffer_size, *shape), like.device)
        elif tuple(self.buffer.shape[1:]) != shape:
            raise ValueError(
                f"SGLD buffer holds samples of shape {tuple(self.buffer.shape[1:])}, got data of shape {shape}"
            )
        elif self.buffer.device != like.device:
            self.buffer = self.buffer.to(like.device)
        return self.buffer

    def sample(self, model: nn.Module, score: Score, batch_size: int, like: torch.Tensor) -> torch.Tensor:
        """``(batch_size, *like.shape[1:])`` fp32 samples on ``like.device``, detached.

        ``score`` maps a batch to per-sample log-densities (GEDI: ``Gedi.lse``); ``model`` is
        the module whose train/eval mode is switched while sampling.
        """
        if not 1 <= batch_size <= self.cfg.buffer_size:
            raise ValueError(
                f"SGLD batch size must be between 1 and buffer_size={self.cfg.buffer_size}, got {batch_size}"
            )
        buffer = self._buffer_for(like)
        slots = torch.randperm(self.cfg.buffer_size, device=buffer.device)[:batch_size]
        start = buffer[slots]
        restart = torch.rand(batch_size, device=buffer.device) < self.cfg.reinit_prob
        fresh = uniform_noise(tuple(start.shape), buffer.device)
        start = torch.where(restart.view(-1, *([1] * (start.dim() - 1))), fresh, start)
        with eval_mode(model):
            samples = langevin(score, start, self.cfg.steps, self.cfg.step_size, self.cfg.noise)
        buffer[slots] = samples
        self.calls += 1
        self.drawn += batch_size
        self.reinitialised = self.reinitialised + restart.sum()
        return samples
