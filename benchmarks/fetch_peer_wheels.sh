#!/usr/bin/env bash
# Download, on a machine that reaches the package index, the wheels a GPU machine without one
# needs for the peer comparisons: diffusers (layerwise casting and the demo model), torchao and
# bitsandbytes, accelerate and peft (the diffusers integration), plus the one dependency of theirs
# such an image commonly lacks.
#
#   bash benchmarks/fetch_peer_wheels.sh [DIR]          # default DIR: .whl (git-ignored)
#   QK_WHEELS=DIR bash benchmarks/run_gpu_suite.sh OUT  # on the GPU machine: installs DIR/*.whl
#
# The versions are the ones the committed H100 results were measured with (torch 2.11, CUDA 13).
# Target: CPython 3.12 on x86-64 Linux (PYVER / the platform list below to change it).
set -euo pipefail
DIR=${1:-.whl}
PYVER=${PYVER:-3.12}
PINS=(diffusers==0.37.1 torchao==0.18.0 bitsandbytes==0.50.2 importlib_metadata==8.7.0 accelerate==1.16.0 peft==0.21.2)
mkdir -p "$DIR"
python3 -m pip download --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d "$DIR" "${PINS[@]}"
ls -la "$DIR"
du -sh "$DIR"
