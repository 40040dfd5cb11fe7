"""Relational reasoning: pair construction, aggregation, focal loss, and the method module."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rrscale.config import AGGREGATION_NAMES, BackboneConfig, RelationalConfig
from rrscale.methods.base import Method
from rrscale.methods.relational import AGGREGATIONS, RelationalReasoning, aggregate, focal_loss, pair_indices
from rrscale.nets.backbones import build_backbone


def _loop_reference(n: int, k: int) -> tuple[list[int], list[int], list[int]]:
    """The recipe written out: a double loop over view pairs with torch.roll on block b."""
    rows = torch.arange(k * n)
    anchor: list[int] = []
    positive: list[int] = []
    negative: list[int] = []
    shift = 1
    for a in range(k):
        for b in range(a + 1, k):
            block_a, block_b = rows[a * n : (a + 1) * n], rows[b * n : (b + 1) * n]
            anchor += block_a.tolist()
            positive += block_b.tolist()
            negative += torch.roll(block_b, shifts=shift, dims=0).tolist()
            shift += 1
            if shift >= n:
                shift = 1
    return anchor, positive, negative


def test_pair_indices_hand_worked_n4_k3() -> None:
    # pairs (0,1), (0,2), (1,2) with shifts 1, 2, 3; blocks: view0 = 0..3, view1 = 4..7, view2 = 8..11
    anchor, positive, negative = pair_indices(4, 3)
    assert anchor.tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 7]
    assert positive.tolist() == [4, 5, 6, 7, 8, 9, 10, 11, 8, 9, 10, 11]
    assert negative.tolist() == [7, 4, 5, 6, 10, 11, 8, 9, 9, 10, 11, 8]


def test_pair_indices_wraps_n3_k3() -> None:
    # shifts 1, 2, then back to 1 (reaching n=3); view0 = 0..2, view1 = 3..5, view2 = 6..8
    anchor, positive, negative = pair_indices(3, 3)
    assert anchor.tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 5]
    assert positive.tolist() == [3, 4, 5, 6, 7, 8, 6, 7, 8]
    assert negative.tolist() == [5, 3, 4, 7, 8, 6, 8, 6, 7]


@pytest.mark.parametrize("n,k", [(2, 2), (2, 5), (3, 4), (4, 6), (5, 3), (7, 8), (16, 4)])
def test_pair_indices_match_loop_reference(n: int, k: int) -> None:
    got = [t.tolist() for t in pair_indices(n, k)]
    assert got == list(_loop_reference(n, k))


def test_pair_indices_counts_and_no_self_negatives() -> None:
    anchor, positive, negative = pair_indices(64, 32)
    assert anchor.numel() == positive.numel() == negative.numel() == 31_744
    assert anchor.dtype == torch.int64
    assert not torch.equal(positive % 64, negative % 64)
    assert ((negative % 64) != (anchor % 64)).all()
    assert ((positive % 64) == (anchor % 64)).all()
    assert pair_indices(64, 32) is pair_indices(64, 32, torch.device("cpu"))  # cached


def test_pair_indices_rejects_single_image() -> None:
    with pytest.raises(ValueError, match="at least 2 images"):
        pair_indices(1, 4)


def test_aggregations() -> None:
    assert tuple(AGGREGATIONS) == AGGREGATION_NAMES
    fa = torch.tensor([[1.0, -2.0], [3.0, 0.0]])
    fb = torch.tensor([[0.5, 4.0], [-1.0, 2.0]])
    assert torch.equal(aggregate(fa, fb, "cat"), torch.tensor([[1.0, -2.0, 0.5, 4.0], [3.0, 0.0, -1.0, 2.0]]))
    assert torch.equal(aggregate(fa, fb, "sum"), torch.tensor([[1.5, 2.0], [2.0, 2.0]]))
    assert torch.equal(aggregate(fa, fb, "mean"), torch.tensor([[0.75, 1.0], [1.0, 1.0]]))
    assert torch.equal(aggregate(fa, fb, "max"), torch.tensor([[1.0, 4.0], [3.0, 2.0]]))
    with pytest.raises(ValueError, match="cat, sum, mean, max"):
        aggregate(fa, fb, "prod")


def _focal_reference(x: torch.Tensor, y: torch.Tensor, gamma: float, alpha: float | None) -> torch.Tensor:
    p = torch.sigmoid(x.double())
    y = y.double()
    bce = -(y * torch.log(p) + (1 - y) * torch.log(1 - p))
    p_t = y * p + (1 - y) * (1 - p)
    a_t = 1.0 if alpha is None else y * alpha + (1 - y) * (1 - alpha)
    return (a_t * (1 - p_t) ** gamma * bce).mean()


@pytest.mark.parametrize("gamma,alpha", [(2.0, 0.5), (1.0, 0.25), (3.0, None), (0.0, 0.5), (0.5, 0.9)])
def test_focal_loss_matches_formula(gamma: float, alpha: float | None) -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(200, generator=gen) * 3
    y = (torch.rand(200, generator=gen) > 0.5).float()
    got = focal_loss(x, y, gamma, alpha)
    torch.testing.assert_close(got.double(), _focal_reference(x, y, gamma, alpha), rtol=1e-5, atol=1e-7)


def test_focal_loss_gamma0_no_alpha_is_bce() -> None:
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(100, generator=gen, requires_grad=True)
    y = (torch.rand(100, generator=gen) > 0.3).float()
    got = focal_loss(x, y, gamma=0.0, alpha=None)
    torch.testing.assert_close(got, F.binary_cross_entropy_with_logits(x, y))
    got.backward()
    assert torch.isfinite(x.grad).all()


def test_focal_loss_fp32_from_bf16() -> None:
    x = torch.randn(64).to(torch.bfloat16)
    y = (torch.arange(64) % 2).float()
    loss = focal_loss(x, y)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, focal_loss(x.float(), y))
    with pytest.raises(ValueError, match="gamma"):
        focal_loss(x, y, gamma=-1.0)


def _method(k: int = 4, aggregation: str = "cat", backbone: str = "conv4") -> RelationalReasoning:
    cfg = RelationalConfig(K=k, aggregation=aggregation, head_width=32)
    return RelationalReasoning(cfg, build_backbone(BackboneConfig(name=backbone), in_channels=3))


@pytest.mark.parametrize("aggregation", AGGREGATION_NAMES)
def test_forward_backward_metrics(aggregation: str) -> None:
    torch.manual_seed(0)
    model = _method(k=3, aggregation=aggregation)
    assert isinstance(model, Method)
    assert model.views_per_image == 3 and model.symmetric_input is False
    assert model.head[0].in_features == (128 if aggregation == "cat" else 64)
    n = 5
    loss, metrics = model(torch.randn(3 * n, 3, 16, 16), n)
    assert loss.ndim == 0 and loss.dtype == torch.float32 and torch.isfinite(loss)
    assert set(metrics) == {"loss", "relation_acc"}
    assert all(not v.requires_grad for v in metrics.values())
    assert 0.0 <= metrics["relation_acc"].item() <= 1.0
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert model.extra_evaluation(torch.zeros(1), torch.zeros(1), None) == {}


def test_one_backbone_pass_over_all_views() -> None:
    model = _method(k=4)
    calls: list[tuple[int, ...]] = []
    model.backbone.register_forward_hook(lambda m, i, o: calls.append(tuple(i[0].shape)))
    model(torch.randn(4 * 6, 3, 8, 8), 6)
    assert calls == [(24, 3, 8, 8)]


def test_relation_head_sees_all_pairs() -> None:
    model = _method(k=4)
    rows: list[int] = []
    model.head.register_forward_hook(lambda m, i, o: rows.append(i[0].shape[0]))
    model(torch.randn(4 * 6, 3, 8, 8), 6)
    assert rows == [2 * 6 * 6]  # 2 * n * K(K-1)/2


def test_k2_and_smaller_last_batch() -> None:
    torch.manual_seed(0)
    model = _method(k=2)
    for n in (8, 3, 2):  # a full batch, then shorter final batches
        loss, metrics = model(torch.randn(2 * n, 3, 8, 8), n)
        loss.backward()
        assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="K\\*n"):
        model(torch.randn(7, 3, 8, 8), 4)


def test_loss_falls_on_fixed_batch() -> None:
    torch.manual_seed(0)
    model = _method(k=4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    images = torch.rand(8, 3, 16, 16)
    views = torch.cat([images + 0.05 * torch.randn_like(images) for _ in range(4)])
    losses = []
    for _ in range(20):
        loss, _ = model(views, 8)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_bf16_autocast_forward() -> None:
    torch.manual_seed(0)
    model = _method(k=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, metrics = model(torch.randn(3 * 4, 3, 8, 8).contiguous(memory_format=torch.channels_last), 4)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
