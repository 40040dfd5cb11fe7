"""Method registry: ``method.name`` in the config picks the class, the backbone is shared."""

from __future__ import annotations

from torch import nn

from rrscale.config import ExperimentConfig
from rrscale.methods.base import Method, TrainingDiverged
from rrscale.nets.backbones import build_backbone


def _method_class(name: str) -> type[nn.Module]:
    if name == "relational":
        from rrscale.methods.relational import RelationalReasoning

        return RelationalReasoning
    if name == "gedi":
        from rrscale.methods.gedi import Gedi

        return Gedi
    raise ValueError(f"unknown method {name!r}; expected one of: relational, gedi")


def build_method(cfg: ExperimentConfig, in_channels: int | None, input_dim: int | None) -> nn.Module:
    """Backbone from ``cfg.backbone`` wrapped by the method class of ``cfg.method.name``.

    ``in_channels`` is set for image data, ``input_dim`` for vector data (toy sets, MLP).
    """
    backbone = build_backbone(cfg.backbone, in_channels=in_channels, input_dim=input_dim)
    return _method_class(cfg.method.name)(cfg.resolved_method(), backbone)


__all__ = ["Method", "TrainingDiverged", "build_method"]
