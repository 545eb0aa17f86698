#!/usr/bin/env bash
# The GPU checks in one prepared run: the CUDA tests, then the training-step and generation
# benchmarks at real model shapes (random weights, bf16). Each part has its own time limit so one
# slow part cannot eat the others; each writes its log under $OUT (default outputs/gpu).
#
#   bash benchmarks/gpu_suite.sh                 # all parts
#   bash benchmarks/gpu_suite.sh tests train     # some of them: tests, train, generate
#
# Needs only torch, transformers, pyarrow, pillow, pyyaml and pytest (no Ray, MLflow or S3): the
# CUDA tests and both benchmarks import nothing else, so a GPU box's stock Python runs it from the
# repo root. Sizes follow the 1B and 7B presets: see docs/PERFORMANCE.md for what each row means.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-outputs/gpu}"
mkdir -p "$OUT"
export PYTHONPATH="platform:tests${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(tests train generate)
status=0

step() {  # step NAME SECONDS COMMAND...: runs one command under a time limit, logs to $OUT/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    local start=$SECONDS
    timeout --signal=KILL "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - start))s"
    [ "$rc" -eq 0 ] || status=1
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
    python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
} | tee "$OUT/device.txt"

for part in "${parts[@]}"; do
    case "$part" in
    tests)
        step gpu_tests 240 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py tests/test_generation.py
        ;;
    train)
        # 1B full model; the 7B cut to 8 of its 30 decoder layers so fp32 AdamW state fits one GPU.
        step train_1b_t2i 240 python3 benchmarks/train_step.py --preset janus-pro-1b --device cuda --task t2i \
            --batch 16 --micro-batch 8 --steps 5 --baseline-steps 1
        step train_1b_ti2i 240 python3 benchmarks/train_step.py --preset janus-pro-1b --device cuda --task ti2i \
            --batch 8 --micro-batch 4 --steps 5 --baseline-steps 1
        step train_7b8l_t2i 240 python3 benchmarks/train_step.py --preset janus-pro-7b --num-layers 8 \
            --device cuda --task t2i --batch 8 --micro-batch 4 --steps 5 --baseline-steps 1
        ;;
    generate)
        # Three columns per batch size: the published batched loop (B images of one prompt), the
        # one-at-a-time reference loop (its first 2 requests per row are enough: its images/s does
        # not depend on B) and the engine; greedy, so codes are compared with both.
        step generate_7b 540 python3 benchmarks/generate.py --preset janus-pro-7b --device cuda --dtype bfloat16 \
            --batch-sizes 1,4,16,64 --reference-images 2
        ;;
    *)
        echo "unknown part '$part': expected tests, train or generate" >&2
        exit 2
        ;;
    esac
done
exit $status
