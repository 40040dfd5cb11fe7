"""The online linear probe: it never reaches the backbone, it learns, it is off when it should be,
a resumed run continues it, and DDP ranks hold the same probe."""

from __future__ import annotations

import dataclasses
import os
import socket
from typing import Any

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
from torch import nn

from rrscale.config import validate
from rrscale.data.sources import DataBundle, load_data
from rrscale.engine.loop import LocalHooks, fit
from rrscale.engine.online_probe import OnlineProbe
from rrscale.methods import build_method
from tests.scale_fixtures import TINY

CPU = torch.device("cpu")


def _cfg(**sections: dict[str, Any]) -> Any:
    raw = {k: dict(v) for k, v in TINY.items()}
    for key, value in sections.items():
        raw[key] = dict(value) if key == "method" else {**raw.get(key, {}), **value}
    return validate(raw, "test")


class _Flat(nn.Module):
    """A fixed 'backbone' for vector data: the input itself is the feature."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.feature_dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _probe(dim: int, classes: int, seed: int = 0) -> OnlineProbe:
    return OnlineProbe(dim, classes, mean=(0.0,), std=(1.0,), symmetric=False, device=CPU, seed=seed)


def test_a_probe_step_leaves_backbone_weights_and_gradients_untouched() -> None:
    cfg = _cfg()
    torch.manual_seed(0)
    method = build_method(cfg, 3, None)
    views = torch.randn(2 * 16, 3, 32, 32)
    loss, _ = method(views, 16)
    loss.backward()
    before = {k: v.detach().clone() for k, v in method.backbone.state_dict().items()}
    grads = {k: p.grad.clone() for k, p in method.backbone.named_parameters()}
    probe = _probe(method.backbone.feature_dim, 10)
    w0 = probe.classifier.weight.detach().clone()
    images = torch.randint(0, 256, (16, 32, 32, 3), dtype=torch.uint8)
    probe.step(method.backbone, images, torch.randint(0, 10, (16,)))
    assert method.backbone.training  # eval mode only for the probe's forward
    for k, v in method.backbone.state_dict().items():  # weights and BatchNorm statistics
        assert torch.equal(v, before[k]), k
    for k, p in method.backbone.named_parameters():
        assert torch.equal(p.grad, grads[k]), k
    assert not torch.equal(probe.classifier.weight, w0)  # the probe itself did learn


def _fit(cfg: Any, data: DataBundle, out: Any = None) -> tuple[nn.Module, list[dict[str, Any]]]:
    result = fit(cfg, data, hooks=LocalHooks(out), device=CPU)
    return result.method, result.history


@pytest.mark.parametrize("method", [
    {"name": "relational", "K": 2, "head_width": 32},
    # GEDI's SGLD draws from the global RNG: the probe must leave that stream alone too
    {"name": "gedi", "clusters": 10, "projector_width": 32, "lambda_gen": 1.0,
     "sgld": {"steps": 2, "buffer_size": 64}},
])
def test_training_is_identical_with_and_without_the_probe(method: dict[str, Any]) -> None:
    on = _cfg(method=method, train={"epochs": 2, "steps_per_epoch": 3})
    off = _cfg(method=method, train={"epochs": 2, "steps_per_epoch": 3}, probe={"online": False})
    data = load_data(on.data, seed=on.train.seed)
    m_on, h_on = _fit(on, data)
    m_off, h_off = _fit(off, data)
    for (k, a), (_, b) in zip(m_on.state_dict().items(), m_off.state_dict().items()):
        assert torch.equal(a, b), k
    assert [h["loss"] for h in h_on] == [h["loss"] for h in h_off]
    assert all(0.0 <= h["online_probe_top1"] <= 1.0 for h in h_on)
    assert not any("online_probe_top1" in h for h in h_off)


def test_the_probe_learns_a_separable_toy_set() -> None:
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 8, generator=g) * 3
    y = torch.randint(0, 4, (1200,), generator=g)
    x = centres[y] + torch.randn(1200, 8, generator=g)
    probe, flat = _probe(8, 4), _Flat(8)
    untrained = probe.top1(x[1000:], y[1000:])
    for epoch in range(3):
        for start in range(0, 1000, 32):
            probe.step(flat, x[start : start + 32], y[start : start + 32])
    trained = probe.top1(x[1000:], y[1000:])
    assert trained > 0.95 and trained > untrained + 0.3, (untrained, trained)


def test_the_probe_is_off_without_labels_without_a_slice_and_with_the_switch() -> None:
    cfg = _cfg(train={"epochs": 1, "steps_per_epoch": 2})
    data = load_data(cfg.data, seed=cfg.train.seed)
    assert "online_probe_top1" in _fit(cfg, data)[1][0]
    unlabelled = dataclasses.replace(data, train=dataclasses.replace(data.train, y=torch.full_like(data.train.y, -1)))
    assert "online_probe_top1" not in _fit(cfg, unlabelled)[1][0]
    assert "knn_top1" in _fit(cfg, unlabelled)[1][0]  # kNN uses the labelled probe split
    switched_off = cfg.model_copy(update={"probe": cfg.probe.model_copy(update={"online": False})})
    assert "online_probe_top1" not in _fit(switched_off, data)[1][0]
    no_slice = cfg.model_copy(update={"data": cfg.data.model_copy(update={"knn_subset": 0})})
    assert "online_probe_top1" not in _fit(no_slice, data)[1][0]


def test_a_resumed_run_continues_the_probe_from_its_checkpoint(tmp_path: Any) -> None:
    three = _cfg(train={"epochs": 3, "steps_per_epoch": 3})
    data = load_data(three.data, seed=three.train.seed)
    _, straight = _fit(three, data)
    _fit(_cfg(train={"epochs": 2, "steps_per_epoch": 3}), data, tmp_path)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert set(state["online_probe"]) == {"classifier", "optimizer"}
    _, resumed = _fit(three, data, tmp_path)
    assert [h["epoch"] for h in resumed] == [1, 2, 3]
    assert resumed[2]["online_probe_top1"] == straight[2]["online_probe_top1"]
    assert resumed[2]["loss"] == straight[2]["loss"]


def _rank_batches(rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(rank)  # each rank sees different data
    return [(torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(5)]


def _weights(probe: OnlineProbe) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in probe.classifier.parameters()])


def _ddp_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        probe = _probe(6, 3)
        for x, y in _rank_batches(rank):
            probe.step(_Flat(6), x, y)
        torch.save(_weights(probe), f"{out}/rank{rank}.pt")
    finally:
        torch_dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_ddp_ranks_train_one_probe_as_if_on_the_whole_batch(tmp_path: Any) -> None:
    """Two real gloo processes (forked: a spawned child would re-import torch, ~10 s here)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_ddp_worker, args=(port, str(tmp_path)), nprocs=2, join=True, start_method="fork")
    w0, w1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert torch.equal(w0, w1)  # the averaged gradients keep the copies identical
    whole = _probe(6, 3)  # one process, both ranks' batches together
    for (x0, y0), (x1, y1) in zip(_rank_batches(0), _rank_batches(1)):
        whole.step(_Flat(6), torch.cat([x0, x1]), torch.cat([y0, y1]))
    assert torch.allclose(w0, _weights(whole), atol=1e-6)
    assert not torch.allclose(w0, _weights(_probe(6, 3)), atol=1e-3)  # and it did train
