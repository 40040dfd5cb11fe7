"""Checkpoints are plain dicts of state dicts + epoch + config, written atomically.

They are read with ``torch.load(weights_only=True)``: tensors, numbers, strings and containers
only, so a checkpoint from elsewhere can hold no code that runs when it is opened (a pickle
naming ``os.system`` is refused, not executed). Everything rrscale saves fits in that subset.
"""

from __future__ import annotations

import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from rrscale.config import ExperimentConfig, brief, flatten, oversized

REQUIRED_KEYS = ("model", "optimizer", "epoch", "config")
# The sections of a config that decide what a run trains (not where it reports or how it scales).
TRAINING_SECTIONS = ("data", "backbone", "method", "views", "train", "probe")
# An rrscale checkpoint holds a few thousand values besides its tensors (history included);
# this bounds what a crafted file whose containers share references could expand into.
MAX_STATE_VALUES = 1_000_000


class CheckpointError(ValueError):
    """A checkpoint that cannot be used here; ``str(err)`` is the reason, one line."""


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write to a temporary file in the same folder, then ``os.replace``: never a torn file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{path.stem}-", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; a checkpoint is shared like any output
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def stale_temp_files(folder: Path) -> list[Path]:
    """Temporary files :func:`save_checkpoint` leaves when its process is killed mid-write."""
    return sorted(folder.glob("checkpoint-*.tmp"))


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The state saved by :func:`save_checkpoint`; :class:`CheckpointError` for anything else."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL (\S+)", str(exc))
        if found is None:
            raise CheckpointError(f"not a PyTorch checkpoint ({brief(str(exc).splitlines()[0], 100)})") from None
        raise CheckpointError(f"refused: it holds Python objects ({found.group(1)}) that could run code when "
                              f"loaded; rrscale checkpoints hold only tensors and plain values") from None
    except (OSError, RuntimeError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"not a PyTorch checkpoint ({type(exc).__name__})") from None
    if not isinstance(state, dict) or not all(k in state for k in REQUIRED_KEYS):
        raise CheckpointError(f"not an rrscale checkpoint (expected a dict with keys {', '.join(REQUIRED_KEYS)})")
    if not isinstance(state["config"], dict) or not isinstance(state["model"], dict):
        raise CheckpointError("not an rrscale checkpoint (config and model must be dicts)")
    if oversized(state, MAX_STATE_VALUES, max_depth=16):
        raise CheckpointError(f"refused: it holds more than {MAX_STATE_VALUES:,} values or nests too deeply")
    return state


def config_changes(saved: dict[str, Any], cfg: ExperimentConfig) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (checkpoint's value, cfg's value)}`` for the training values that differ."""
    old = flatten({k: v for k, v in saved.items() if k in TRAINING_SECTIONS})
    new = flatten(cfg.training_dict())
    return {k: (old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)}


def check_compatible(
    state: dict[str, Any], cfg: ExperimentConfig, model: torch.nn.Module, *, with_optimizer: bool
) -> None:
    """Raise :class:`CheckpointError` unless ``state``'s weights fit ``model``, built from ``cfg``
    (on the meta device is enough: only shapes count), and, ``with_optimizer``, its optimiser.

    Changed values that keep every weight's shape (lr, K, epochs, views...) are fine; what
    changes a weight's shape, or the optimiser whose moments the checkpoint holds, is not.
    The message names the config values responsible.
    """
    changes = config_changes(state["config"], cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    saved = {k: tuple(getattr(v, "shape", ())) for k, v in state["model"].items()}
    optimizer_changed = with_optimizer and "train.optimizer" in changes
    if expected == saved and not optimizer_changed:
        return
    shaped = [k for k in changes if k.startswith(("backbone.", "method.", "data.name"))]
    shaped += ["train.optimizer"] if optimizer_changed else []
    if shaped:
        why = ", ".join(f"{k}: {_show(changes[k][0])} in the checkpoint, {_show(changes[k][1])} now" for k in shaped[:3])
    else:
        first = next((k for k in sorted(expected.keys() | saved.keys()) if expected.get(k) != saved.get(k)), "")
        why = f"weight {first}: shape {list(saved.get(first, ()))} in the checkpoint, {list(expected.get(first, ()))} now"
    raise CheckpointError(f"was written by a different config ({why})")


def _show(value: Any) -> str:
    return brief(value, 40) if not isinstance(value, str) else value[:40]
