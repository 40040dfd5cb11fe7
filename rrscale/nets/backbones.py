"""Feature extractors: every backbone maps a batch to pooled features of shape ``(N, feature_dim)``.

The table in ``docs/methods.md`` §1 (Patacchiola & Storkey, "Self-Supervised Relational
Reasoning for Representation Learning", NeurIPS 2020, arXiv:2006.05849) fixes the image
backbones: a narrow Conv-4, the CIFAR ResNets of He et al. ("Deep Residual Learning for Image
Recognition", CVPR 2016, §4.2) and the torchvision-style ResNet-18/34. The method heads see the
global-average-pooled vector directly, so no backbone has a classifier layer.

Normalisation is a config field (``batch``/``group``/``none``) rather than hard-wired BatchNorm
because GEDI's SGLD sampler and BatchNorm mix badly (docs/methods.md §2); the ResNets are
written here instead of wrapping ``torchvision.models`` so that this switch reaches every layer.
Inputs may be ``channels_last`` and the forward passes run under autocast: the only ops are
convolutions, norms, pooling and a spatial mean, which keep the memory format and the autocast
dtype.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from rrscale.config import BackboneConfig

NORM_NAMES = ("batch", "group", "none")
MAX_GROUPS = 8


def group_count(channels: int) -> int:
    """Largest divisor of ``channels`` that is at most 8: GroupNorm needs groups dividing C."""
    return max(g for g in range(1, min(MAX_GROUPS, channels) + 1) if channels % g == 0)


def make_norm(kind: str, channels: int, spatial: bool) -> nn.Module:
    """Normalisation layer for ``(N, C, H, W)`` (``spatial``) or ``(N, C)`` activations.

    ``batch`` is BatchNorm (the paper's choice), ``group`` GroupNorm (Wu & He, ECCV 2018) with
    :func:`group_count` groups, ``none`` an identity, for SGLD-friendly GEDI backbones.
    """
    if kind == "batch":
        return nn.BatchNorm2d(channels) if spatial else nn.BatchNorm1d(channels)
    if kind == "group":
        return nn.GroupNorm(group_count(channels), channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}; expected one of: {', '.join(NORM_NAMES)}")


def init_conv_and_norm(module: nn.Module) -> None:
    """The paper's init: conv weights ~ N(0, sqrt(2 / (k*k*C_out))), norm gamma=1, beta=0.

    That is He (Kaiming) normal init in fan-out mode for ReLU; it is also torchvision's ResNet
    init, so every convolutional backbone here uses it.
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _global_pool(x: torch.Tensor) -> torch.Tensor:
    """``(N, C, H, W) -> (N, C)`` spatial mean; works for any memory format and any H, W >= 1."""
    return x.mean(dim=(2, 3))


class Conv4(nn.Module):
    """RR's narrow Conv-4: 4 x [conv3x3 (no bias) -> norm -> ReLU -> pool], channels 8/16/32/64.

    Blocks 1-3 end in AvgPool2d(2); block 4 ends in the global average pool, which for the even
    feature maps of 32x32 inputs equals AvgPool2d(2) followed by a global mean, and also accepts
    inputs as small as 8x8. ``(N, C_in, H, W) -> (N, 64)``; 24,648 parameters for RGB with
    BatchNorm. Deliberately not the 64-channel few-shot Conv-4 (docs/methods.md §1).
    """

    CHANNELS = (8, 16, 32, 64)

    def __init__(self, in_channels: int = 3, norm: str = "batch") -> None:
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_channels
        for i, ch in enumerate(self.CHANNELS):
            layers += [
                nn.Conv2d(prev, ch, kernel_size=3, padding=1, bias=False),
                make_norm(norm, ch, spatial=True),
                nn.ReLU(inplace=True),
            ]
            if i < len(self.CHANNELS) - 1:
                layers.append(nn.AvgPool2d(2))
            prev = ch
        self.features = nn.Sequential(*layers)
        self.feature_dim = self.CHANNELS[-1]
        init_conv_and_norm(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _global_pool(self.features(x))


class BasicBlock(nn.Module):
    """Residual block of He et al. 2016: two 3x3 convs; 1x1 conv + norm shortcut on shape change.

    ``(N, C_in, H, W) -> (N, C_out, H/stride, W/stride)``.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, norm: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.norm1 = make_norm(norm, out_channels, spatial=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = make_norm(norm, out_channels, spatial=True)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                make_norm(norm, out_channels, spatial=True),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


def _stage(in_channels: int, out_channels: int, blocks: int, stride: int, norm: str) -> nn.Sequential:
    """``blocks`` BasicBlocks; only the first one changes stride/width."""
    layers = [BasicBlock(in_channels, out_channels, stride, norm)]
    layers += [BasicBlock(out_channels, out_channels, 1, norm) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class ResNet(nn.Module):
    """BasicBlock ResNets of He et al. 2016: the CIFAR family and the torchvision-style 18/34.

    ``widths`` (16, 32, 64) with ``stem="cifar"`` and ``blocks`` (1,1,1) / (5,5,5) / (9,9,9) are
    the CIFAR ResNet-8/32/56 of §4.2 (64-d features); widths (64, 128, 256, 512) with blocks
    (2,2,2,2) / (3,4,6,3) are ResNet-18/34 (512-d). ``stem="imagenet"`` keeps the 7x7 stride-2
    conv + 3x3 max-pool, as the RR paper did even on 32x32 images; ``stem="cifar"`` is a 3x3
    stride-1 conv without max-pool. The stem is an explicit config field, never inferred from
    the dataset. ``(N, C_in, H, W) -> (N, widths[-1])``.
    """

    def __init__(
        self,
        blocks: tuple[int, ...],
        widths: tuple[int, ...],
        in_channels: int = 3,
        norm: str = "batch",
        stem: str = "imagenet",
    ) -> None:
        super().__init__()
        w0 = widths[0]
        if stem == "imagenet":
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, w0, 7, stride=2, padding=3, bias=False),
                make_norm(norm, w0, spatial=True),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
            )
        elif stem == "cifar":
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, w0, 3, padding=1, bias=False),
                make_norm(norm, w0, spatial=True),
                nn.ReLU(inplace=True),
            )
        else:
            raise ValueError(f"unknown stem {stem!r}; expected one of: imagenet, cifar")
        stages = []
        prev = w0
        for i, (width, count) in enumerate(zip(widths, blocks)):
            stages.append(_stage(prev, width, count, 1 if i == 0 else 2, norm))
            prev = width
        self.stages = nn.Sequential(*stages)
        self.feature_dim = widths[-1]
        init_conv_and_norm(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _global_pool(self.stages(self.stem(x)))


CIFAR_WIDTHS = (16, 32, 64)
IMAGENET_WIDTHS = (64, 128, 256, 512)


class MLPBackbone(nn.Module):
    """Backbone for vector data (toy sets such as two moons): ``depth`` x [Linear -> norm -> ReLU].

    ``(N, input_dim) -> (N, width)``; ``feature_dim = width``.
    """

    def __init__(self, input_dim: int, width: int = 128, depth: int = 3, norm: str = "batch") -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"mlp backbone depth must be >= 1, got {depth}")
        layers: list[nn.Module] = []
        prev = input_dim
        for _ in range(depth):
            layers += [nn.Linear(prev, width), make_norm(norm, width, spatial=False), nn.ReLU(inplace=True)]
            prev = width
        self.layers = nn.Sequential(*layers)
        self.feature_dim = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def _image_channels(cfg: BackboneConfig, in_channels: int | None) -> int:
    if in_channels is None:
        raise ValueError(
            f"backbone {cfg.name!r} needs image data (in_channels); for vector data use one of: "
            f"{', '.join(VECTOR_BACKBONES)}"
        )
    return in_channels


def _vector_dim(cfg: BackboneConfig, input_dim: int | None) -> int:
    if input_dim is None:
        images = [k for k in BACKBONES if k not in VECTOR_BACKBONES]
        raise ValueError(
            f"backbone {cfg.name!r} needs vector data (input_dim); for images use one of: {', '.join(images)}"
        )
    return input_dim


BackboneFactory = Callable[[BackboneConfig, int | None, int | None], nn.Module]
"""``(cfg, in_channels, input_dim) -> backbone``; raises ``ValueError`` if the data kind does not fit."""

BACKBONES: dict[str, BackboneFactory] = {
    "conv4": lambda cfg, c, d: Conv4(_image_channels(cfg, c), cfg.norm),
    "resnet8": lambda cfg, c, d: ResNet((1, 1, 1), CIFAR_WIDTHS, _image_channels(cfg, c), cfg.norm, "cifar"),
    "resnet32": lambda cfg, c, d: ResNet((5, 5, 5), CIFAR_WIDTHS, _image_channels(cfg, c), cfg.norm, "cifar"),
    "resnet56": lambda cfg, c, d: ResNet((9, 9, 9), CIFAR_WIDTHS, _image_channels(cfg, c), cfg.norm, "cifar"),
    "resnet18": lambda cfg, c, d: ResNet(
        (2, 2, 2, 2), IMAGENET_WIDTHS, _image_channels(cfg, c), cfg.norm, cfg.stem
    ),
    "resnet34": lambda cfg, c, d: ResNet(
        (3, 4, 6, 3), IMAGENET_WIDTHS, _image_channels(cfg, c), cfg.norm, cfg.stem
    ),
    "mlp": lambda cfg, c, d: MLPBackbone(_vector_dim(cfg, d), cfg.mlp_width, cfg.mlp_depth, cfg.norm),
}
VECTOR_BACKBONES = ("mlp",)


def build_backbone(
    cfg: BackboneConfig, in_channels: int | None = 3, input_dim: int | None = None
) -> nn.Module:
    """Backbone ``cfg.name`` for images with ``in_channels`` channels or vectors of ``input_dim``.

    The result maps a batch to ``(N, feature_dim)`` and has an int attribute ``feature_dim``.
    Raises ``ValueError`` for an unknown name (listing the registry's keys) or for a backbone
    that does not fit the data kind (an image backbone without ``in_channels``, ``mlp`` without
    ``input_dim``).
    """
    if cfg.name not in BACKBONES:
        raise ValueError(f"unknown backbone {cfg.name!r}; expected one of: {', '.join(BACKBONES)}")
    return BACKBONES[cfg.name](cfg, in_channels, input_dim)
