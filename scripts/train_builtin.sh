#!/usr/bin/env bash
# Train the built-in model from scratch: vae -> vae_decoder -> clip -> unet -> assemble, then print the figures.
#
#   scripts/train_builtin.sh OUTDIR            # CPU recipe, <= ~6 h on 2 cores
#   scripts/train_builtin.sh OUTDIR --gpu      # one GPU, ~9 min in all (per-stage minute budgets)
#   scripts/train_builtin.sh OUTDIR --smoke    # tiny recipes on CPU, a minute: checks the plumbing
#
# The model lands in OUTDIR/builtin (copy it to src/sfumato/models/builtin to ship it).
# Re-running continues: finished stages are skipped, interrupted ones resume from their checkpoint.
# INIT_FROM=MODEL_DIR (a folder assemble wrote, e.g. src/sfumato/models/builtin) starts every stage from
# its weights instead of from scratch (fresh optimizer, step 0): training goes on across sessions.
# Env: PYTHON (default python, else python3), LAUNCH (e.g. "accelerate launch --multi_gpu --num_processes 4"),
#      VAE_MIN / DECODER_MIN / CLIP_MIN / UNET_MIN (minute budgets per stage).
set -euo pipefail

OUT=${1:?usage: scripts/train_builtin.sh OUTDIR [--gpu|--smoke]}
MODE=${2:-cpu}
PYTHON=${PYTHON:-$(command -v python || command -v python3)}
LAUNCH=${LAUNCH:-$PYTHON}
# Works from a checkout that is not pip-installed too (e.g. a bare GPU machine).
export PYTHONPATH="$(cd "$(dirname "$0")/.." && pwd)/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

case "$MODE" in
  --gpu)   DEVICE=cuda; PREFIX="";      : "${VAE_MIN:=1.5}" "${DECODER_MIN:=0.7}" "${CLIP_MIN:=1.2}" "${UNET_MIN:=4.5}" ;;
  cpu)     DEVICE=cpu;  PREFIX="";      : "${VAE_MIN:=50}"  "${DECODER_MIN:=40}"  "${CLIP_MIN:=40}"  "${UNET_MIN:=230}" ;;
  --smoke) DEVICE=cpu;  PREFIX="tiny_"; : "${VAE_MIN:=2}"   "${DECODER_MIN:=2}"   "${CLIP_MIN:=2}"   "${UNET_MIN:=2}" ;;
  *) echo "unknown mode $MODE: use --gpu, --smoke or nothing (CPU)" >&2; exit 2 ;;
esac

mkdir -p "$OUT"
declare -A SECONDS_OF

stage() {  # stage NAME COMMAND MINUTES INIT [extra options]; INIT: a model folder to start from, or ""
  local name=$1 command=$2 minutes=$3 init=$4 dir="$OUT/$1"; shift 4
  if [[ -f "$dir/metrics.json" ]]; then echo "== $name: done already ($dir/metrics.json)"; return; fi
  # An interrupted stage resumes its checkpoint (which already holds the weights it began with).
  local start_from=()
  if [[ -f "$dir/checkpoint.pt" ]]; then start_from=(--resume)
  elif [[ -n "$init" ]]; then start_from=(--init-from "$init"); fi
  echo "== $name (at most $minutes min on $DEVICE${init:+, from $init})"
  local start=$(date +%s)
  $LAUNCH -m sfumato.train.cli "$command" --config "$PREFIX$name" --out "$dir" --device "$DEVICE" \
    --max-minutes "$minutes" "${start_from[@]}" "$@"
  SECONDS_OF[$name]=$(( $(date +%s) - start ))
}

TOTAL_START=$(date +%s)
stage vae vae "$VAE_MIN" "${INIT_FROM:-}"
stage vae_decoder vae "$DECODER_MIN" "$OUT/vae"   # whole images, encoder kept (see its recipe)
stage clip clip "$CLIP_MIN" "${INIT_FROM:-}"
stage unet unet "$UNET_MIN" "${INIT_FROM:-}" --vae "$OUT/vae" --clip "$OUT/clip"
HARDWARE=$($PYTHON -c "import torch; print(torch.cuda.get_device_name() if '$DEVICE' == 'cuda' else f'CPU ({torch.get_num_threads()} threads)')")
$PYTHON -m sfumato.train.cli assemble --vae "$OUT/vae_decoder" --clip "$OUT/clip" --unet "$OUT/unet" \
  --out "$OUT/builtin" --hardware "$HARDWARE"

echo
for name in vae vae_decoder clip unet; do echo "wall seconds $name: ${SECONDS_OF[$name]:-skipped}"; done
echo "wall seconds total: $(( $(date +%s) - TOTAL_START ))"
sed -n '/^## Figures/,/^## Recipes/p' "$OUT/builtin/MODEL_CARD.md" | sed '$d'
