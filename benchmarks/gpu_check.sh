#!/usr/bin/env bash
# Every GPU check in one command (a lent GPU is short-lived): kernel tests compiled on the GPU,
# full-size kernel accuracy, the kernel and training-step benchmarks, host syncs of the dual loop.
# Each step has its own time limit and a failure does not stop the later ones; a table of
# step → status closes the log, and the exit status is 1 if any step failed. Results land in
# benchmarks/results/ (and, when OUT is set, a tarball of them plus the log in $OUT).
#     bash benchmarks/gpu_check.sh [warm steps for the training-step benchmark, default 30]
# On an H100 its first version (without msign-shapes, mhc-mixing and eigh-options) took 212 s with 30 warm steps;
# give the whole script 10 minutes.
set -u
cd "$(dirname "$0")/.."
WARM=${1:-30}
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
LOG=${OUT:-benchmarks/results}/gpu_check_log.txt
: > "$LOG"
declare -a SUMMARY
FAILED=0
step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
    timeout "$limit" "$@" 2>&1 | tr '\r' '\n' | grep -v '^\s*$' | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    SUMMARY+=("$(printf '%-22s rc=%-4s %4ss' "$name" "$rc" "$((SECONDS - t0))")")
    [ "$rc" -eq 0 ] || FAILED=$((FAILED + 1))
}
step environment 30 bash -c "nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,temperature.gpu --format=csv; $PY -c 'import torch, triton, modula_mhc; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())'"
step triton-tests 100 "$PY" -m pytest -q -x -m triton tests/test_kernels_triton.py -p no:cacheprovider
step full-size-kernels 60 "$PY" benchmarks/gpu_full_size.py
step msign 45 "$PY" benchmarks/bench_msign.py --size gpu
step msign-shapes 120 "$PY" benchmarks/gpu_msign_shapes.py
step sinkhorn 45 "$PY" benchmarks/bench_sinkhorn.py --size gpu
step mhc-block 90 "$PY" benchmarks/bench_mhc_block.py --size gpu --profile
step mhc-mixing 45 "$PY" benchmarks/bench_mhc_mixing.py --size gpu
step sync-check 60 "$PY" benchmarks/gpu_sync_check.py --warm-steps 5
step eigh-options 90 "$PY" benchmarks/gpu_eigh_options.py
step train-step 150 "$PY" benchmarks/bench_train_step.py --device cuda --methods adamw muon hetero --warm-steps "$WARM" --repeats 10 --threads 0
{ echo "=== summary"; printf '%s\n' "${SUMMARY[@]}"; } | tee -a "$LOG"
if [ -n "${OUT:-}" ]; then
    tar czf "$OUT/gpu_results.tgz" benchmarks/results/*cuda* benchmarks/results/*gpu* 2>/dev/null
fi
# the exit status says whether every step passed (make gpu-check fails with it)
[ "$FAILED" -eq 0 ]
