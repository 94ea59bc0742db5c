#!/usr/bin/env bash
# The GPU runs of a session that is lent a GPU (the device tool: 15 minutes of device time in
# all, at most 10 minutes a command), as one short first call and smaller later ones:
#
#   bash benchmarks/run_gpu.sh first      the gpu-marked tests (4 pytest-xdist workers: their
#                                         ~80 Triton builds compile in parallel), then every
#                                         case a performance goal of the fused ops judges, at
#                                         kernel level (pytest -m goal: add_noise, SFT step and
#                                         guided step at [8,16,21,90,160], q/k norm + RoPE
#                                         fwd+bwd at Wan's head counts, the JVP and forward
#                                         flash attention, the sampling loop's host cost)
#   bash benchmarks/run_gpu.sh tests      the gpu tests alone; `goals`: the goal benchmarks alone
#   bash benchmarks/run_gpu.sh diag       which fp32 flash-attention tile configurations run
#                                         correctly (benchmarks/gpu_diag_attention.py)
#   bash benchmarks/run_gpu.sh training   the rest of bench_training.py      (later calls)
#   bash benchmarks/run_gpu.sh sampling   the rest of bench_sampling.py
#   bash benchmarks/run_gpu.sh attention  the rest of bench_attention.py and bench_flash_attention.py
#   bash benchmarks/run_gpu.sh models     bench_dit, bench_wan_diffusers, the MeanFlow-vs-FM cost
#   bash benchmarks/run_gpu.sh diffusers  bench_diffusers_models: FLUX.1/.2, Qwen-Image, HunyuanVideo,
#                                         LTX transformer fwd+bwd, stock vs accelerate (~2-3 min)
#   bash benchmarks/run_gpu.sh fewstep    issue 16's few-step goal over many seeds at 960 clips
#                                         (benchmarks/few_step_goal.py: the teacher at 50 steps and
#                                         three students, seeds fixed beforehand; at most 300 s)
#   bash benchmarks/run_gpu.sh PHASE 'pytest -k expression'   a subset of a phase
#   FMRT_PHASE_LIMIT=SECONDS bash benchmarks/run_gpu.sh PHASE  another cap for a one-step phase
#
# Each phase writes to $OUT (or benchmarks/results/): <gpu>_<phase>.jsonl, one benchmark per line
# appended as soon as it is timed (a run cut off at its limit keeps what it measured), the
# pytest-benchmark JSON <gpu>_<phase>.json (written at the end), its log, and
# <gpu>_<phase>_report.md (benchmarks/report.py, from the .jsonl). Progress: one line per test
# (pytest -v) and a timestamp per step. Each step runs under `timeout` so that the phase ends
# inside the tool's command limit with its files written; a step cut off is named in the log.
#
# The device image has torch, triton, pytest, pytest-benchmark, pytest-xdist but no diffusers and
# no network: run benchmarks/gpu_wheels.sh here first and name ".whl" in the run's carry; the
# wheels are installed to /tmp/site (without them the diffusers-dependent tests and the
# sampling-loop comparison skip, nothing fails). Rather than pip-installing fmrt, the script lays
# the package out in a scratch copy where `kernels/` sits at `fmrt/kernels`, as setup.py does.
# See benchmarks/README.md for the exact device-tool calls, their timeouts and the time budget.
set -uo pipefail
phase=${1:?usage: run_gpu.sh first|tests|goals|diag|training|sampling|attention|models|diffusers|fewstep [pytest -k expression]}
src=$(cd "$(dirname "$0")/.." && pwd)
t_start=$SECONDS
stamp() { echo "[run_gpu $phase +$((SECONDS - t_start))s] $*"; }
if ls "$src"/.whl/*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$src"/.whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
out=${OUT:-$src/benchmarks/results}
mkdir -p "$out"
work=$(mktemp -d)
cp -r "$src/fmrt" "$src/tests" "$src/benchmarks" "$src/conftest.py" "$src/pytest.ini" "$work/"
rm -rf "$work/fmrt/kernels"
cp -r "$src/kernels" "$work/fmrt/kernels"
cd "$work" || exit 1
export PYTHONUNBUFFERED=1
# (on a machine without CUDA the phases run as a dry run: tiny shapes, gpu tests skipped)
gpu=$(python3 -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_')
                  if torch.cuda.is_available() else 'cpu')") || exit 1
xdist=()   # parallel gpu tests where pytest-xdist is installed (the GPU image has it)
python3 -c "import xdist" 2> /dev/null && xdist=(-n 4)
stamp "device $gpu, $(python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)')"
sel=()
[ $# -gt 1 ] && sel=(-k "$2")
base="$out/${gpu}_${phase}"
OPS=(benchmarks/bench_training.py benchmarks/bench_sampling.py benchmarks/bench_attention.py
     benchmarks/bench_flash_attention.py)

bench() {  # bench SECONDS PYTEST-ARGS...: benchmarks with timing on, streamed to $base.jsonl
    local limit=$1
    shift
    [ -e "$base.jsonl" ] || : > "$base.jsonl"
    stamp "benchmarks: $* (at most ${limit}s)"
    FMRT_BENCH_JSONL="$base.jsonl" timeout -k 10 "$limit" python3 -m pytest -v -p no:cacheprovider \
        "$@" "${sel[@]}" --benchmark-enable --benchmark-json="$base.json" 2>&1 | tee -a "$base.log" \
        | grep -E "PASSED|FAILED|ERROR|SKIPPED|passed|failed|Error"
    [ "${PIPESTATUS[0]}" = 124 ] && stamp "benchmarks CUT OFF at ${limit}s (the .jsonl keeps what ran)"
}

gpu_tests() {  # gpu_tests SECONDS: the gpu-marked tests, pytest-xdist workers where installed
    stamp "gpu tests (at most ${1}s)"
    local t0=$SECONDS
    timeout -k 10 "$1" python3 -m pytest -q -p no:cacheprovider "${xdist[@]}" -m gpu tests \
        --continue-on-collection-errors "${sel[@]}" -rfE 2>&1 | tee "$out/${gpu}_gpu_tests.txt" \
        | tail -n 40
    [ "${PIPESTATUS[0]}" = 124 ] && stamp "gpu tests CUT OFF at ${1}s"
    # A CUDA error (an illegal address) poisons its worker's context and fails every later test
    # of that worker: rerun each failed test alone, 8 processes at a time, in what is left of
    # the budget, so the file says which failures are real (seen on the first H200 run: 39
    # failures, 3 real causes)
    local left=$(( $1 - (SECONDS - t0) ))
    local failed
    failed=$(grep -E "^FAILED " "$out/${gpu}_gpu_tests.txt" | sed -E 's/^FAILED ([^ ]+).*/\1/' | sort -u)
    if [ -n "$failed" ] && [ "$left" -gt 20 ]; then
        stamp "rerunning $(echo "$failed" | wc -l) failed tests one per process (at most ${left}s)"
        echo "$failed" | timeout -k 5 "$left" xargs -P 8 -I{} sh -c \
            'timeout 90 python3 -m pytest -q -p no:cacheprovider "$1" > /dev/null 2>&1 \
             && echo "ALONE PASSED $1" || echo "ALONE FAILED $1"' _ {} \
            | sort | tee -a "$out/${gpu}_gpu_tests.txt" | grep "ALONE FAILED"
    fi
}

