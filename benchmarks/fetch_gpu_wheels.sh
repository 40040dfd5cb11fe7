#!/usr/bin/env bash
# Download the wheels that benchmarks/gpu_suite.py needs on a GPU machine that has Python,
# torch, torchvision and numpy but no network: pydantic and pyyaml with everything they
# import (pydantic-core, annotated-types, typing-extensions, typing-inspection). Binary wheels
# for CPython 3.12 on manylinux x86_64 (the lent H200 machines run /opt/torch/.venv python3 3.12).
# Versions are pinned to the ones installed where this runs, so the suite runs what the tests ran.
#
#   benchmarks/fetch_gpu_wheels.sh wheels                       # into ./wheels (use an empty folder:
#                                                               # two versions of one package stop the install)
#   PYTHON_VERSION=3.11 benchmarks/fetch_gpu_wheels.sh wheels   # for another CPython
#   python benchmarks/gpu_suite.py --out results --wheels wheels   # then, on the GPU machine
#
# PYTHON (default python3) is the interpreter whose pip downloads and whose versions are pinned.
set -euo pipefail

dest="${1:?usage: benchmarks/fetch_gpu_wheels.sh DIR}"
pyver="${PYTHON_VERSION:-3.12}"
python="${PYTHON:-python3}"

mapfile -t pins < <("$python" - <<'EOF'
import importlib.metadata as md

for name in ("pydantic", "pydantic-core", "annotated-types", "typing-extensions", "typing-inspection", "pyyaml"):
    try:
        print(f"{name}=={md.version(name)}")
    except md.PackageNotFoundError:
        print(name)
EOF
)

mkdir -p "$dest"
"$python" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version "$pyver" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$dest" "${pins[@]}"
ls -1 "$dest"
