"""Frozen-backbone evaluation: feature extraction, weighted kNN and the paper's linear probe.

Features are extracted once (eval mode, no augmentation) and every later step runs on those
cached tensors, so the 100-epoch probe of the protocol takes seconds instead of re-running the
backbone 100 times, and the per-epoch kNN is cheap enough to be Tune's stopping signal.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from rrscale.data.views import to_model_input


@torch.no_grad()
def extract_features(
    backbone: nn.Module,
    x: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    symmetric: bool = False,
    device: torch.device | str = "cpu",
    batch_size: int = 1024,
) -> torch.Tensor:
    """Pooled backbone features of ``x`` (uint8 NHWC images or float vectors) in fp32 on ``device``.

    The backbone is put in eval mode (BatchNorm running statistics) and restored afterwards.
    """
    was_training = backbone.training
    backbone.eval()
    device = torch.device(device)
    feats = []
    use_amp = device.type == "cuda"
    try:
        for start in range(0, len(x), batch_size):
            xb = x[start : start + batch_size].to(device, non_blocking=True)
            inp = to_model_input(xb, mean, std, symmetric=symmetric)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                feats.append(backbone(inp).float())
    finally:
        backbone.train(was_training)
    if not feats:
        return torch.empty(0, getattr(backbone, "feature_dim", 0), device=device)
    return torch.cat(feats)


@torch.no_grad()
def knn_top1(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    query_labels: torch.Tensor,
    num_classes: int,
    *,
    k: int = 200,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> float:
    """Cosine kNN with exp(sim/T) vote weights (the InstDisc/SimCLR monitor); returns a fraction."""
    if len(queries) == 0 or len(bank) == 0:
        return 0.0
    bank = F.normalize(bank.float(), dim=1)
    queries = F.normalize(queries.float(), dim=1)
    bank_labels = bank_labels.to(bank.device)
    k = min(k, len(bank))
    correct = 0
    for start in range(0, len(queries), chunk):
        sims = queries[start : start + chunk] @ bank.T
        top_sim, top_idx = sims.topk(k, dim=1)
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(len(sims), num_classes, device=sims.device)
        votes.scatter_add_(1, bank_labels[top_idx], weights)
        pred = votes.argmax(dim=1)
        correct += int((pred == query_labels[start : start + chunk].to(pred.device)).sum())
    return correct / len(queries)


def linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    *,
    epochs: int = 100,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
) -> float:
    """Linear(d, classes) with Adam and cross-entropy on frozen features; test top-1 as a fraction.

    This is the evaluation of Patacchiola & Storkey (2020): no augmentation, batch 128,
    Adam 1e-3, 100 epochs. ``epochs=0`` scores the untrained (randomly initialised) classifier.
    """
    device = train_features.device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    torch_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    classifier = nn.Linear(train_features.shape[1], num_classes).to(device)
    torch.random.set_rng_state(torch_state)
    opt = torch.optim.Adam(classifier.parameters(), lr=lr)
    x = train_features.float()
    y = train_labels.to(device)
    n = len(x)
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen).to(device)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            loss = F.cross_entropy(classifier(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        pred = classifier(test_features.float()).argmax(dim=1)
    # an exact fraction of Python ints: a float32 mean would print as 0.29499998 instead of 0.295
    return int((pred == test_labels.to(device)).sum()) / len(pred) if len(pred) else 0.0
