#!/usr/bin/env bash
# Gradual pruning with sparse_training.py. Runs as is (offline digits data, vit_digits, a
# short global-magnitude recipe, 2 processes via torchrun on CPU); every setting below can be
# overridden from the environment, e.g.
#   RECIPE=recipes/gradual_pruning/<cap recipe>.yaml MODEL=deit_small_patch16_224 \
#   CONFIG=configs/deit.yaml DATASET= DATA_DIR=/data/imagenet PRETRAINED=1 ./run_gradual_pruning.sh
# The defaults download nothing, so HF_HUB_OFFLINE is left as you set it: PRETRAINED=1 fetches
# timm's weights (or uses the cached ones). Extra arguments are passed on to sparse_training.py. Ctrl-C, a killed rank or any failure
# ends all processes with a non-zero status; the last lines printed give the --resume command.
#
# Usage: bash research/run_gradual_pruning.sh [--help] [sparse_training.py options...]
# --help prints this and sparse_training.py's options once, and starts nothing.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

usage() {  # the header comment above, without its '#', and the settings with their defaults
  sed -n '2,/^set -euo pipefail/p' "${BASH_SOURCE[0]}" | sed -n 's/^# \{0,1\}//p'
  echo
  echo "Settings (environment variables) and their defaults:"
  sed -n 's/^\([A-Z_]*\)=\${\1:\{0,1\}-\(.*\)}\(.*\)$/  \1=\2\3/p' "${BASH_SOURCE[0]}"
}
for arg in "$@"; do
  if [[ "$arg" == -h || "$arg" == --help ]]; then
    usage
    echo
    exec "${PYTHON:-python}" "$HERE/sparse_training.py" --help  # one process, not one per rank
  fi
done

PYTHON=${PYTHON:-python}
DATASET=${DATASET-digits}                 # '' = ImageFolder root in DATA_DIR
DATA_DIR=${DATA_DIR:-}                    # digits: cache folder (default ~/.cache/cap_sparse/digits)
MODEL=${MODEL:-vit_digits}
CONFIG=${CONFIG:-$HERE/configs/digits_vit.yaml}
RECIPE=${RECIPE:-$HERE/recipes/gradual_pruning/gm_digits.yaml}
if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
  IFS=',' read -ra _GPUS <<< "$CUDA_VISIBLE_DEVICES"
  NUM_PROC=${NUM_PROC:-${#_GPUS[@]}}
fi
NUM_PROC=${NUM_PROC:-2}
LAUNCHER=${LAUNCHER:-torchrun}            # torchrun | legacy (torch.distributed.launch) | python
PORT=${PORT:-}                            # empty: torchrun picks a free port
EPOCHS=${EPOCHS:-}                        # dense runs only: a recipe's epoch range sets the length
BATCH_SIZE=${BATCH_SIZE:-8}               # per process (2 x 8 = global 16)
VAL_BATCH_SIZE=${VAL_BATCH_SIZE:-256}
WORKERS=${WORKERS:-0}
GS_BATCH_SIZE=${GS_BATCH_SIZE:-}          # grad-sampler batch (default: the recipe's, else -b)
CHECKPOINT_FREQ=${CHECKPOINT_FREQ:--1}
PRETRAINED=${PRETRAINED:-0}
AMP=${AMP:-0}
LOG_WANDB=${LOG_WANDB:-0}
# Runs go to $OUTPUT/train/<experiment>; the root is shared with run_one_shot_pruning.sh.
OUTPUT=${OUTPUT:-$(cd "$HERE/.." && pwd)/output}
# A new folder per run (an existing one is never overwritten; resume with the printed command).
EXPERIMENT=${EXPERIMENT:-$(basename "${RECIPE%.*}")_${MODEL}_$(date +%Y%m%d-%H%M%S)}
# W&B: WANDB_MODE as you set it, else online with credentials (wandb login), offline without.
[[ -n "${WANDB_ENTITY:-}" ]] && export WANDB_ENTITY
[[ -n "${WANDB_PROJECT:-}" ]] && export WANDB_PROJECT
[[ -n "${WANDB_NAME:-}" ]] && export WANDB_NAME

ARGS=(
  --config "$CONFIG" --dataset "$DATASET" --model "$MODEL" --sparseml-recipe "$RECIPE"
  --experiment "$EXPERIMENT" --output "$OUTPUT/train" -b "$BATCH_SIZE" -vb "$VAL_BATCH_SIZE"
  --workers "$WORKERS" --checkpoint-freq "$CHECKPOINT_FREQ" --log-sparsity --save-last
  --timeout 18000
)
[[ -n "$DATA_DIR" ]] && ARGS+=(--data-dir "$DATA_DIR")
[[ -n "$EPOCHS" ]] && ARGS+=(--epochs "$EPOCHS")
[[ -n "$GS_BATCH_SIZE" ]] && ARGS+=(--gs-loader -gb "$GS_BATCH_SIZE")
[[ "$PRETRAINED" == 1 ]] && ARGS+=(--pretrained)
[[ "$AMP" == 1 ]] && ARGS+=(--amp)
[[ "$LOG_WANDB" == 1 ]] && ARGS+=(--log-wandb --log-param-histogram)

free_port() {
  "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

SCRIPT="$HERE/sparse_training.py"
case "$LAUNCHER" in
  torchrun)
    RDZV=(--standalone)
    [[ -n "$PORT" ]] && RDZV=(--master_port="$PORT")
    exec "$PYTHON" -m torch.distributed.run "${RDZV[@]}" --nproc_per_node="$NUM_PROC" \
      "$SCRIPT" "${ARGS[@]}" "$@" ;;
  legacy)
    exec "$PYTHON" -m torch.distributed.launch --nproc_per_node="$NUM_PROC" \
      --master_port="${PORT:-$(free_port)}" "$SCRIPT" "${ARGS[@]}" "$@" ;;
  python)
    exec "$PYTHON" "$SCRIPT" "${ARGS[@]}" "$@" ;;
  *)
    echo "LAUNCHER must be torchrun, legacy or python (got '$LAUNCHER')" >&2; exit 2 ;;
esac
