"""Import hygiene: the pure-PyTorch layers run where only torch, torchvision and numpy exist.

A lent GPU machine has torch but no Ray, MLflow, Optuna or pyarrow (benchmarks/gpu_suite.py
runs there), and the architecture keeps Ray in rrscale/scale and MLflow in rrscale/tracking.
So every module of config, data, nets, methods and engine (found by walking the packages, so a
new module is checked too) and the GPU suite's sections must import none of the heavy
optional packages. Checked in a fresh interpreter, since this one has imported them all.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN = ("ray", "mlflow", "optuna", "pyarrow", "scipy", "pandas", "sklearn", "matplotlib", "rich")
PROBE = """
import importlib, json, pkgutil, sys
import rrscale.config
for package in ("rrscale.data", "rrscale.nets", "rrscale.methods", "rrscale.engine"):
    pkg = importlib.import_module(package)
    for info in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"{package}.{info.name}")
sys.path.insert(0, sys.argv[1])
import gpu_sections
print(json.dumps(sorted({name.split(".")[0] for name in sys.modules})))
"""


def test_pure_pytorch_layers_and_the_gpu_suite_import_no_heavy_optional_package() -> None:
    out = subprocess.run([sys.executable, "-c", PROBE, str(REPO / "benchmarks")], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    loaded = set(json.loads(out.stdout.strip().splitlines()[-1]))
    assert {"torch", "rrscale", "gpu_sections", "pydantic"} <= loaded  # the probe imported what it says
    assert not loaded & set(FORBIDDEN), sorted(loaded & set(FORBIDDEN))
