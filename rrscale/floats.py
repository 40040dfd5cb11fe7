"""Plain Python floats without float32 noise.

A score computed in float32 (a mean over a tensor) turns into a Python float such as
0.29499998688697815 when it leaves PyTorch. Every place that shows or stores it (MLflow, Tune's
result files, sweep.json, the Optuna study, reports) would print that noise. :func:`plain_float`
maps such a value to the shortest decimal that the same float32 reads back as (0.295), and
leaves every other number alone: a value that is not exactly a float32 was computed in double
precision and keeps all its digits. (A double that happens to be exactly a float32, such as 2**-30,
moves by less than half a float32 step.)
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np


def plain_float(value: Any) -> float:
    """``float(value)`` with float32 noise removed (see the module docstring).

    Accepts Python and NumPy numbers and 0-d tensors/arrays (anything with ``.item()``);
    non-finite values come back unchanged.
    """
    item = getattr(value, "item", None)
    if callable(item) and not isinstance(value, numbers.Real):
        value = item()
    x = float(value)
    if not math.isfinite(x):
        return x
    single = np.float32(x)
    if float(single) != x:  # not a float32 value: keep every digit
        return x
    return float(str(single))  # NumPy prints the shortest decimal that reads back as this float32
