"""The one per-worker training loop: ``rrscale train``, Ray Train workers and tests all call it.

Everything Ray- or MLflow-specific stays behind :class:`Hooks`: the loop hands each epoch's
metrics (and, on checkpoint epochs, a plain-dict checkpoint from rank 0) to ``hooks.report``
and asks ``hooks.load_state`` for a checkpoint to resume from. The dataset lives on the
worker's device as uint8; each step slices a device-side permutation, makes K views of the
batch in one batched pass and calls the method.
"""

from __future__ import annotations

import math
import platform
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from rrscale.config import ExperimentConfig
from rrscale.data.sources import DataBundle, Split, load_data
from rrscale.data.views import build_views, to_model_input
from rrscale.engine import dist
from rrscale.engine.checkpoint import load_checkpoint, save_checkpoint
from rrscale.engine.evaluate import extract_features, knn_top1, linear_probe
from rrscale.engine.online_probe import OnlineProbe, probe_batch
from rrscale.engine.rundir import append_metrics
from rrscale.floats import plain_float
from rrscale.methods import TrainingDiverged, build_method


class Hooks(Protocol):
    """Where the loop's results go; the local and the Ray implementations differ only here."""

    def report(self, metrics: dict[str, Any], state: dict[str, Any] | None, final: bool = False) -> None: ...

    def load_state(self) -> dict[str, Any] | None: ...


class LocalHooks:
    """Plain-files hooks: ``metrics.jsonl`` and an atomically replaced ``checkpoint.pt``."""

    def __init__(self, out_dir: Path | None) -> None:
        self.out_dir = out_dir
        self._appended = False
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)

    @property
    def checkpoint_path(self) -> Path | None:
        return self.out_dir / "checkpoint.pt" if self.out_dir is not None else None

    def report(self, metrics: dict[str, Any], state: dict[str, Any] | None, final: bool = False) -> None:
        if self.out_dir is None or not dist.is_main():
            return
        if not final:
            append_metrics(self.out_dir, metrics, first=not self._appended)
            self._appended = True
        if state is not None and self.checkpoint_path is not None:
            save_checkpoint(state, self.checkpoint_path)

    def load_state(self) -> dict[str, Any] | None:
        path = self.checkpoint_path
        return load_checkpoint(path) if path is not None and path.exists() else None


@dataclass
class FitResult:
    method: nn.Module
    epochs: int
    train_seconds: float
    images_per_s: float
    history: list[dict[str, Any]] = field(default_factory=list)


def pick_device(name: str) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("train.device: expected 'cpu' or 'auto' (CUDA is not available here)")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads, {platform.processor() or platform.machine()})"


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def unwrap(model: nn.Module) -> nn.Module:
    """The method inside DDP and/or torch.compile wrappers (checkpoints hold it unwrapped)."""
    inner = getattr(model, "_orig_mod", model)
    inner = getattr(inner, "module", inner)
    return getattr(inner, "_orig_mod", inner)


def sample_shape(split: Split) -> tuple[int | None, int | None]:
    """(in_channels, input_dim) for the method builder."""
    return (int(split.x.shape[-1]), None) if split.is_image else (None, int(split.x.shape[1]))


def _make_optimizer(cfg: ExperimentConfig, params: Any) -> torch.optim.Optimizer:
    t = cfg.train
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    return torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay)


def _online_probe(
    cfg: ExperimentConfig, data: DataBundle, method: nn.Module, device: torch.device
) -> OnlineProbe | None:
    """The online probe when ``probe.online`` is on and it can be trained and scored.

    It needs labels on every training image and a held-out slice in the same label space:
    off for unlabelled SSL splits (STL-10's), for probes on another dataset
    (``data.probe_name``) and with ``data.knn_subset: 0`` (the slice it is scored on).
    """
    train = data.train
    labelled = train.y.numel() > 0 and bool((train.y >= 0).all())
    if not (cfg.probe.online and labelled and not cfg.data.probe_name and cfg.data.knn_subset > 0):
        return None
    return OnlineProbe(int(method.backbone.feature_dim), train.num_classes, mean=train.mean, std=train.std,
                       symmetric=bool(getattr(method, "symmetric_input", False)), device=device,
                       seed=cfg.train.seed)