limit=${FMRT_PHASE_LIMIT:-}
case $phase in
    first)     gpu_tests 140
               bench 200 -m goal "${OPS[@]}" ;;
    tests)     gpu_tests "${limit:-140}" ;;
    goals)     bench "${limit:-200}" -m goal "${OPS[@]}" ;;
    diag)      stamp "fp32 flash-attention tile configurations (at most ${limit:-150}s)"
               timeout -k 10 "${limit:-150}" python3 benchmarks/gpu_diag_attention.py \
                   --json "$base.json" -j 12 --timeout 100 2>&1 | tee "$base.log" | tail -n 8 ;;
    training)  bench 500 -m "not goal" benchmarks/bench_training.py ;;
    sampling)  bench 540 -m "not goal" benchmarks/bench_sampling.py ;;
    attention) bench 500 -m "not goal" benchmarks/bench_attention.py benchmarks/bench_flash_attention.py ;;
    models)    bench 420 benchmarks/bench_dit.py benchmarks/bench_wan_diffusers.py
               stamp "meanflow_cost"
               timeout -k 10 100 python3 benchmarks/meanflow_cost.py --device cuda --steps 10 \
                   --json "$out/${gpu}_meanflow_cost.json" | tail -n 5 ;;
    diffusers) bench "${limit:-170}" benchmarks/bench_diffusers_models.py ;;
    fewstep)   fs=(--out "$out/${gpu}_fewstep" --root "$src" --time-limit "${limit:-300}")
               # without CUDA: a dry run (60 clips, a 2-step teacher, one seed of each kind,
               # a 192-clip reference for the pooled verdict)
               [ "$gpu" = cpu ] && fs+=(--device cpu --num-per-class 10 --teacher-steps 2
                                        --check-seeds 0 --seeds 13 --ref-per-class 32)
               stamp "few-step goal (seeds until ${limit:-300}s have passed)"
               timeout -k 10 $(( ${limit:-300} + 120 )) python3 -m benchmarks.few_step_goal \
                   "${fs[@]}" 2>&1 | tee "$base.log" | tail -n 40 ;;
    *)  echo "unknown phase $phase" >&2; exit 2 ;;
esac
# this phase's tables; the README's come from all phases' files once committed (see README)
[ -s "$base.jsonl" ] && python3 benchmarks/report.py "$base.jsonl" \
    --command "bash benchmarks/run_gpu.sh $phase" > "${base}_report.md" && tail -n 30 "${base}_report.md"
stamp "done"
exit 0
