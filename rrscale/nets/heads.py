"""Heads on top of pooled backbone features: one MLP builder and the two presets the methods use.

RR's relation head (Patacchiola & Storkey, NeurIPS 2020, arXiv:2006.05849) and GEDI's
projector (Sansone & Manhaeve, arXiv:2401.00873) differ only in activation and widths, so both
are thin presets of :func:`mlp` with the papers' values (docs/methods.md §1, §2).
"""

from __future__ import annotations

from torch import nn

from rrscale.nets.backbones import make_norm

ACTIVATION_NAMES = ("relu", "leaky_relu")


def _activation(name: str, negative_slope: float) -> nn.Module:
    if name == "relu":
        return nn.ReLU(inplace=True)
    if name == "leaky_relu":
        return nn.LeakyReLU(negative_slope, inplace=True)
    raise ValueError(f"unknown activation {name!r}; expected one of: {', '.join(ACTIVATION_NAMES)}")


def mlp(
    in_dim: int,
    hidden: int,
    out_dim: int,
    depth: int = 1,
    norm: str = "batch",
    activation: str = "relu",
    negative_slope: float = 0.01,
) -> nn.Sequential:
    """``depth`` hidden blocks [Linear -> norm -> activation] of width ``hidden``, then Linear.

    ``(M, in_dim) -> (M, out_dim)``. ``norm`` is ``batch`` (BatchNorm1d), ``group`` or ``none``;
    ``activation`` is ``relu`` or ``leaky_relu`` (with ``negative_slope``). ``depth=0`` is a
    single linear layer.
    """
    if depth < 0:
        raise ValueError(f"mlp depth must be >= 0, got {depth}")
    layers: list[nn.Module] = []
    prev = in_dim
    for _ in range(depth):
        layers += [
            nn.Linear(prev, hidden),
            make_norm(norm, hidden, spatial=False),
            _activation(activation, negative_slope),
        ]
        prev = hidden
    layers.append(nn.Linear(prev, out_dim))
    return nn.Sequential(*layers)


def relation_head(in_dim: int, width: int = 256, depth: int = 1) -> nn.Sequential:
    """RR relation head: Linear(in, 256) -> BatchNorm1d -> LeakyReLU(0.01) -> Linear(256, 1).

    ``(M, in_dim) -> (M, 1)`` relation logits, one per aggregated pair; ``in_dim`` is 2d for
    ``cat`` aggregation and d otherwise. ``width`` is the paper's "head width" search axis and
    ``depth`` repeats the hidden block.
    """
    return mlp(in_dim, width, 1, depth=depth, norm="batch", activation="leaky_relu", negative_slope=0.01)


def projector(in_dim: int, width: int, out_dim: int, norm: str = "batch") -> nn.Sequential:
    """GEDI projector: Linear(d, H) -> norm -> ReLU -> Linear(H, c); ``norm`` batch (the paper's), group or none.

    ``(N, d) -> (N, c)`` cluster logits (before the temperature). The norm is a switch because it
    decides whether GEDI trains at all: on two moons a BatchNorm projector collapsed every seed
    to one cluster where the same model without it reached NMI 0.98 (issue 7).
    """
    return mlp(in_dim, width, out_dim, depth=1, norm=norm, activation="relu")
