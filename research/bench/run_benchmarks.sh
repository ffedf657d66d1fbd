#!/usr/bin/env bash
# The README's benchmarks: quality on Fashion-MNIST, cost at DeiT-Tiny / ResNet-50 layer sizes,
# kernel scaling, then the tables and plots.
#
#   bash research/bench/run_benchmarks.sh            # full run (sized for 60 min, 2 quiet cores)
#   bash research/bench/run_benchmarks.sh --quick    # small settings (<= 5 min), results/quick/
#
# Writes $RESULTS (default research/bench/results, or research/bench/results/quick with
# --quick): env.json (torch version, threads, CPU), quality/ cost/ scaling/ (JSONL records),
# *.csv tables, *.png plots and summary.md. Rerun-safe: finished rows are kept and skipped,
# interrupted trainings resume. Needs the Fashion-MNIST idx files: `apt-get install
# dataset-fashion-mnist` (or FMNIST_DIR=folder holding them); without them it exits with 2.
#
# Environment overrides: RESULTS, THREADS (torch threads of the Fashion-MNIST models, default 1:
# tiny models gain nothing from more, and shared cores make them much slower), JOBS (their
# processes at a time, default 2: the two models' trainings, then one seed or gradual run per
# process; the rows do not depend on it), KERNEL_THREADS
# (cost and scaling steps, default 2), METHODS (one-shot methods: recipes
# research/recipes/one_shot/<name>_fmnist.yaml, e.g. METHODS="gm obs cap woodfisher"),
# FMNIST_DIR, PYTHON, and extra arguments appended to each step: QUALITY_ARGS, COST_ARGS,
# SCALING_ARGS (see each script's --help). STEPS (default "quality cost scaling") picks steps;
# STEPS=second_order adds the side-by-side run of the block Fisher and CAP against the
# reference's code (bench_second_order.py, ~5 min; rows in $RESULTS/second_order.jsonl).
set -euo pipefail
cd "$(dirname "$0")/../.."

quick=0
for arg in "$@"; do
    case "$arg" in
        --quick) quick=1 ;;
        -h|--help) sed -n '2,/^set -e/{/^#/p}' "$0"; exit 0 ;;
        *) echo "error: unknown argument $arg (allowed: --quick)" >&2; exit 2 ;;
    esac
done

PYTHON=${PYTHON:-python}
THREADS=${THREADS:-1}
JOBS=${JOBS:-2}
KERNEL_THREADS=${KERNEL_THREADS:-2}
STEPS=${STEPS:-"quality cost scaling"}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS="$THREADS" WANDB_MODE="${WANDB_MODE:-offline}"
if [[ $quick == 1 ]]; then
    RESULTS=${RESULTS:-research/bench/results/quick}
    METHODS=${METHODS:-"gm obs mfac fast_cap cap"}
    # One seed, 2:4 for CAP only, DeiT-Tiny only: every process loads torch and timm (seconds
    # each), so the quick run is mostly their count. The full run does all of it.
    quality=(--models vit_fmnist --sparsities 0.5 0.7 0.9 --seeds 0 --epochs 2 --nm-methods cap
             --train-limit 2000 --val-limit 1000 --num-grads 32 --gradual-epochs 1
             --holdout 500 --sweep-sparsities 0.9 --sweep-grid small)
    cost=(--models deit_tiny --deit-blocks 1 --num-grads 32 --eval-images 64)
    scaling=(--d 50000 100000 200000 --B 48 96 192 --m 192 256 384 --gemm-n 1024 --repeats 1)
    second_order=(--d 24576)
else
    RESULTS=${RESULTS:-research/bench/results}
    METHODS=${METHODS:-"gm obs mfac fast_cap_ref fast_cap cap"}
    quality=()
    cost=()
    scaling=()
    second_order=()
fi
read -r -a methods <<< "$METHODS"
read -r -a extra_quality <<< "${QUALITY_ARGS:-}"
read -r -a extra_cost <<< "${COST_ARGS:-}"
read -r -a extra_scaling <<< "${SCALING_ARGS:-}"
start=$(date +%s)
if [[ " $STEPS " == *" quality "* && "${QUALITY_ARGS:-}" != *--data-dir* ]]; then  # missing data: one line and exit 2, before any work
    (cd research && "$PYTHON" -c '
import sys
from utils.errors import SetupError
from utils.fmnist import check_dir
try:
    check_dir(None)
except SetupError as err:
    sys.exit(f"error: {err}")' 2>&1 >/dev/null) >&2 || exit 2
fi
mkdir -p "$RESULTS"

"$PYTHON" research/bench/bench_env.py "$RESULTS" "$THREADS" "$KERNEL_THREADS"

for step in $STEPS; do
    t0=$(date +%s)
    case "$step" in
        quality) "$PYTHON" research/bench/bench_quality.py --out "$RESULTS" --threads "$THREADS" --jobs "$JOBS" \
                     --methods "${methods[@]}" "${quality[@]}" "${extra_quality[@]}" ;;
        cost) "$PYTHON" research/bench/bench_cost.py --out "$RESULTS" --threads "$KERNEL_THREADS" \
                  "${cost[@]}" "${extra_cost[@]}" ;;
        scaling) "$PYTHON" research/bench/bench_scaling.py --out "$RESULTS" --threads "$KERNEL_THREADS" \
                     "${scaling[@]}" "${extra_scaling[@]}" ;;
        second_order) "$PYTHON" research/bench/bench_second_order.py --threads "$KERNEL_THREADS" \
                          --out "$RESULTS/second_order.jsonl" "${second_order[@]}" ;;
        *) echo "error: STEPS holds $step (allowed: quality cost scaling second_order)" >&2; exit 2 ;;
    esac
    echo "== $step: $(( $(date +%s) - t0 )) s"
done
"$PYTHON" research/bench/report.py "$RESULTS"
echo "== Done in $(( $(date +%s) - start )) s: $RESULTS/summary.md (tables), $RESULTS/*.png"
