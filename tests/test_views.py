"""Batched views (rrscale.data.views) against their definition and torchvision's per-image recipe.

Exact checks pin each piece (crop box, flip, every jitter op, the op order) to torchvision's
functional ops; statistical checks compare the whole randomised pipeline with torchvision's
v1 transforms applied image by image, with tolerances chosen (by mutating the recipe) to fail
on a wrong crop scale, a missing jitter probability, a wrong hue range or grayscale rate.
"""

from __future__ import annotations

import io
import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF

from rrscale.config import ViewsConfig
from rrscale.data.views import (
    BRIGHTNESS,
    CONTRAST,
    HUE,
    SATURATION,
    ImageViews,
    VectorViews,
    adjust_hue_,
    build_views,
    color_jitter_,
    crop_flip,
    crop_grid,
    sample_crop_boxes,
    to_model_input,
)
from rrscale.data.view_stats import (
    MEAN,
    STAT_TOL,
    STD,
    compare_statistics,
    denorm,
    device_statistics,
    smooth_images,
    summary,
)

NO_AUG = dict(crop_min_scale=1.0, flip_prob=0.0, jitter_prob=0.0, gray_prob=0.0)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors and a shared CI CPU: thread hand-offs would dominate the test's time."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def load_cifar_mini(root: Path, n: int) -> torch.Tensor:
    import pyarrow.parquet as pq
    from PIL import Image

    table = pq.read_table(root / "train.parquet", columns=["image"]).slice(0, n)
    imgs = [np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in table["image"].to_pylist()]
    return torch.from_numpy(np.stack(imgs))


def torchvision_views(x: torch.Tensor, cfg: ViewsConfig, repeats: int, seed: int) -> torch.Tensor:
    """torchvision v1 per-image recipe (methods.md §1) on [0, 1] float tensors, normalised."""
    side = x.shape[1]
    pipeline = T.Compose(
        [
            T.RandomResizedCrop(side, scale=(cfg.crop_min_scale, 1.0)),
            T.RandomHorizontalFlip(cfg.flip_prob),
            T.RandomApply([T.ColorJitter(cfg.jitter, cfg.jitter, cfg.jitter, cfg.hue)], p=cfg.jitter_prob),
            T.RandomGrayscale(cfg.gray_prob),
            T.Normalize(MEAN, STD),
        ]
    )
    torch.manual_seed(seed)
    src = x.permute(0, 3, 1, 2).float() / 255.0
    return torch.stack([pipeline(img) for _ in range(repeats) for img in src])


# --------------------------------------------------------------------------- model input


def test_to_model_input_normalises_and_scales():
    x = smooth_images(4)
    out = to_model_input(x, MEAN, STD)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    ref = (x.permute(0, 3, 1, 2).float() / 255 - mean) / std
    assert out.shape == (4, 3, 32, 32) and out.dtype == torch.float32 and out.is_contiguous()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)

    edges = x.clone()
    edges[0], edges[1] = 0, 255  # the range must hold exactly at black and white
    sym = to_model_input(edges, MEAN, STD, symmetric=True)
    torch.testing.assert_close(sym, edges.permute(0, 3, 1, 2).float() / 127.5 - 1, atol=1e-6, rtol=0)
    assert sym.min() == -1 and 1 - 1e-6 < sym.max() <= 1

    half = to_model_input(x, MEAN, STD, dtype=torch.bfloat16, channels_last=True)
    assert half.dtype == torch.bfloat16 and half.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(half.float(), ref, atol=0.05, rtol=0.01)


def test_to_model_input_vectors_pass_through():
    v = torch.randn(5, 2, dtype=torch.float64)
    out = to_model_input(v, MEAN, STD)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, v.float())


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError):
        to_model_input(torch.zeros(2, 8, 8, 4, dtype=torch.uint8), MEAN, STD)
    with pytest.raises(ValueError):
        to_model_input(torch.zeros(2, 8, 8, 3, dtype=torch.uint8), (0.5, 0.5), STD)
    with pytest.raises(ValueError):
        build_views(ViewsConfig(), torch.zeros(2, 3, 8, 8), MEAN, STD)


# --------------------------------------------------------------------------- layout and randomness


def test_identity_recipe_gives_the_model_input_in_augmentation_major_blocks():
    x = smooth_images(5)
    views = ImageViews(ViewsConfig(**NO_AUG), MEAN, STD)(x, 3)
    assert views.shape == (15, 3, 32, 32)
    ref = to_model_input(x, MEAN, STD)
    torch.testing.assert_close(views, ref.repeat(3, 1, 1, 1), atol=1e-5, rtol=0)


