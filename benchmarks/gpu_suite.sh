#!/usr/bin/env bash
# The GPU checks as one script: the CUDA tests, then the step, epoch and data-path benchmarks whose
# figures docs/performance.md reports. Each part has its own time limit, so one that hangs costs only
# its share. Needs python3 with CUDA torch, timm and e2kd importable.
#
#   bash benchmarks/gpu_suite.sh RESULTS_DIR              # every part (limits add up to ~24 min)
#   bash benchmarks/gpu_suite.sh RESULTS_DIR PART...      # only these parts, in the order below
#   DRY_RUN=1 bash benchmarks/gpu_suite.sh RESULTS_DIR    # print the commands, run nothing
#
# Parts: steps (the distill-step benchmark, six settings; ~6 min), epoch (a small CLI epoch),
# data_path (issue 19: the loader alone on 20,000 generated JPEGs), epoch_b256 (issue 19: whole
# epochs of the 50-shot config at batch 256, both data paths, live and frozen e2KD), tests (the CUDA
# tests). One session's device time (15 min, at most 10 a call) fits e.g.
# `data_path epoch_b256 tests` or `steps epoch`, not everything.
set -u
out=${1:?usage: gpu_suite.sh RESULTS_DIR [PART...]}
shift
wanted=("$@")
known=(steps epoch data_path epoch_b256 tests)
for name in "${wanted[@]}"; do
    [[ " ${known[*]} " == *" $name "* ]] || { echo "gpu_suite.sh: unknown part '$name' (known: ${known[*]})" >&2; exit 2; }
done
dry=${DRY_RUN:-}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
cd "$(dirname "$0")/.."

want() {  # want PART: whether PART is to run
    [ ${#wanted[@]} -eq 0 ] || [[ " ${wanted[*]} " == *" $1 "* ]]
}

part() {  # part NAME SECONDS COMMAND...: run with a limit, report rc and time
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    echo "== $name (limit ${limit}s)"
    if [ -n "$dry" ]; then
        echo "$@"
        return
    fi
    timeout "$limit" "$@"
    echo "== $name: rc=$? in $((SECONDS - start)) s"
}

if [ -z "$dry" ]; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    $py -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, torch.cuda.get_device_name())"
fi

quiet=(bash -c 'exec "$@" >/dev/null' quiet)  # the JSON goes to a file; the summary line (stderr) stays

bench() {  # bench NAME ARGS...: the step benchmark, JSON to RESULTS_DIR/NAME.json
    local name=$1
    shift
    part "$name" 100 "${quiet[@]}" $py benchmarks/bench_distill_step.py --device cuda --warmup 3 --repeats 15 \
        --json "$out/$name.json" "$@"
}
if want steps; then
    bench step_b64_fp32 --batch-size 64 --precision fp32
    bench step_b64_bf16 --batch-size 64 --precision bf16
    bench step_b256_bf16_cl --batch-size 256 --precision bf16 --channels-last --explain-every 16
    bench step_b256_bf16 --batch-size 256 --precision bf16 --explain-every 16 --repeats 8
    bench bcos_b64_fp32 --family bcos --batch-size 64 --precision fp32 --repeats 8
    bench bcos_b64_bf16 --family bcos --batch-size 64 --precision bf16 --repeats 8
fi
if want epoch; then
    part epoch 150 "${quiet[@]}" $py benchmarks/bench_epoch.py --device cuda --precision bf16 --classes 10 \
        --per-class 128 --batch-size 64 --workers 8 --json "$out/epoch_cuda.json"
fi
# The data path (issue 19): a 20,000-image folder of 256-500 px JPEGs written here once, then the loader
# alone (JPEG item view with 16 workers vs decoded cache + device view on the GPU) and whole epochs of
# the packaged 50-shot config at batch 256, bf16, channels-last: live and frozen e2KD, both data paths.
# epoch_b256 measures the step rate of the same setting first (bench_distill_step, same batch, precision
# and layout), so "the epoch within 10 % of the step" compares two figures of one run.
folder=${DATA_FOLDER:-/tmp/e2kd_jpegs_20k}
if want data_path; then
    part data_path 200 "${quiet[@]}" $py benchmarks/bench_data_path.py --device cuda --workers 16 --batch-size 256 \
        --images 20000 --folder "$folder" --repeats 2 --json "$out/data_path_cuda.json"
fi
if want epoch_b256; then
    bench step_b256_bf16_cl_r34 --batch-size 256 --precision bf16 --channels-last --repeats 8
    part epoch_b256 300 "${quiet[@]}" $py benchmarks/bench_epoch.py --device cuda --precision bf16 \
        --channels-last true --batch-size 256 --workers 16 --classes 10 --per-class 2000 --epochs 2 \
        --folder "$folder" --cache none,decoded --modes e2kd,e2kd_frozen --json "$out/epoch_b256_cuda.json"
fi
if want tests; then
    part tests 170 $py -m pytest -q -p no:cacheprovider -rfEs tests/test_accelerator.py tests/test_feature_resolution.py \
        tests/test_runtime.py tests/test_devices.py tests/test_batch_views.py tests/test_reused_buffers.py \
        -k "not killed_mid_epoch"
fi
