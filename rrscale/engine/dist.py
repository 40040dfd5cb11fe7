"""Process-group helpers that fall back to single-process behaviour.

The training loop calls these instead of ``torch.distributed`` directly, so the same loop runs
in a unit test, under ``rrscale train`` and inside a Ray Train worker group (which sets up the
process group before the loop starts).
"""

from __future__ import annotations

import torch
import torch.distributed as torch_dist


def is_distributed() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def rank() -> int:
    return torch_dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return torch_dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def sum_across(values: torch.Tensor) -> torch.Tensor:
    """Element-wise sum over ranks (a copy; the input is unchanged)."""
    out = values.clone()
    if is_distributed():
        torch_dist.all_reduce(out, op=torch_dist.ReduceOp.SUM)
    return out


def barrier() -> None:
    if is_distributed():
        torch_dist.barrier()
