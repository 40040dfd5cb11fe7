"""Backbones and heads: registry, shapes, parameter counts, init, norm options, autocast."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from rrscale.config import BACKBONE_NAMES, BackboneConfig
from rrscale.nets.backbones import BACKBONES, build_backbone, group_count, make_norm
from rrscale.nets.heads import mlp, projector, relation_head

IMAGE_NAMES = [n for n in BACKBONE_NAMES if n != "mlp"]
FEATURE_DIM = {"conv4": 64, "resnet8": 64, "resnet32": 64, "resnet56": 64, "resnet18": 512, "resnet34": 512}


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_registry_keys_match_config() -> None:
    assert tuple(BACKBONES) == BACKBONE_NAMES


def test_unknown_backbone_lists_valid_names() -> None:
    # the config's Literal already rejects bad names, so bypass validation to reach the registry
    cfg = BackboneConfig.model_construct(name="vgg11", stem="imagenet", norm="batch")
    with pytest.raises(ValueError) as err:
        build_backbone(cfg)
    for name in BACKBONE_NAMES:
        assert name in str(err.value)


def test_data_kind_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="in_channels"):
        build_backbone(BackboneConfig(name="conv4"), in_channels=None, input_dim=2)
    with pytest.raises(ValueError, match="input_dim"):
        build_backbone(BackboneConfig(name="mlp"), in_channels=3, input_dim=None)


@pytest.mark.parametrize("name", ["conv4", "resnet8", "resnet32", "resnet56"])
def test_small_backbones_shape(name: str) -> None:
    torch.manual_seed(0)
    net = build_backbone(BackboneConfig(name=name), in_channels=3)
    out = net(torch.randn(2, 3, 16, 16))
    assert net.feature_dim == FEATURE_DIM[name]
    assert out.shape == (2, FEATURE_DIM[name])


@pytest.mark.parametrize("name", ["resnet18", "resnet34"])
@pytest.mark.parametrize("stem", ["imagenet", "cifar"])
def test_large_resnets_shape_both_stems(name: str, stem: str) -> None:
    torch.manual_seed(0)
    net = build_backbone(BackboneConfig(name=name, stem=stem), in_channels=3)
    out = net(torch.randn(2, 3, 32, 32))
    assert net.feature_dim == 512
    assert out.shape == (2, 512)
    first_conv = next(m for m in net.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.kernel_size == ((7, 7) if stem == "imagenet" else (3, 3))
    assert any(isinstance(m, nn.MaxPool2d) for m in net.modules()) == (stem == "imagenet")


def test_mlp_backbone() -> None:
    net = build_backbone(BackboneConfig(name="mlp", mlp_width=32, mlp_depth=3), in_channels=None, input_dim=2)
    assert net.feature_dim == 32
    assert net(torch.randn(5, 2)).shape == (5, 32)
    assert sum(isinstance(m, nn.Linear) for m in net.modules()) == 3
    assert sum(isinstance(m, nn.BatchNorm1d) for m in net.modules()) == 3


def test_parameter_counts() -> None:
    # conv4: conv weights 3*8*9 + 8*16*9 + 16*32*9 + 32*64*9 = 24,408, BN 2*(8+16+32+64) = 240.
    assert _params(build_backbone(BackboneConfig(name="conv4"))) == 24_648
    # resnet18/34 equal torchvision's counts (11,689,512 / 21,797,672) minus the 512*1000+1000 fc.
    assert _params(build_backbone(BackboneConfig(name="resnet18"))) == 11_176_512
    assert _params(build_backbone(BackboneConfig(name="resnet34"))) == 21_284_672
    assert _params(build_backbone(BackboneConfig(name="resnet8"))) == 77_392


@pytest.mark.parametrize("name", ["conv4", "resnet32"])
def test_init_statistics(name: str) -> None:
    torch.manual_seed(0)
    net = build_backbone(BackboneConfig(name=name))
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    big = max(convs, key=lambda m: m.weight.numel())
    k, c_out = big.kernel_size[0], big.out_channels
    expected = math.sqrt(2.0 / (k * k * c_out))
    assert big.weight.mean().abs().item() < 0.05 * expected
    assert big.weight.std().item() == pytest.approx(expected, rel=0.05)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.equal(m.weight, torch.ones_like(m.weight))
            assert torch.equal(m.bias, torch.zeros_like(m.bias))


@pytest.mark.parametrize("norm,kind", [("batch", nn.BatchNorm2d), ("group", nn.GroupNorm), ("none", None)])
def test_norm_options(norm: str, kind: type[nn.Module] | None) -> None:
    torch.manual_seed(0)
    net = build_backbone(BackboneConfig(name="resnet8", norm=norm))
    norms = [m for m in net.modules() if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm))]
    if kind is None:
        assert norms == []
    else:
        assert norms and all(isinstance(m, kind) for m in norms)
    out = net(torch.randn(3, 3, 8, 8))
    assert out.shape == (3, 64) and torch.isfinite(out).all()
    vec = build_backbone(BackboneConfig(name="mlp", norm=norm, mlp_width=12, mlp_depth=2), None, 4)
    assert vec(torch.randn(3, 4)).shape == (3, 12)


def test_group_count_divides() -> None:
    assert [group_count(c) for c in (1, 6, 8, 12, 16, 100, 512, 7)] == [1, 6, 8, 6, 8, 5, 8, 7]
    with pytest.raises(ValueError, match="batch, group, none"):
        make_norm("layer", 8, spatial=True)


def test_channels_last_matches_contiguous() -> None:
    torch.manual_seed(0)
    net = build_backbone(BackboneConfig(name="resnet8")).eval()
    x = torch.randn(2, 3, 16, 16)
    ref = net(x)
    out = net.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_autocast_bf16(norm: str) -> None:
    torch.manual_seed(0)
    net = build_backbone(BackboneConfig(name="conv4", norm=norm))
    x = torch.randn(4, 3, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x)
    assert out.shape == (4, 64) and torch.isfinite(out.float()).all()
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in net.parameters())


def test_mlp_builder_and_presets() -> None:
    head = relation_head(128, width=256)
    kinds = [type(m) for m in head]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.LeakyReLU, nn.Linear]
    assert head[0].in_features == 128 and head[0].out_features == 256 and head[3].out_features == 1
    assert head[2].negative_slope == 0.01
    deep = relation_head(64, width=32, depth=3)
    assert sum(isinstance(m, nn.Linear) for m in deep) == 4
    assert deep(torch.randn(5, 64)).shape == (5, 1)

    proj = projector(512, 2048, 10)
    assert [type(m) for m in proj] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert proj(torch.randn(4, 512)).shape == (4, 10)

    plain = mlp(8, 16, 3, depth=2, norm="none")
    block = [nn.Linear, nn.Identity, nn.ReLU]
    assert [type(m) for m in plain] == block + block + [nn.Linear]
    with pytest.raises(ValueError, match="relu, leaky_relu"):
        mlp(8, 16, 3, activation="gelu")
