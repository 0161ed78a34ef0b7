#!/usr/bin/env bash
# The CUDA tests and every benchmark on one GPU in one prepared run (the GPU figures of
# BENCHMARKS.md), under 10 minutes: each step is capped at STEP_SECONDS (default 110). Writes
# <name>.json and <name>.log per benchmark into OUT_DIR (gamma's JSON after every case, so a
# capped run keeps what it measured) and cuda_tests.log.
#
#   bash benchmarks/gpu_suite.sh OUT_DIR              # on the GPU machine, from the repo root
#   DEVICE=cpu QUICK=1 bash benchmarks/gpu_suite.sh /tmp/suite   # toy sizes: checks the script
#
# torch must be installed; the package is used from the checkout (PYTHONPATH), so no install is
# needed. PYTHON (default python3, else python) runs everything. Wheels in .whl/ are installed
# into a temporary folder first: MONAI and pymedphys, which the lent GPU machines lack and cannot
# download (BENCHMARKS.md says how to bring them). MONAI (training step) and pymedphys (gamma)
# are used when importable, else those benchmarks time ours alone; the sliding-window benchmark
# compares with MONAI and is skipped without it.
set -uo pipefail
out=${1:?usage: gpu_suite.sh OUT_DIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python=${PYTHON:-$(command -v python3 || command -v python)}
if compgen -G ".whl/*.whl" > /dev/null; then
    site=$(mktemp -d)
    "$python" -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:$site" && echo "== installed $(ls .whl | tr '\n' ' ')"
fi
device=${DEVICE:-cuda}
limit=${STEP_SECONDS:-110}  # tests + 4 benchmarks, 5 x 110 s: room for the start under a 10-minute command
status=0

run() {  # run NAME SCRIPT ARGS...: one benchmark, its JSON and log into $out
    local name=$1 script=$2
    shift 2
    echo "== $name: $python benchmarks/$script $*"
    timeout "$limit" "$python" "benchmarks/$script" "$@" --json "$out/$name.json" > "$out/$name.log" 2>&1
    local code=$?
    tail -n 12 "$out/$name.log"
    if [ "$code" -ne 0 ]; then echo "== $name failed (exit $code)"; status=1; fi
}

# MONAI's DiffusionModelUNet (training step) needs einops too; its sliding_window_inference does not
if "$python" -c "import monai, einops" 2>/dev/null; then train_models="simple baseline monai"
else train_models="simple baseline"; fi
if "$python" -c "import monai" 2>/dev/null; then have_monai=1
else have_monai=0; echo "== MONAI not installed: sliding_window skipped"; fi
sliding() { if [ "$have_monai" = 1 ]; then run sliding_window bench_sliding_window.py "$@"; fi; }
# The CUDA-only tests first (skipped on a CPU): training in bf16 and fp16, GPU checkpoint resumed
# on the CPU, deterministic steps, inference and gamma against the CPU (tests/test_cuda.py).
echo "== cuda_tests: $python -m pytest tests/test_cuda.py and the other CUDA tests"
timeout "$limit" "$python" -m pytest -q -p no:cacheprovider tests/test_cuda.py \
    tests/test_gamma.py::test_cuda_tensors_give_the_cpu_result \
    tests/test_sliding_window.py::test_cuda_volume_with_cpu_accumulator_and_cpu_generator > "$out/cuda_tests.log" 2>&1
code=$?
tail -n 5 "$out/cuda_tests.log"
if [ "$code" -ne 0 ]; then echo "== cuda_tests failed (exit $code)"; status=1; fi
if [ "${QUICK:-0}" = 1 ]; then
    run train_step bench_train_step.py --device "$device" --models simple baseline --patch 16 --base 8 \
        --levels 2 --precision fp32 --repeats 1 --warmup 0 --matmul-size 64
    sliding --device "$device" --shape 40 40 24 --patch 16 --overlap 4 --repeats 1 --no-memory
    run diffusion_predict bench_diffusion_predict.py --device "$device" --shape 24 24 16 --patch 16 --overlap 4 \
        --steps 2 --base 8 --levels 2 --batch-sizes 1 --repeats 1
    run gamma bench_gamma.py --device "$device" --sizes 64x64x64 --no-openkbp --repeats 1 --min-seconds 0 \
        --pymedphys-repeats 1 --threads 1
else
    # shellcheck disable=SC2086  # the model list is meant to split into words
    run train_step bench_train_step.py --device "$device" --models $train_models --patch 64 96 \
        --precision fp32 bf16 --base 48 --repeats 5
    sliding --device "$device" --model unet
    # GPU-sized (the script's defaults are CPU-sized): 18 windows of 96^3, 50 DDIM steps, both modes
    run diffusion_predict bench_diffusion_predict.py --device "$device" --shape 192 192 128 --patch 96 \
        --overlap 24 --steps 50 --base 16 --levels 4 --batch-sizes 1 4 --repeats 1
    # pymedphys only up to 128x128x64 (256x256x128 alone takes it ~25 s), short samples of ours, and
    # the 1 mm phantom (~1.5 min to build on the CPU) last: the JSON is written after every case
    run gamma bench_gamma.py --device "$device" --no-openkbp --big --pymedphys-repeats 1 --threads 1 \
        --skip-pymedphys-above 1100000 --min-seconds 0.3
fi
exit $status