def _make_scheduler(
    cfg: ExperimentConfig, optimizer: torch.optim.Optimizer, total_steps: int, done_steps: int
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """Cosine decay to 0 over ``total_steps``, as a closed form of the step count.

    A closed form (not the recursive CosineAnnealingLR) lets a resumed run continue from
    ``done_steps`` with this config's lr and horizon, which may differ from the checkpoint's.
    """
    if cfg.train.schedule != "cosine":
        return None
    horizon = max(1, total_steps)

    def factor(step: int) -> float:
        return 0.5 * (1.0 + math.cos(math.pi * min(step, horizon) / horizon))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    if done_steps:
        scheduler.last_epoch = done_steps
        for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
            group["lr"] = base * factor(done_steps)
    return scheduler


def _load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """Moments and step counts from a checkpoint, hyperparameters (lr, weight decay, momentum) from
    the config the optimizer was built with: a resumed run trains with the config it was given."""
    settings = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    optimizer.load_state_dict(saved)
    for group, mine in zip(optimizer.param_groups, settings):
        params = group["params"]
        group.clear()
        group.update(mine, params=params)


def check_diverged(metrics: dict[str, Any], limit: float, epoch: int) -> None:
    """Raise TrainingDiverged when an epoch's mean loss is non-finite or beyond ``limit``, or any
    of its metrics is non-finite. Reads the epoch means the loop computes anyway: no extra sync."""
    loss = metrics.get("loss", 0.0)
    bad = [k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]
    if not bad and abs(loss) <= limit:
        return
    shown = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float) and k != "epoch_seconds")
    raise TrainingDiverged(
        f"training diverged in epoch {epoch}: loss non-finite or beyond method.divergence_limit={limit:g} "
        f"({shown}); try a smaller train.lr"
    )


