#!/usr/bin/env bash
# One packed GPU run for a session that is lent a GPU (the device tool): the gpu-marked tests,
# then the whole benchmark suite with timing on, results as JSON in $OUT (or benchmarks/results).
# Commit the JSON under benchmarks/results/ with the GPU's name.
#
# The device image has torch and triton but may lack this project's install: rather than pip
# (no network there), the script lays the package out in a scratch copy where `kernels/` sits
# at `fmrt/kernels`, exactly as setup.py installs it, and runs pytest there.
#   device run:  bash benchmarks/run_gpu.sh [pytest -k expression]
#   with the wheels of benchmarks/gpu_wheels.sh: device run with carry [".whl"]
set -uo pipefail
src=$(cd "$(dirname "$0")/.." && pwd)
if ls "$src"/.whl/*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$src"/.whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
out=${OUT:-$src/benchmarks/results}
mkdir -p "$out"
work=$(mktemp -d)
cp -r "$src/fmrt" "$src/tests" "$src/benchmarks" "$src/conftest.py" "$src/pytest.ini" "$work/"
cp -r "$src/kernels" "$work/fmrt/kernels"
cd "$work" || exit 1
export PYTHONUNBUFFERED=1
gpu=$(python -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))") || exit 1
sel=()
[ $# -gt 0 ] && sel=(-k "$1")
python -m pytest -q -m gpu tests "${sel[@]}" 2>&1 | tee "$out/${gpu}_gpu_tests.txt"
python -m pytest -q benchmarks --benchmark-enable --benchmark-json="$out/${gpu}.json" \
    "${sel[@]}" 2>&1 | tail -n 40 | tee "$out/${gpu}_bench_tail.txt"
python benchmarks/report.py "$out/${gpu}.json" > "$out/${gpu}_report.md"
python benchmarks/meanflow_cost.py --device cuda --json "$out/${gpu}_meanflow_cost.json" | tail -n 5
