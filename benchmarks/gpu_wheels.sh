#!/usr/bin/env bash
# Fetch (here, where PyPI is reachable) the wheels the GPU machine's image lacks, into .whl/
# (git-ignored), for `device run` with carry [".whl"]:
# diffusers (the oracle and peer of the diffusers benchmarks) and importlib_metadata (its one
# need the image does not have). The image has torch, triton, transformers, peft, pytest,
# pytest-benchmark, hypothesis, einops, safetensors (see /work/.library/device/KINDS.md).
# flash-attn has no wheel on PyPI: the flash_attn backends stay uninstalled there.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 importlib_metadata==8.7.0
ls -la .whl
