#!/usr/bin/env bash
# One-shot pruning sweep with working defaults (the README's main job).
#
# With no settings it trains the tiny ViT `vit_digits` on the offline digits data (once; the
# checkpoint is cached under $OUTPUT_DIR), then prunes it one-shot with global magnitude (gm),
# OBS/WoodFisher (obs), CAP (cap) and FastCAP (fast_cap) to 50-90% sparsity, and prints a table
# of top-1 accuracy (also results.jsonl/.csv and accuracy_vs_sparsity.png in $OUTPUT_DIR).
# A killed run resumes: finished rows are kept and skipped, an interrupted dense training
# continues from its last epoch, and a dense model is cached only once its training completed.
# Any failure or Ctrl-C ends the script with a non-zero status. Nothing is downloaded (no
# --pretrained), so HF_HUB_OFFLINE is left as you set it. About 5-8 min on 2 CPU cores.
#
# Every default can be overridden from the environment, e.g.
#   METHODS="gm cap" SPARSITIES="0.8 0.9" NUM_GRADS=256 bash research/run_one_shot_pruning.sh
#   MODEL=deit_small_patch16_224 DATASET=imagenet DATA_DIR=/data/imagenet \
#     CHECKPOINT=deit_small.pth RECIPE_SUFFIX=_vit GS_BATCH_SIZE=128 WORKERS=8 \
#     NPROC=8 bash research/run_one_shot_pruning.sh
#
#   MODEL, DATASET, DATA_DIR    model name and data (DATA_DIR empty: digits cache folder)
#   OUTPUT                      root of every output (default output/, as sparse_training.py)
#   OUTPUT_DIR                  results, plot and the cached dense checkpoint
#                               (default $OUTPUT/one_shot/<model>_<dataset>)
#   CHECKPOINT                  dense weights; when missing, vit_digits is trained to create it
#   METHODS                     names (recipe $RECIPE_DIR/<name>$RECIPE_SUFFIX.yaml) or paths.
#                               Names with digits recipes: gm, gm_layer (magnitude), obs, cap,
#                               fast_cap, mfac, diag_fisher, kfac, hessian_diag, gwprod (the
#                               baselines; docs/pruners.md compares them all)
#   SPARSITIES                  space separated fractions
#   NUM_GRADS, FISHER_BLOCK_SIZE, DAMP   override the recipe variables of the same name
#   GS_BATCH_SIZE, GS_AUG       grad-sampler batch size; GS_AUG=1 uses train augmentation
#   VAL_BATCH_SIZE, WORKERS, DEVICE, NPROC (>1 runs torchrun), EXTRA_ARGS
#   THREADS                     torch threads per process (default 1: the tiny default model
#                               gains nothing from more, and shared cores make them slower)
#   TRAIN_CONFIG, TRAIN_EPOCHS  dense training of vit_digits when no checkpoint exists
#   HELPER_PYTHON               interpreter of the stdlib-only dense-cache helper (python3)
#
# Usage: bash research/run_one_shot_pruning.sh [--help]   (settings: the variables above)
set -euo pipefail

usage() {  # the header comment above, without its '#'
  sed -n '2,/^set -euo pipefail/p' "${BASH_SOURCE[0]}" | sed -n 's/^# \{0,1\}//p'
}
for arg in "$@"; do
  case "$arg" in
    -h|--help) usage; exit 0 ;;
    *) echo "error: unknown argument '$arg': settings are environment variables (--help lists them)" >&2
       exit 2 ;;
  esac
done
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python}
HELPER_PYTHON=${HELPER_PYTHON:-python3}
MODEL=${MODEL:-vit_digits}
DATASET=${DATASET:-digits}
DATA_DIR=${DATA_DIR:-}
OUTPUT=${OUTPUT:-output}
OUTPUT_DIR=${OUTPUT_DIR:-$OUTPUT/one_shot/${MODEL}_${DATASET:-folder}}
METHODS=${METHODS:-"gm obs cap fast_cap"}
SPARSITIES=${SPARSITIES:-"0.5 0.6 0.7 0.8 0.9"}
RECIPE_DIR=${RECIPE_DIR:-research/recipes/one_shot}
RECIPE_SUFFIX=${RECIPE_SUFFIX:-_digits}
NUM_GRADS=${NUM_GRADS:-}
FISHER_BLOCK_SIZE=${FISHER_BLOCK_SIZE:-}
DAMP=${DAMP:-}
GS_BATCH_SIZE=${GS_BATCH_SIZE:-64}
GS_AUG=${GS_AUG:-0}
VAL_BATCH_SIZE=${VAL_BATCH_SIZE:-256}
WORKERS=${WORKERS:-0}
THREADS=${THREADS:-1}
DEVICE=${DEVICE:-}
NPROC=${NPROC:-1}
EXTRA_ARGS=${EXTRA_ARGS:-}
TRAIN_CONFIG=${TRAIN_CONFIG:-research/configs/digits_vit.yaml}
TRAIN_EPOCHS=${TRAIN_EPOCHS:-12}
DEFAULT_CHECKPOINT="$OUTPUT_DIR/dense_${MODEL}.pth"
CHECKPOINT=${CHECKPOINT:-$DEFAULT_CHECKPOINT}

