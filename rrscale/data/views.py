"""K augmented views of a batch, made in one vectorised pass on the batch's device.

Why this module exists: the official relational-reasoning code augments every view of every
image with PIL in CPU loader workers, which keeps a GPU ~39x under its ceiling at K=32
(methods.md §1, architecture.md "Performance design"). Here the uint8 batch already lives on
the training device and all K*N views are produced at once, with every view's random
parameters drawn independently:

* RandomResizedCrop + horizontal flip + resize are one affine grid + one bilinear
  ``grid_sample`` per batch. Crop boxes are sampled exactly like torchvision's
  ``RandomResizedCrop`` (integer boxes, 10 area/log-ratio tries, then its centre-crop
  fallback), but all tries of all views are drawn at once and the first valid one is picked
  with ``argmax``. The grid is what ``F.affine_grid`` gives for the crop's axis-aligned theta
  (built from its 1-D factors, 13x cheaper on CPU), clamped to the crop box so that border
  pixels replicate *inside* the box as crop-then-resize does; a known box therefore
  reproduces ``torchvision.transforms.functional.resized_crop(..., antialias=False)``.
* Colour jitter follows torchvision's definitions on [0, 1] floats (brightness multiplies,
  contrast blends with the mean of the luma image, saturation blends with the luma image, hue
  shifts H in HSV; clamp after each op) with per-view factors as broadcast tensors. The hue
  shift uses the closed-form hexagonal HSV->RGB map (see :func:`adjust_hue_`), which needs
  no six-way select.
* Grayscale uses ITU-R 601 luma (0.299, 0.587, 0.114) replicated to three channels.
* Normalisation, the cast to the output dtype and the memory format are one fused
  ``addcmul`` into a pre-allocated output.

Jitter order. torchvision applies the four jitter ops in a fresh random order per call; that
is kept here, per view. The three blend-type ops (brightness, contrast, saturation) are
identities when their factor is 1, so the random order costs 6 cheap blend stages (the three
blend ops in their drawn order, each masked to "before hue" or "after hue") around a single
hue stage, instead of evaluating the expensive hue op at all four positions. The fixed
alternative (brightness, contrast, saturation, hue for every view) needs 3 blend stages.
Measured on the 2-core development CPU (torch.set_num_threads(2), float32, 32x32 RGB, full
recipe, medians of 20-30 interleaved calls in two sessions; the machine was shared with other
jobs, so the spread is wide):

=========================  ==================  ==================  ==========================
views                      random order        fixed order         torchvision per image
=========================  ==================  ==================  ==========================
N=64, K=32 (2,048 views)   36-48 ms            34-40 ms            455 ms PIL, 805 ms tensor
N=32, K=4 (128 views)      2.3-2.5 ms          1.9-2.0 ms          27.5 ms PIL, 46 ms tensor
=========================  ==================  ==================  ==========================

The faithful random order costs 7-20 % more; against the 10-20x gain over per-image
transforms that is kept. Of the 2,048-view call, crop+flip+normalise take ~10-20 ms (one
``grid_sample``), the jitter ~20 ms of which the hue ~10 ms. With one thread it is 72 ms
(random) vs 62 ms (fixed). On CPU most of the colour ops' cost is first-touching freshly
allocated temporaries, hence the in-place style below; ``torch.where`` over image-sized
tensors is ~30x slower than a multiply-add on CPU, hence the 0/1 arithmetic masks.

Precision: all arithmetic runs in float32 (the box sampling in float64) on every device;
``dtype`` only sets the output type, so a bf16/fp16 output costs one rounding at the very end.
Colour ops in fp16 on CUDA would halve their memory traffic but were not measured (no GPU was
available when this was written), so they are not offered.

Randomness: every draw comes from ``generator`` (default: the global RNG of ``x``'s device)
in a fixed order, so the same generator state gives the same views. A CPU generator may be
used with CUDA data: the few parameters per view are drawn on the generator's device and
copied over.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from rrscale.config import ViewsConfig

LUMA = (0.299, 0.587, 0.114)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
CROP_TRIES = 10
# op ids of the colour jitter, in torchvision's ColorJitter numbering (its ``fn_idx``)
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3

# columns of the one uniform draw per view: a single RNG call (one kernel) per batch
_TRY_COLS = 2 * CROP_TRIES  # (area, log-ratio) per try
_OFFSET, _FLIP, _JITTER, _FACTORS, _HUE, _ORDER, _GRAY = (
    _TRY_COLS,
    _TRY_COLS + 2,
    _TRY_COLS + 3,
    _TRY_COLS + 4,
    _TRY_COLS + 7,
    _TRY_COLS + 8,
    _TRY_COLS + 12,
)
_DRAWS = _GRAY + 1


def _check_images(x: torch.Tensor) -> None:
    if x.dim() != 4 or x.dtype != torch.uint8 or x.shape[-1] not in (1, 3):
        raise ValueError(
            f"expected uint8 images of shape (N, H, W, C) with C in (1, 3), got {tuple(x.shape)} {x.dtype}"
        )


def _normaliser(
    mean: Sequence[float],
    std: Sequence[float],
    channels: int,
    symmetric: bool,
    device: torch.device,
    input_max: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) of shape (1, C, 1, 1) such that ``x * scale + shift`` is the model input.

    ``input_max`` is the value of a white pixel (255 for raw uint8). In symmetric mode the
    scale is rounded *down* to float32, so that white maps to at most 1 and the [-1, 1] range
    SGLD relies on holds exactly.
    """
    if symmetric:
        scale64 = torch.full((channels,), 2.0 / input_max, dtype=torch.float64)
        shift64 = torch.full((channels,), -1.0, dtype=torch.float64)
        scale = scale64.float()
        scale = torch.where(scale.double() > scale64, torch.nextafter(scale, torch.zeros(())), scale)
    else:
        if len(mean) not in (1, channels) or len(std) not in (1, channels):
            raise ValueError(f"mean/std need 1 or {channels} values, got {len(mean)} and {len(std)}")
        m = torch.tensor(mean, dtype=torch.float64).expand(channels)
        s = torch.tensor(std, dtype=torch.float64).expand(channels)
        scale, shift64 = (1.0 / (s * input_max)).float(), -m / s
    shape = (1, channels, 1, 1)
    return scale.view(shape).to(device), shift64.float().view(shape).to(device)