def _subset(split: Split, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = min(size, len(split.y))
    idx = torch.randperm(len(split.y), generator=torch.Generator().manual_seed(seed))[:n]
    return split.x[idx], split.y[idx]


class _Progress:
    """A rich progress bar on a terminal, one plain line per epoch otherwise."""

    def __init__(self, enabled: bool, total_epochs: int, steps: int, start_epoch: int) -> None:
        self.tty = enabled and sys.stderr.isatty()
        self.enabled = enabled
        self.bar: Any = None
        if self.tty:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("[bold]epoch {task.fields[epoch]}/{task.fields[epochs]}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
                transient=False,
            )
            self.bar.start()
            self.task = self.bar.add_task("train", total=steps, epoch=start_epoch + 1, epochs=total_epochs, info="")

    def step(self) -> None:
        if self.bar is not None:
            self.bar.advance(self.task)

    def epoch_done(self, epoch: int, total: int, metrics: dict[str, Any]) -> None:
        info = "  ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k != "epoch" and isinstance(v, float))
        if self.bar is not None:
            self.bar.update(self.task, completed=0, epoch=min(epoch + 1, total), info=info)
        elif self.enabled:
            print(f"epoch {epoch}/{total}  {info}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


@contextmanager
def _progress(enabled: bool, total_epochs: int, steps: int, start_epoch: int) -> Iterator[_Progress]:
    bar = _Progress(enabled, total_epochs, steps, start_epoch)
    try:
        yield bar
    finally:
        bar.close()


def train_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, views: torch.Tensor, n: int, *, amp: bool
) -> dict[str, torch.Tensor]:
    """One optimisation step on ready-made views; bf16 autocast when ``amp`` (CUDA only)."""
    with torch.autocast(views.device.type, dtype=torch.bfloat16, enabled=amp):
        loss, metrics = model(views, n)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return metrics


def fit(
    cfg: ExperimentConfig,
    data: DataBundle,
    *,
    hooks: Hooks,
    device: torch.device,
) -> FitResult:
    """Train ``cfg.method`` on ``data.train`` for ``cfg.train.epochs`` epochs, resuming if hooks say so."""
    t = cfg.train
    rank, world = dist.rank(), dist.world_size()
    seed_everything(t.seed + rank)
    train = data.train
    in_channels, input_dim = sample_shape(train)
    method = build_method(cfg, in_channels, input_dim).to(device)
    symmetric = bool(getattr(method, "symmetric_input", False))
    k = int(method.views_per_image)
    cuda = device.type == "cuda"
    channels_last = t.channels_last and cuda and train.is_image
    if channels_last:
        method = method.to(memory_format=torch.channels_last)
    optimizer = _make_optimizer(cfg, method.parameters())

    x_all = train.x.to(device)
    n_total = len(x_all)
    shard = math.ceil(n_total / world)
    steps = math.ceil(shard / t.batch_size)
    if t.steps_per_epoch:
        steps = min(steps, t.steps_per_epoch)

    online = _online_probe(cfg, data, method, device)
    y_all = train.y.to(device) if online is not None else None

    start_epoch, history, done_steps = 0, [], 0
    state = hooks.load_state()
    if state is not None:
        method.load_state_dict(state["model"])
        _load_optimizer_state(optimizer, state["optimizer"])
        if online is not None and state.get("online_probe"):
            online.load_state_dict(state["online_probe"])
        start_epoch, history = int(state["epoch"]), list(state.get("history", []))
        done_steps = int((state.get("scheduler") or {}).get("last_epoch", start_epoch * steps))
    scheduler = _make_scheduler(cfg, optimizer, steps * t.epochs, done_steps)

    model: nn.Module = method
    if dist.is_distributed():
        model = nn.parallel.DistributedDataParallel(method, device_ids=[device.index] if cuda else None)
    if t.compile:
        model = torch.compile(model)
    if cuda:
        torch.backends.cudnn.benchmark = True

    views = build_views(cfg.views, x_all[:1], train.mean, train.std, symmetric=symmetric,
                        dtype=torch.float32, channels_last=channels_last)
    knn_every = t.knn_every if data.probe_train.y.numel() and (data.probe_train.y >= 0).any() else 0
    if knn_every and dist.is_main():
        bank_x, bank_y = _subset(data.probe_train, cfg.data.knn_subset, t.seed)
    if (knn_every or online is not None) and dist.is_main():
        query_x, query_y = _subset(data.probe_test, cfg.data.knn_subset, t.seed + 1)

    train_seconds, images_seen = 0.0, 0
    for epoch in range(start_epoch, t.epochs):
        model.train()
        perm_gen = torch.Generator().manual_seed(t.seed * 100_003 + epoch)
        order = torch.randperm(n_total, generator=perm_gen)[rank::world].to(device)
        view_gen = torch.Generator(device=device).manual_seed((t.seed * 1_000_003 + epoch) * 64 + rank)
        sums: dict[str, torch.Tensor] = {}
        count = torch.zeros((), device=device)
        if cuda:
            torch.cuda.synchronize(device)
        tic = time.perf_counter()
        with _progress(t.progress and dist.is_main(), t.epochs, steps, epoch) as bar:
            for step in range(steps):
                idx = order[step * t.batch_size : (step + 1) * t.batch_size]
                n = len(idx)
                if n < 2:
                    break
                with torch.no_grad():
                    batch_views = views(x_all[idx], k, view_gen)
                metrics = train_step(model, optimizer, batch_views, n, amp=cuda and t.amp)
                if scheduler is not None:
                    scheduler.step()
                if online is not None:
                    probe_idx = idx[: probe_batch(n)]
                    online.step(method.backbone, x_all[probe_idx], y_all[probe_idx])
                for name, value in metrics.items():
                    sums[name] = sums.get(name, 0.0) + value.detach().float() * n
                count += n
                bar.step()
            if cuda:
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - tic
            names = sorted(sums)
            totals = dist.sum_across(torch.stack([count, *(sums[m] for m in names)]))
            images = int(totals[0].item())
            epoch_metrics: dict[str, Any] = {"epoch": epoch + 1}
            if epoch == start_epoch:  # trackers name the dataset before a trial ends (or is stopped)
                epoch_metrics["data_fingerprint"] = data.fingerprint
            epoch_metrics.update({m: plain_float(totals[i + 1] / max(images, 1)) for i, m in enumerate(names)})
            end_epoch = getattr(unwrap(model), "end_epoch", None)
            if end_epoch is not None:  # method-level epoch metrics (GEDI: clusters used over the epoch)
                epoch_metrics.update(end_epoch(dist.sum_across))
            epoch_metrics["images_per_s"] = images / max(seconds, 1e-9)
            epoch_metrics["epoch_seconds"] = seconds
            check_diverged(epoch_metrics, cfg.method.divergence_limit, epoch + 1)
            train_seconds += seconds
            images_seen += images
            knn_now = bool(knn_every) and ((epoch + 1) % knn_every == 0 or epoch + 1 == t.epochs)
            if dist.is_main() and (knn_now or online is not None):
                backbone = unwrap(model).backbone
                query = extract_features(backbone, query_x, train.mean, train.std, symmetric=symmetric,
                                         device=device)
                if knn_now:
                    bank = extract_features(backbone, bank_x, train.mean, train.std, symmetric=symmetric,
                                            device=device)
                    epoch_metrics["knn_top1"] = knn_top1(bank, bank_y, query, query_y,
                                                         data.probe_train.num_classes, k=cfg.probe.knn_k,
                                                         temperature=cfg.probe.knn_temperature)
                if online is not None:
                    epoch_metrics["online_probe_top1"] = online.top1(query, query_y)
            bar.epoch_done(epoch + 1, t.epochs, epoch_metrics)
        history.append(epoch_metrics)
        last = epoch + 1 == t.epochs
        checkpoint = None
        if dist.is_main() and ((epoch + 1) % t.checkpoint_every == 0 or last):
            checkpoint = {
                "model": unwrap(model).state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "online_probe": online.state_dict() if online is not None else None,
                "epoch": epoch + 1,
                "history": history,
                "config": cfg.model_dump(mode="json"),
            }
        hooks.report(epoch_metrics, checkpoint)

    rate = images_seen / train_seconds if train_seconds > 0 else 0.0
    return FitResult(unwrap(model), len(history), train_seconds, rate, history)


def final_evaluation(
    cfg: ExperimentConfig, method: nn.Module, data: DataBundle, device: torch.device, out_dir: Path | None
) -> dict[str, Any]:
    """The scores every run reports: linear probe, kNN on the full splits, method extras."""
    symmetric = bool(getattr(method, "symmetric_input", False))
    norm = data.train
    out: dict[str, Any] = {}
    labelled = bool((data.probe_train.y >= 0).any())
    if labelled:
        tr = extract_features(method.backbone, data.probe_train.x, norm.mean, norm.std, symmetric=symmetric,
                              device=device)
        te = extract_features(method.backbone, data.probe_test.x, norm.mean, norm.std, symmetric=symmetric,
                              device=device)
        classes = data.probe_train.num_classes
        out["probe_top1"] = linear_probe(tr, data.probe_train.y, te, data.probe_test.y, classes,
                                         epochs=cfg.probe.epochs, batch_size=cfg.probe.batch_size,
                                         lr=cfg.probe.lr, seed=cfg.train.seed)
        out["knn_top1"] = knn_top1(tr, data.probe_train.y, te, data.probe_test.y, classes,
                                   k=cfg.probe.knn_k, temperature=cfg.probe.knn_temperature)
    was_training = method.training
    method.eval()
    x_test = to_model_input(data.probe_test.x.to(device), norm.mean, norm.std, symmetric=symmetric)
    extras = method.extra_evaluation(x_test, data.probe_test.y.to(device), out_dir)
    method.train(was_training)
    out.update({k: plain_float(v) for k, v in extras.items()})
    return out


def run_experiment(
    cfg: ExperimentConfig,
    *,
    hooks: Hooks,
    out_dir: Path | None = None,
    device: torch.device | None = None,
    data: DataBundle | None = None,
) -> dict[str, Any]:
    """Load data, fit, evaluate; the returned summary is what ``summary.json`` holds.

    Non-main ranks return an empty dict after training; only rank 0 evaluates.
    """
    device = device or pick_device(cfg.train.device)
    tic = time.perf_counter()
    data = data or load_data(cfg.data, seed=cfg.train.seed)
    result = fit(cfg, data, hooks=hooks, device=device)
    summary: dict[str, Any] = {}
    if dist.is_main():
        summary = {
            "status": "ok",
            "method": cfg.method.name,
            "backbone": cfg.backbone.name,
            "dataset": cfg.data.name,
            "epochs": result.epochs,
            "images_per_s": result.images_per_s,
            "seconds": result.train_seconds,
            "config_hash": cfg.config_hash(),
            "data_fingerprint": data.fingerprint,
            "device": describe_device(device),
            "workers": dist.world_size(),
            "seed": cfg.train.seed,
            "torch": torch.__version__,
        }
        summary.update(final_evaluation(cfg, result.method, data, device, out_dir))
        if result.history and "online_probe_top1" in result.history[-1]:  # the probe's end-of-run score
            summary["online_probe_top1"] = result.history[-1]["online_probe_top1"]
        summary["total_seconds"] = time.perf_counter() - tic
        summary["history"] = result.history
    hooks.report({k: v for k, v in summary.items() if k != "history"}, None, final=True)
    return summary

