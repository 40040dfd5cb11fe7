"""What every benchmark script shares: honest step timing, the timed model, the result header and file."""

from __future__ import annotations

import datetime as dt
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rrscale.config import ExperimentConfig
from rrscale.engine.loop import describe_device
from rrscale.methods import build_method


def timed(step: Callable[[], object], steps: int, warmup: int, device: torch.device) -> float:
    """Seconds per step after ``warmup`` untimed steps: CUDA events on a GPU, wall clock on CPU."""
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0 / steps
    tic = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - tic) / steps


def timing_method(cfg: ExperimentConfig, device: torch.device) -> nn.Module:
    """The method of ``cfg`` set up as the training loop sets it up (channels_last, cuDNN autotune)."""
    torch.manual_seed(0)
    method = build_method(cfg, 3, None).to(device)
    if device.type == "cuda":
        method = method.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
    return method


def result_header(benchmark: str, device: torch.device) -> dict[str, Any]:
    """Every result file names the benchmark, the device, the date and the versions."""
    return {
        "benchmark": benchmark,
        "device": describe_device(device),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def write_result(path: Path, payload: dict[str, Any]) -> Path:
    """Write a result file (its folder made if needed) and say where on stderr."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}", file=sys.stderr)
    return path