def _fused_output(
    x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, dtype: torch.dtype, channels_last: bool
) -> torch.Tensor:
    """``x * scale + shift`` written straight into the requested dtype and memory format."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty(x.shape, dtype=dtype, device=x.device, memory_format=fmt)
    return torch.addcmul(shift, x, scale, out=out)


def to_model_input(
    x: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    symmetric: bool = False,
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
) -> torch.Tensor:
    """Un-augmented model input (probe, kNN, evaluation) with the same scaling as the views.

    uint8 (N, H, W, C) -> float (N, C, H, W) normalised with mean/std, or to [-1, 1] when
    ``symmetric`` (GEDI's SGLD works in that range). Float vector data (N, D) passes through,
    cast to ``dtype``, so callers need not special-case toy data.
    """
    if x.dim() == 2 and x.is_floating_point():
        return x.to(dtype)
    _check_images(x)
    # the 1/255 is folded into the scale so uint8 -> model input is one pass
    scale, shift = _normaliser(mean, std, x.shape[-1], symmetric, x.device, input_max=255.0)
    return _fused_output(x.permute(0, 3, 1, 2), scale, shift, dtype, channels_last)


def sample_crop_boxes(
    u_tries: torch.Tensor, u_offset: torch.Tensor, height: int, width: int, min_scale: float
) -> torch.Tensor:
    """torchvision's RandomResizedCrop box sampling, vectorised over views.

    ``u_tries`` (M, 2*CROP_TRIES) and ``u_offset`` (M, 2) are uniforms in [0, 1); returns
    integer boxes (M, 4) as (top, left, h, w). Each view takes its first try whose rounded box
    fits, else torchvision's centre-crop fallback, so the distribution matches the per-image
    loop (scale U(min_scale, 1), log-uniform aspect ratio in [3/4, 4/3]).
    """
    u = u_tries.double().view(-1, CROP_TRIES, 2)
    area = float(height * width)
    target = area * (min_scale + (1.0 - min_scale) * u[..., 0])
    lo, hi = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
    aspect = torch.exp(lo + (hi - lo) * u[..., 1])
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.long().argmax(1, keepdim=True)  # argmax returns the first maximum
    found = fits.any(1)
    w = w.gather(1, first).squeeze(1)
    h = h.gather(1, first).squeeze(1)

    in_ratio = width / height
    if in_ratio < CROP_RATIO[0]:
        fw, fh = width, int(round(width / CROP_RATIO[0]))
    elif in_ratio > CROP_RATIO[1]:
        fw, fh = int(round(height * CROP_RATIO[1])), height
    else:
        fw, fh = width, height
    w = torch.where(found, w, float(fw))
    h = torch.where(found, h, float(fh))
    u_offset = u_offset.double()
    top = torch.where(found, torch.floor(u_offset[:, 0] * (height - h + 1)), float((height - fh) // 2))
    left = torch.where(found, torch.floor(u_offset[:, 1] * (width - w + 1)), float((width - fw) // 2))
    return torch.stack([top, left, h, w], 1).long()


def crop_grid(
    boxes: torch.Tensor, flips: torch.Tensor, height: int, width: int, out_size: int
) -> torch.Tensor:
    """Sampling grid (M, S, S, 2) for ``grid_sample`` that crops, flips and resizes in one pass.

    It is ``F.affine_grid(theta, align_corners=False)`` for theta = [[±w/W, 0, (2·left+w)/W - 1],
    [0, h/H, (2·top+h)/H - 1]] (output pixel centres map linearly onto the box, the flip
    negates the x scale), clamped to the box's outer pixel centres, which is what resizing an
    already-cropped image does at its border. Because theta is axis-aligned the grid is built
    from its two 1-D factors: on CPU ``affine_grid``'s batched matmul takes 13 ms for 2,048
    32x32 views, the broadcast 1 ms, and the clamp runs on (M, S) instead of (M, S, S, 2).
    """
    b = boxes.to(torch.float32)
    top, left, h, w = (v.unsqueeze(1) for v in b.unbind(1))
    centres = (torch.arange(out_size, dtype=torch.float32, device=b.device) * 2 + 1) / out_size - 1
    scale_x = torch.where(flips.to(b.device).unsqueeze(1), -w / width, w / width)
    gx = (centres * scale_x + (2 * left + w) / width - 1).clamp_(
        min=(2 * left + 1) / width - 1, max=(2 * (left + w) - 1) / width - 1
    )
    gy = (centres * (h / height) + (2 * top + h) / height - 1).clamp_(
        min=(2 * top + 1) / height - 1, max=(2 * (top + h) - 1) / height - 1
    )
    shape = (b.shape[0], out_size, out_size)
    return torch.stack([gx.unsqueeze(1).expand(shape), gy.unsqueeze(2).expand(shape)], -1)


def crop_flip(images: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, out_size: int) -> torch.Tensor:
    """Crop each image to its box, flip it horizontally where ``flips``, resize to out_size².

    images: float (M, C, H, W); boxes: (M, 4) integer (top, left, h, w); flips: bool (M,).
    One bilinear ``grid_sample`` over the grid of :func:`crop_grid`, no antialiasing (crops are
    never larger than the output unless ``out_size`` is smaller than the input), so a box gives
    the pixels of ``torchvision.transforms.functional.resized_crop(..., antialias=False)``.
    """
    _, _, height, width = images.shape
    grid = crop_grid(boxes.to(images.device), flips, height, width, out_size)
    return F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)


def luma(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma (M, 1, H, W) of RGB images, as a new tensor; 1-channel images are copied."""
    if x.shape[1] == 1:
        return x.clone()
    r, g, b = x.unbind(1)
    y = torch.add(r, g, alpha=LUMA[1] / LUMA[0]).add_(b, alpha=LUMA[2] / LUMA[0])
    return y.mul_(LUMA[0]).unsqueeze(1)


def _mask(condition: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-view 0/1 factor (M, 1, 1, 1). Selecting by multiply-add instead of ``torch.where``:
    on CPU ``where`` over image-sized tensors runs ~30x slower than an add."""
    return condition.to(like.dtype).view(-1, 1, 1, 1)


def _blend_stage_(x: torch.Tensor, op: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """One per-view choice of brightness/contrast/saturation, in place: clamp(f*x + (1-f)*ref).

    ref is 0 (brightness), the mean luma (contrast) or the luma image (saturation), the
    torchvision definitions. A factor of exactly 1 leaves the view bit-identical.
    """
    f = factor.to(x.dtype).view(-1, 1, 1, 1)
    ref = luma(x)
    contrast = ref.mean((2, 3), keepdim=True).mul_(_mask(op == CONTRAST, x)).mul_(1.0 - f)
    ref.mul_(_mask(op == SATURATION, x) * (1.0 - f)).add_(contrast)
    return x.mul_(f).add_(ref).clamp_(0.0, 1.0)


def adjust_hue_(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue of RGB views (M, 3, H, W) in [0, 1] by ``shift`` (M,) turns, in place.

    Max V and chroma C = V - min are invariant under a hue rotation, so each channel becomes
    ``min + C * clamp(|((6H' + o) mod 6) - 3| - 1, 0, 1)`` with o = 0, 4, 2 for R, G, B (the
    hexagonal HSV->RGB map), which stays inside [min, max] and needs no six-way select. The
    hexagonal hue 6H = 2i + (next - after next) / C of the max channel i is picked with 0/1
    arithmetic, ties resolved red > green > blue as in torchvision. Everything that can be is
    in place: on CPU the cost is dominated by first-touching freshly allocated temporaries.
    """
    r, g, b = x.unbind(1)
    maxc = torch.maximum(r, g)
    torch.maximum(maxc, b, out=maxc)
    low = torch.minimum(r, g)
    torch.minimum(low, b, out=low)
    is_r = torch.sub(r, maxc).sign_().add_(1.0)  # channels never exceed the max: sign is -1 or 0
    is_g = torch.sub(g, maxc).sign_().add_(1.0)
    is_g.addcmul_(is_g, is_r, value=-1.0)
    chroma = maxc.sub_(low)
    # numerator (g-b), (b-r) or (r-g) = d_rg + is_r*(d_gb - d_rg) + is_g*(d_br - d_rg)
    d_rg = r - g
    d_gb = g - b
    tmp = torch.add(d_gb, d_rg, alpha=2.0).neg_()  # d_br - d_rg
    h6 = d_rg.addcmul_(is_r, d_gb.sub_(d_rg)).addcmul_(is_g, tmp)
    h6.div_(torch.clamp(chroma, min=1e-12, out=tmp))  # C = 0: all numerators are 0
    h6.add_(4.0).sub_(is_r, alpha=4.0).sub_(is_g, alpha=2.0)  # 2i: 0, 2 or 4
    h6.add_(6.0 * shift.to(x.dtype).view(-1, 1, 1))
    h6.sub_(torch.mul(h6, 1.0 / 6.0, out=tmp).floor_(), alpha=6.0)  # mod 6 -> [0, 6]
    # with o = 6, 4, 2 (0, 4, 2 mod 6) k = 6H' + o lies in [0, 12], where
    # |(k mod 6) - 3| = ||k - 6| - 3|: no per-channel remainder; k - 6 = 6H' - 2c
    offsets = torch.arange(3, dtype=x.dtype, device=x.device).mul_(-2.0).view(1, 3, 1, 1)
    torch.add(h6.unsqueeze(1), offsets, out=x)
    x.abs_().sub_(3.0).abs_().sub_(1.0).clamp_(0.0, 1.0)
    return x.mul_(chroma.unsqueeze(1)).add_(low.unsqueeze(1))


def color_jitter_(
    x: torch.Tensor, factors: torch.Tensor, hue: torch.Tensor | None, order: torch.Tensor
) -> torch.Tensor:
    """torchvision's ColorJitter with per-view parameters and per-view op order, in place.

    x: (M, C, H, W) in [0, 1]; factors: (M, 3) brightness/contrast/saturation factors;
    hue: (M,) shifts in turns, or None to skip hue (also skipped for 1-channel views, where
    torchvision's saturation and hue are identities too); order: (M, 4) permutations of
    BRIGHTNESS, CONTRAST, SATURATION, HUE, like ColorJitter's ``fn_idx``. The expensive hue op
    is evaluated once: the three blend ops run in their drawn order twice, masked (factor 1)
    to the side of the hue op they fall on.
    """
    m = x.shape[0]
    positions = torch.arange(4, device=order.device).expand(m, 4)
    hue_pos = (order == HUE).long().argmax(1, keepdim=True)
    # blend ops in drawn order: sort positions with the hue slot pushed to the end
    keyed = torch.where(order == HUE, 4, positions)
    blend_ops = order.gather(1, keyed.argsort(1))[:, :3]
    blend_factors = factors.gather(1, blend_ops)
    if hue is None or x.shape[1] != 3:
        for s in range(3):
            _blend_stage_(x, blend_ops[:, s], blend_factors[:, s])
        return x
    before_hue = positions[:, :3] < hue_pos
    for s in range(3):
        _blend_stage_(x, blend_ops[:, s], torch.where(before_hue[:, s], blend_factors[:, s], 1.0))
    adjust_hue_(x, hue)
    for s in range(3):
        _blend_stage_(x, blend_ops[:, s], torch.where(before_hue[:, s], 1.0, blend_factors[:, s]))
    return x


class ImageViews:
    """The RR augmentation recipe (methods.md §1) applied to a device-resident uint8 batch."""

    def __init__(
        self,
        cfg: ViewsConfig,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        symmetric: bool = False,
        out_size: int | None = None,
        dtype: torch.dtype = torch.float32,
        channels_last: bool = False,
    ) -> None:
        self.cfg = cfg
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.symmetric = symmetric
        self.out_size = out_size
        self.dtype = dtype
        self.channels_last = channels_last
        self._norm: dict[tuple[torch.device, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def _normaliser(self, device: torch.device, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached per device so a training step does no host->device copy for it."""
        key = (device, channels)
        if key not in self._norm:
            self._norm[key] = _normaliser(self.mean, self.std, channels, self.symmetric, device)
        return self._norm[key]

    def __call__(self, x: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(k*N, C, S, S) views of uint8 (N, H, W, C) images, augmentation-major.

        Rows [0:N] are view 1 of every image, [N:2N] view 2, ...; every view's crop, flip,
        jitter and grayscale parameters are drawn independently.
        """
        _check_images(x)
        n, height, width, c = x.shape
        m = k * n
        size = self.out_size or height
        cfg = self.cfg
        dev = x.device
        draw_dev = generator.device if generator is not None else dev
        u = torch.rand(m, _DRAWS, generator=generator, device=draw_dev).to(dev, non_blocking=True)

        boxes = sample_crop_boxes(
            u[:, :_TRY_COLS], u[:, _OFFSET : _OFFSET + 2], height, width, cfg.crop_min_scale
        )
        flips = u[:, _FLIP] < cfg.flip_prob
        src = x.permute(0, 3, 1, 2).to(torch.float32).div_(255.0).contiguous()  # exact 0 and 1
        views = crop_flip(src.repeat(k, 1, 1, 1), boxes, flips, size)

        hue_on = cfg.hue > 0 and c == 3
        if cfg.jitter_prob > 0 and (cfg.jitter > 0 or hue_on):
            jitter = (u[:, _JITTER] < cfg.jitter_prob).unsqueeze(1)
            lo = max(0.0, 1.0 - cfg.jitter)
            factors = torch.where(jitter, lo + (1.0 + cfg.jitter - lo) * u[:, _FACTORS : _FACTORS + 3], 1.0)
            hue = torch.where(jitter[:, 0], cfg.hue * (2.0 * u[:, _HUE] - 1.0), 0.0) if hue_on else None
            order = u[:, _ORDER : _ORDER + 4].argsort(1)  # a uniform random permutation per view
            color_jitter_(views, factors, hue, order)

        if cfg.gray_prob > 0 and c == 3:
            gray = _mask(u[:, _GRAY] < cfg.gray_prob, views)
            # (1-g)*view + g*luma is exact for g in {0, 1}
            lum = luma(views).mul_(gray)
            views.mul_(1.0 - gray).add_(lum)

        # bilinear weights and luma can overshoot 1 by an ulp; the [-1, 1] / [0, 1] promise is exact
        views.clamp_(0.0, 1.0)
        scale, shift = self._normaliser(dev, c)
        return _fused_output(views, scale, shift, self.dtype, self.channels_last)


class VectorViews:
    """Views of float (N, D) toy data: k noisy copies ``x + noise * randn``, augmentation-major."""

    def __init__(self, cfg: ViewsConfig) -> None:
        self.noise = cfg.noise

    def __call__(self, x: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(k*N, D): rows [0:N] are the first noisy copy of every point, [N:2N] the second, ..."""
        if x.dim() != 2 or not x.is_floating_point():
            raise ValueError(f"expected float vectors of shape (N, D), got {tuple(x.shape)} {x.dtype}")
        draw_dev = generator.device if generator is not None else x.device
        eps = torch.randn(k * x.shape[0], x.shape[1], generator=generator, device=draw_dev, dtype=x.dtype)
        return torch.add(x.repeat(k, 1), eps.to(x.device), alpha=self.noise)


def build_views(
    cfg: ViewsConfig,
    sample: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    symmetric: bool = False,
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
) -> ImageViews | VectorViews:
    """Pick the view maker from the data itself: 4-D uint8 images or 2-D float vectors."""
    if sample.dim() == 4 and sample.dtype == torch.uint8:
        return ImageViews(cfg, mean, std, symmetric=symmetric, dtype=dtype, channels_last=channels_last)
    if sample.dim() == 2 and sample.is_floating_point():
        return VectorViews(cfg)
    raise ValueError(
        f"cannot make views of {tuple(sample.shape)} {sample.dtype}: "
        "expected uint8 (N, H, W, C) images or float (N, D) vectors"
    )