def test_views_of_constant_images_come_from_their_source_block():
    n, k = 6, 4
    x = (torch.arange(n, dtype=torch.uint8) * 40).view(n, 1, 1, 1).expand(n, 32, 32, 3).contiguous()
    cfg = ViewsConfig(crop_min_scale=0.08, flip_prob=0.5, jitter_prob=0.0, gray_prob=0.5)
    views = ImageViews(cfg, (0.0,), (1.0,))(x, k, torch.Generator().manual_seed(0))
    expect = (torch.arange(n) * 40 / 255.0).repeat(k)
    torch.testing.assert_close(views.mean((1, 2, 3)), expect, atol=1e-5, rtol=0)
    assert (views.amax((1, 2, 3)) - views.amin((1, 2, 3))).max() < 1e-5


def test_every_view_has_its_own_parameters_and_the_generator_reproduces_them():
    x = smooth_images(1).expand(16, 32, 32, 3).contiguous()
    maker = ImageViews(ViewsConfig(), MEAN, STD)
    a = maker(x, 4, torch.Generator().manual_seed(1))
    flat = a.flatten(1)
    close = (flat[:, None] - flat[None]).abs().amax(-1) < 1e-3
    assert close.sum() == len(flat)  # only the diagonal: 64 different views of one image
    torch.testing.assert_close(maker(x, 4, torch.Generator().manual_seed(1)), a, atol=0, rtol=0)
    assert not torch.allclose(maker(x, 4, torch.Generator().manual_seed(2)), a)
    torch.manual_seed(3)
    b = maker(x, 4)
    assert not torch.allclose(maker(x, 4), b)


def test_output_ranges():
    x = smooth_images(8)
    x[0], x[1] = 0, 255
    sym = ImageViews(ViewsConfig(), MEAN, STD, symmetric=True)(x, 8, torch.Generator().manual_seed(0))
    assert sym.min() >= -1 and sym.max() <= 1
    views = ImageViews(ViewsConfig(), MEAN, STD)(x, 8, torch.Generator().manual_seed(0))
    d = denorm(views)
    assert d.min() >= -1e-5 and d.max() <= 1 + 1e-5


def test_dtype_channels_last_and_other_sizes():
    x = smooth_images(3, size=96)
    views = ImageViews(ViewsConfig(), (0.5,) * 3, (0.5,) * 3, dtype=torch.bfloat16, channels_last=True)(x, 2)
    assert views.shape == (6, 3, 96, 96) and views.dtype == torch.bfloat16
    assert views.is_contiguous(memory_format=torch.channels_last)
    small = ImageViews(ViewsConfig(), (0.5,) * 3, (0.5,) * 3, out_size=64)(x, 2)
    assert small.shape == (6, 3, 64, 64)


