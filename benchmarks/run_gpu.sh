#!/usr/bin/env bash
# The GPU runs of a session that is lent a GPU (the device tool), in phases that each fit the
# tool's 10-minute command limit:
#   bash benchmarks/run_gpu.sh tests    the gpu-marked tests (kernels compiled for real, CUDA graphs)
#   bash benchmarks/run_gpu.sh ops      bench_training, bench_sampling, bench_attention,
#                                       bench_flash_attention (fused ops vs eager vs compile)
#   bash benchmarks/run_gpu.sh models   bench_dit, bench_wan_diffusers (whole-model steps) and
#                                       the MeanFlow-vs-FM cost script
#   bash benchmarks/run_gpu.sh PHASE 'pytest -k expression'   a subset of a phase
# Each phase writes to $OUT (or benchmarks/results/): <gpu>_<phase>.json (pytest-benchmark),
# its log, and <gpu>_<phase>_report.md (benchmarks/report.py).
# Commit the JSON under benchmarks/results/.
#
# The device image has torch, triton, transformers, pytest-benchmark but no diffusers and no
# network: run benchmarks/gpu_wheels.sh here first and name ".whl" in the run's carry; the
# wheels are installed to /tmp/site. Rather than pip-installing fmrt, the script lays the
# package out in a scratch copy where `kernels/` sits at `fmrt/kernels`, as setup.py installs it.
set -uo pipefail
phase=${1:?usage: run_gpu.sh tests|ops|models [pytest -k expression]}
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
gpu=$(python3 -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))") || exit 1
sel=()
[ $# -gt 1 ] && sel=(-k "$2")
bench() {  # bench FILES...: the files' benchmarks with timing on, into <gpu>_<phase>.json
    python3 -m pytest -q -p no:cacheprovider "$@" "${sel[@]}" --benchmark-enable \
        --benchmark-json="$out/${gpu}_${phase}.json" 2>&1 | tee "$out/${gpu}_${phase}.log" | tail -n 30
}
case $phase in
    tests)  python3 -m pytest -q -p no:cacheprovider -m gpu tests "${sel[@]}" 2>&1 \
                | tee "$out/${gpu}_gpu_tests.txt" | tail -n 60 ;;
    ops)    bench benchmarks/bench_training.py benchmarks/bench_sampling.py \
                benchmarks/bench_attention.py benchmarks/bench_flash_attention.py ;;
    models) bench benchmarks/bench_dit.py benchmarks/bench_wan_diffusers.py
            python3 benchmarks/meanflow_cost.py --device cuda --steps 10 \
                --json "$out/${gpu}_meanflow_cost.json" | tail -n 5 ;;
    *)      echo "unknown phase $phase" >&2; exit 2 ;;
esac
# this phase's tables; the README's come from all phases' JSON once committed (see README)
[ -f "$out/${gpu}_${phase}.json" ] && python3 benchmarks/report.py "$out/${gpu}_${phase}.json" \
    > "$out/${gpu}_${phase}_report.md"
exit 0
