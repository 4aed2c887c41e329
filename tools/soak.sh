#!/usr/bin/env bash
# Trust under load: what CI's machine looks like when it is shared. Each mode runs beside BURNERS CPU-bound
# processes and stops at the first failure; results go to $OUT (default /tmp/soak), one line per try in summary.
#
#   bash tools/soak.sh suite [N]   # N x .ci/run on a fresh clone of HEAD (default 3)
#   bash tools/soak.sh runs [N]    # N consecutive 2-rank tiny runs each of zero3 (fresh and resumed), zero2, fsdp (default 10)
set -uo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${OUT:-/tmp/soak}"
BURNERS="${BURNERS:-4}"
mode="${1:?usage: soak.sh suite|runs [N]}"
mkdir -p "$OUT"
: > "$OUT/summary"

pids=()
for _ in $(seq "$BURNERS"); do timeout 14400 python -c 'while True: pass' & pids+=($!); done
trap 'kill "${pids[@]}" 2>/dev/null' EXIT

record() { echo "$*" | tee -a "$OUT/summary"; }

if [ "$mode" = suite ]; then
    clone="$(dirname "$REPO")/soak-clone"  # beside the checkout, so ../shared is where CI has it
    for i in $(seq "${2:-3}"); do
        rm -rf "$clone" && git clone -q "$REPO" "$clone"
        start=$(date +%s)
        (cd "$clone" && CI=true bash .ci/run < /dev/null) > "$OUT/suite_$i.log" 2>&1
        rc=$?
        record "suite $i $(git -C "$clone" rev-parse --short HEAD) exit $rc in $(( $(date +%s) - start )) s: $(grep -E '(passed|failed)' "$OUT/suite_$i.log" | tail -1)"
        [ $rc -eq 0 ] || exit $rc
    done
    python -m pip install -q -e "$REPO[test]" > /dev/null  # .ci/run pointed the editable install at the clone
elif [ "$mode" = runs ]; then
    cd "$REPO" && mkdir -p "$OUT/runs"
    args=(--model gpt2-tiny --micro-batch 2 --seq-len 32 --total-batch-tokens 128 --log.val_every=0 --log.sample_every=0
          --log.tensorboard=false --checkpoint.every=3)
    launch() { OMP_NUM_THREADS=1 python -m torch.distributed.run --nproc_per_node 2 --master_port "$(python -c 'from gpt2_scale.distributed import free_port; print(free_port())')" recipes/tiny.py "$@"; }
    for i in $(seq "${2:-10}"); do
        for engine in zero3 zero2 fsdp; do
            dir="$OUT/runs/$engine-$i"
            rm -rf "$dir"
            launch "${args[@]}" --engine "$engine" --max-steps 3 --run-dir "$dir" > "$dir.log" 2>&1
            rc=$?
            record "run $i $engine fresh: exit $rc"
            [ $rc -eq 0 ] || exit $rc
            if [ "$engine" = zero3 ]; then
                launch --resume "$dir" --max-steps 6 >> "$dir.log" 2>&1
                rc=$?
                record "run $i $engine resumed: exit $rc"
                [ $rc -eq 0 ] || exit $rc
            fi
        done
    done
else
    echo "usage: soak.sh suite|runs [N]" >&2
    exit 2
fi