def test_single_channel_images():
    x = smooth_images(4, channels=1)
    views = ImageViews(ViewsConfig(jitter_prob=1.0), (0.5,), (0.5,), symmetric=True)(x, 3)
    assert views.shape == (12, 1, 32, 32)
    assert views.min() >= -1 and views.max() <= 1
    ident = ImageViews(ViewsConfig(**NO_AUG), (0.5,), (0.5,))(x, 2)
    torch.testing.assert_close(ident, to_model_input(x, (0.5,), (0.5,)).repeat(2, 1, 1, 1), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- exact pieces


def test_flip_only_gives_the_mirrored_image():
    x = smooth_images(4)
    cfg = ViewsConfig(**{**NO_AUG, "flip_prob": 1.0})
    views = ImageViews(cfg, MEAN, STD)(x, 2)
    mirrored = to_model_input(x, MEAN, STD).flip(-1).repeat(2, 1, 1, 1)
    torch.testing.assert_close(views, mirrored, atol=1e-5, rtol=0)


@pytest.mark.parametrize("size,out_size", [(32, 32), (96, 96), (32, 24)])
def test_crop_box_matches_torchvision_resized_crop(size, out_size):
    x = smooth_images(6, size=size).permute(0, 3, 1, 2).float() / 255
    gen = torch.Generator().manual_seed(size)
    boxes = []
    for _ in range(6):
        h, w = (int(v) for v in torch.randint(3, size + 1, (2,), generator=gen))
        top = int(torch.randint(0, size - h + 1, (1,), generator=gen))
        left = int(torch.randint(0, size - w + 1, (1,), generator=gen))
        boxes.append((top, left, h, w))
    boxes[0] = (0, 0, size, size)
    flips = torch.tensor([False, True, False, True, False, True])
    out = crop_flip(x, torch.tensor(boxes), flips, out_size)
    for img, (top, left, h, w), flip, got in zip(x, boxes, flips, out):
        ref = TF.resized_crop(img, top, left, h, w, [out_size, out_size], antialias=False)
        ref = ref.flip(-1) if flip else ref
        torch.testing.assert_close(got, ref, atol=2e-5, rtol=0)


def test_crop_grid_is_the_clamped_affine_grid():
    boxes = torch.tensor([[0, 0, 32, 32], [3, 5, 10, 20], [10, 0, 22, 7], [1, 2, 30, 29]])
    flips = torch.tensor([False, True, False, True])
    top, left, h, w = boxes.float().unbind(1)
    theta = torch.zeros(4, 2, 3)
    theta[:, 0, 0] = torch.where(flips, -w / 32, w / 32)
    theta[:, 0, 2] = (2 * left + w) / 32 - 1
    theta[:, 1, 1] = h / 32
    theta[:, 1, 2] = (2 * top + h) / 32 - 1
    ref = torch.nn.functional.affine_grid(theta, [4, 3, 24, 24], align_corners=False)
    lo = torch.stack([(2 * left + 1) / 32 - 1, (2 * top + 1) / 32 - 1], 1).view(4, 1, 1, 2)
    hi = torch.stack([(2 * (left + w) - 1) / 32 - 1, (2 * (top + h) - 1) / 32 - 1], 1).view(4, 1, 1, 2)
    got = crop_grid(boxes, flips, 32, 32, 24)
    torch.testing.assert_close(got, ref.clamp(min=lo, max=hi), atol=1e-6, rtol=0)


def _reference_jitter(img, b, c, s, h, order):
    ops = {
        BRIGHTNESS: lambda t: TF.adjust_brightness(t, b),
        CONTRAST: lambda t: TF.adjust_contrast(t, c),
        SATURATION: lambda t: TF.adjust_saturation(t, s),
        HUE: lambda t: TF.adjust_hue(t, h),
    }
    for op in order:
        img = ops[int(op)](img)
    return img


@pytest.mark.parametrize("channels", [3, 1])
def test_color_jitter_matches_torchvision_ops_in_each_order(channels):
    m = 48
    gen = torch.Generator().manual_seed(channels)
    x = smooth_images(m, size=16, channels=channels, seed=5).permute(0, 3, 1, 2).float() / 255
    factors = 0.2 + 1.6 * torch.rand(m, 3, generator=gen)
    hue = 0.4 * torch.rand(m, generator=gen) - 0.2
    order = torch.rand(m, 4, generator=gen).argsort(1)
    got = color_jitter_(x.clone(), factors, hue, order)
    for i in range(m):
        ref = _reference_jitter(x[i], *factors[i].tolist(), float(hue[i]), order[i])
        # torchvision's luma weighs red 0.2989 instead of ITU-R 601's 0.299
        torch.testing.assert_close(got[i], ref, atol=2e-3, rtol=0)


def test_color_jitter_order_matters_and_is_respected():
    x = smooth_images(1, size=16, seed=2).permute(0, 3, 1, 2).float() / 255
    x = x.expand(24, -1, -1, -1)
    order = torch.tensor(list(itertools.permutations(range(4))))
    factors = torch.tensor([[1.7, 0.3, 1.6]]).expand(24, 3)
    hue = torch.full((24,), 0.15)
    got = color_jitter_(x.clone(), factors, hue, order)
    flat = got.flatten(1)
    assert (flat[:, None] - flat[None]).abs().amax(-1).fill_diagonal_(1).min() > 1e-2
    for i in range(24):
        ref = _reference_jitter(x[i], 1.7, 0.3, 1.6, 0.15, order[i])
        torch.testing.assert_close(got[i], ref, atol=2e-3, rtol=0)


def test_hue_matches_torchvision_exactly():
    x = torch.rand(64, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    x[:8] = x[:8, :1]  # gray pixels: hue undefined, must stay unchanged
    x[8:16, 1] = x[8:16, 0]  # ties between the max channels
    shift = torch.linspace(-0.5, 0.5, 64)
    got = adjust_hue_(x.clone(), shift)
    ref = torch.stack([TF.adjust_hue(img, float(s)) for img, s in zip(x, shift)])
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_crop_box_sampling_matches_torchvision_distribution():
    m = 4000
    gen = torch.Generator().manual_seed(0)
    for size, min_scale in [((32, 32), 0.08), ((32, 32), 1.0), ((20, 40), 0.08)]:
        u = torch.rand(m, 22, generator=gen)
        boxes = sample_crop_boxes(u[:, :20], u[:, 20:], *size, min_scale)
        top, left, h, w = boxes.unbind(1)
        assert (top >= 0).all() and (left >= 0).all()
        assert (top + h <= size[0]).all() and (left + w <= size[1]).all()
        torch.manual_seed(1)
        img = torch.zeros(1, *size)
        ref = torch.tensor(
            [T.RandomResizedCrop.get_params(img, [min_scale, 1.0], [3 / 4, 4 / 3]) for _ in range(m)]
        )
        area = (boxes[:, 2] * boxes[:, 3]).double().mean() / (size[0] * size[1])
        area_ref = (ref[:, 2] * ref[:, 3]).double().mean() / (size[0] * size[1])
        assert abs(area - area_ref) < 0.02, (size, min_scale, area, area_ref)
        log_ratio, log_ratio_ref = (w / h).log(), (ref[:, 3] / ref[:, 2]).log()
        assert abs(log_ratio.mean() - log_ratio_ref.mean()) < 0.02
        assert abs(log_ratio.std() - log_ratio_ref.std()) < 0.02
        centre, centre_ref = (left + w / 2).double().mean(), (ref[:, 1] + ref[:, 3] / 2).double().mean()
        assert abs(centre - centre_ref) < 0.02 * size[1]
        if min_scale == 1.0:  # a fitting try or the fallback: always the whole square image
            assert (boxes == torch.tensor([0, 0, *size])).all()


# --------------------------------------------------------------------------- statistics vs torchvision


def _compare(ours: torch.Tensor, theirs: torch.Tensor, tol: dict[str, float]) -> None:
    """Every statistic of ``tol`` (limits measured: see rrscale.data.view_stats.STAT_TOL)."""
    for check in compare_statistics(ours, theirs, tol):
        assert check.ok, check.describe()


def _stats_case(
    x: torch.Tensor, cfg: ViewsConfig, repeats: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    ours = ImageViews(cfg, MEAN, STD)(x, repeats, torch.Generator().manual_seed(seed))
    return ours, torchvision_views(x, cfg, repeats, seed)


def test_statistics_match_torchvision_on_smooth_images():
    ours, theirs = _stats_case(smooth_images(256, seed=7), ViewsConfig(), 8, 0)
    _compare(ours, theirs, STAT_TOL)
    assert abs(summary(ours)["gray_fraction"] - 0.2) < 0.05


def test_statistics_match_torchvision_on_cifar_mini(cifar10_mini):
    ours, theirs = _stats_case(load_cifar_mini(cifar10_mini, 256), ViewsConfig(), 8, 1)
    _compare(ours, theirs, STAT_TOL)
    assert abs(summary(ours)["gray_fraction"] - 0.2) < 0.05


def test_jitter_distribution_matches_torchvision_on_a_constant_colour():
    """A flat orange image isolates the jitter: crop and flip leave it unchanged.

    Limits by measurement (5 seeds, 2,000 views): ours vs torchvision differ by at most
    0.021 (channel mean), 0.014 (channel std), 0.010 (hue std, radians); hue 0 / 0.1 / 0.5
    moves the hue std by 0.3-1.0, jitter_prob 1.0 by 0.08 and the untouched fraction by 0.16.
    """
    x = torch.tensor([200, 90, 40], dtype=torch.uint8).view(1, 1, 1, 3).expand(1, 8, 8, 3).contiguous()
    cfg = ViewsConfig()
    ours = denorm(ImageViews(cfg, MEAN, STD)(x.expand(2000, 8, 8, 3), 1, torch.Generator().manual_seed(0)))
    theirs = denorm(torchvision_views(x, cfg, 2000, 0))
    a, b = ours[:, :, 0, 0], theirs[:, :, 0, 0]
    torch.testing.assert_close(a.mean(0), b.mean(0), atol=0.03, rtol=0)
    torch.testing.assert_close(a.std(0), b.std(0), atol=0.022, rtol=0)

    def untouched(c: torch.Tensor) -> float:
        return float(((c - x[0, 0, 0].float() / 255).abs().amax(1) < 1e-4).float().mean())

    def gray(c: torch.Tensor) -> float:
        return float(((c.amax(1) - c.amin(1)) < 1e-4).float().mean())

    def hue_std(c: torch.Tensor) -> float:
        c = c[(c.amax(1) - c.amin(1)) > 0.05]
        return float(torch.atan2(math.sqrt(3) * (c[:, 1] - c[:, 2]), 2 * c[:, 0] - c[:, 1] - c[:, 2]).std())

    for c in (a, b):
        assert abs(untouched(c) - 0.16) < 0.035  # neither jittered nor gray: (1 - 0.8) * (1 - 0.2)
        assert abs(gray(c) - 0.2) < 0.04
    assert abs(hue_std(a) - hue_std(b)) < 0.04, (hue_std(a), hue_std(b))


def test_crop_areas_match_torchvision_on_a_position_coded_image():
    """Channel 0 encodes the column and channel 1 the row (8 levels per pixel), so the range of
    each channel in a view recovers its crop's width and height exactly.

    Limits by measurement (8,000 views, standard error of the mean-area difference ~0.004):
    the same recipe differs by <0.006 in mean area, a min scale of 0.04 or 0.2 instead of 0.08
    by 0.024 and 0.055.
    """
    side = 32
    col = (torch.arange(side) * 8).view(1, side).expand(side, side)
    x = torch.stack([col, col.t(), torch.zeros(side, side, dtype=torch.long)], -1).to(torch.uint8)[None]
    cfg = ViewsConfig(flip_prob=0.5, jitter_prob=0.0, gray_prob=0.0)
    reps = 8000
    many = x.expand(reps, side, side, 3)
    ours = denorm(ImageViews(cfg, MEAN, STD)(many, 1, torch.Generator().manual_seed(0)))
    theirs = denorm(torchvision_views(x, cfg, reps, 0))

    def box_sizes(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lo_w, hi_w = v[:, 0].flatten(1).aminmax(dim=1)
        lo_h, hi_h = v[:, 1].flatten(1).aminmax(dim=1)
        return ((hi_w - lo_w) * 255 / 8 + 1).round(), ((hi_h - lo_h) * 255 / 8 + 1).round()

    (wa, ha), (wb, hb) = box_sizes(ours), box_sizes(theirs)
    area_a, area_b = wa * ha / side**2, wb * hb / side**2
    assert abs(area_a.mean() - area_b.mean()) < 0.015, (area_a.mean(), area_b.mean())
    for q in (0.1, 0.5, 0.9):
        assert abs(area_a.quantile(q) - area_b.quantile(q)) < 0.06
    assert abs((wa / ha).log().std() - (wb / hb).log().std()) < 0.015
    assert area_a.min() >= 0.06 and area_a.max() <= 1.0
    # flips: the column code decreases along x in about half the views
    flipped = (ours[:, 0, :, -1] < ours[:, 0, :, 0]).any(1) & (ours[:, 0, :, -1] <= ours[:, 0, :, 0]).all(1)
    assert abs(flipped.float().mean() - 0.5) < 0.03


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))],
)
def test_device_views_give_the_cpu_statistics(device):
    """float32 and bfloat16 channels_last views on ``device`` against the CPU's float32 views (on
    the CPU this checks the output dtype/format path); the GPU suite runs the same function."""
    checks = device_statistics(torch.device(device))
    assert len(checks) == len(STAT_TOL) + 2 + 1
    for check in checks:
        assert check.ok, check.describe()


# --------------------------------------------------------------------------- vectors and dispatch


def test_vector_views():
    x = torch.randn(100, 2)
    cfg = ViewsConfig(noise=0.1)
    v = VectorViews(cfg)(x, 3, torch.Generator().manual_seed(0))
    assert v.shape == (300, 2) and v.dtype == x.dtype
    noise = v - x.repeat(3, 1)
    assert abs(noise.std() - 0.1) < 0.01 and abs(noise.mean()) < 0.01
    torch.testing.assert_close(VectorViews(cfg)(x, 3, torch.Generator().manual_seed(0)), v)
    assert isinstance(build_views(cfg, x, MEAN, STD), VectorViews)
    assert isinstance(build_views(cfg, smooth_images(2), MEAN, STD), ImageViews)