data_args=(--dataset "$DATASET")
[[ -n "$DATA_DIR" ]] && data_args+=(--data-dir "$DATA_DIR")
device_args=()
[[ -n "$DEVICE" ]] && device_args+=(--device "$DEVICE")
launch=("$PYTHON")
[[ "$NPROC" -gt 1 ]] && launch=(torchrun --standalone --nproc_per_node="$NPROC")

start=$(date +%s)
mkdir -p "$OUTPUT_DIR"

# The dense model is cached by research/utils/dense_cache.py (also used by the benchmarks): it
# counts only when its training run wrote its completion marker, an interrupted training
# resumes from its last checkpoint, and a failed or interrupted one ends this script with its
# exit status (set -e) without caching anything.
train_dir="$OUTPUT_DIR/dense_training"
if [[ "$CHECKPOINT" == "$DEFAULT_CHECKPOINT" ]]; then
    "$HELPER_PYTHON" research/utils/dense_cache.py --checkpoint "$CHECKPOINT" --train-dir "$train_dir" -- \
        env OMP_NUM_THREADS="$THREADS" "${launch[@]}" research/sparse_training.py --config "$TRAIN_CONFIG" \
        --model "$MODEL" "${data_args[@]}" "${device_args[@]}" --epochs "$TRAIN_EPOCHS" \
        --workers "$WORKERS" --output "$OUTPUT_DIR" --experiment dense_training \
        --log-interval 1000 --save-last
elif [[ ! -f "$CHECKPOINT" ]]; then
    echo "error: CHECKPOINT=$CHECKPOINT does not exist" >&2
    exit 2
fi

read -r -a methods <<< "$METHODS"
for i in "${!methods[@]}"; do
    method=${methods[$i]}
    recipe="$method"
    [[ "$recipe" == *.yaml || "$recipe" == *.yml || "$recipe" == *.md ]] ||
        recipe="$RECIPE_DIR/${method}${RECIPE_SUFFIX}.yaml"
    [[ -f "$recipe" ]] || { echo "error: no recipe $recipe for method $method" >&2; exit 2; }
    # Override only the variables this recipe declares (magnitude recipes have none).
    variables=()
    for pair in "num_grads=$NUM_GRADS" "fisher_block_size=$FISHER_BLOCK_SIZE" "damp=$DAMP"; do
        if [[ -n "${pair#*=}" ]] && grep -q "^${pair%%=*}:" "$recipe"; then
            variables+=("$pair")
        fi
    done
    var_args=()
    [[ ${#variables[@]} -gt 0 ]] && var_args=(--recipe-variables "$(IFS=,; echo "${variables[*]}")")
    report_args=()  # the table and plot come once, after the last method
    [[ $i -lt $(( ${#methods[@]} - 1 )) ]] && report_args=(--no-report)
    gs_args=(--gs-loader -gb "$GS_BATCH_SIZE")
    [[ "$GS_AUG" == 1 ]] || gs_args+=(--gs-no-aug)
    echo "== $method: $recipe"
    # shellcheck disable=SC2086  # EXTRA_ARGS and SPARSITIES are word lists
    "${launch[@]}" research/one_shot_pruning.py --model "$MODEL" --initial-checkpoint "$CHECKPOINT" \
        "${data_args[@]}" "${device_args[@]}" --sparseml-recipe "$recipe" --method "$method" \
        "${var_args[@]}" "${report_args[@]}" --sparsities $SPARSITIES "${gs_args[@]}" \
        -vb "$VAL_BATCH_SIZE" --workers "$WORKERS" \
        --output "$(dirname "$OUTPUT_DIR")" --experiment "$(basename "$OUTPUT_DIR")" \
        --threads "$THREADS" --overwrite $EXTRA_ARGS
done

echo "== Done in $(( $(date +%s) - start )) s: $OUTPUT_DIR/results.csv, $OUTPUT_DIR/accuracy_vs_sparsity.png"
