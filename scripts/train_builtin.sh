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
#      VAE_MIN / DECODER_MIN / CLIP_MIN / UNET_MIN (minute budgets per stage),
#      UNETS (UNet recipes to train, default "unet"; e.g. "unet unet_zero_snr" trains both on the same VAE
#      and CLIP: the first is assembled into OUTDIR/builtin, each other one into OUTDIR/builtin-NAME).
#      VAE_FROM / CLIP_FROM (a model folder): train the UNets on its VAE / CLIP instead of training those stages.
#      VAE_RECIPE (default "vae"), then its decoder alone (recipe VAE_RECIPE_decoder, where there is one):
#      "vae_robust" trains both halves on whole images with relative latent noise, then vae_robust_decoder
#      (the shipped model's VAE; budgets VAE_MIN=120 DECODER_MIN=170 match its runs). CLIP_RECIPE (default "clip"):
#      e.g. "clip_shapes" (hard negatives: the caption with its shape word swapped).
#      CHAIN=1: the UNETS are a curriculum, each continuing the one before (its weights and its text encoder,
#      which a recipe with text_encoder_lr tunes), the first from INIT_FROM (else from scratch); a tuned text
#      encoder is then locked and the CLIP's vision side trained again against it (clip_realign, so the model
#      ships one text tower), and the last UNet alone is assembled into OUTDIR/builtin. The shipped model's
#      curriculum (sessions 21-24; ~4 h on 2 cores, from the candidate's VAE and CLIP):
#        CHAIN=1 UNETS="unet_white unet_colours unet_mixed unet_mixed_again unet_world unet_world2" \
#          VAE_FROM=train_checkpoints/candidate CLIP_FROM=train_checkpoints/candidate scripts/train_builtin.sh runs/cur
#      and the whole of it from scratch: VAE_RECIPE=vae_robust CLIP_RECIPE=clip_shapes and the same CHAIN and UNETS.
#      PARALLEL (1 by default with --gpu): stages that do not depend on each other run at once (VAE beside
#      CLIP, the UNets beside each other): these small models leave most of a GPU idle.
set -euo pipefail

OUT=${1:?usage: scripts/train_builtin.sh OUTDIR [--gpu|--smoke]}
MODE=${2:-cpu}
PYTHON=${PYTHON:-$(command -v python || command -v python3)}
LAUNCH=${LAUNCH:-$PYTHON}
# Works from a checkout that is not pip-installed too (e.g. a bare GPU machine).
export PYTHONPATH="$(cd "$(dirname "$0")/.." && pwd)/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

# --gpu budgets (each stage's set-up included) leave ~1 min of a 10-minute call for start-up and packing
# (scripts/gpu_session.sh). Measured on one H100 (session 5): set-up takes 20-30 s a stage (60 s for two
# UNets at once), so a decoder budget under ~1.5 min trains next to nothing (0.7 min gave 1 step); the
# VAE ran ~2,300 crops/s beside CLIP, the decoder 2,900 images/s, CLIP 17,500 pairs/s, each UNet 10,300
# samples/s beside the other.
case "$MODE" in
  --gpu)   DEVICE=cuda; PREFIX="";      : "${VAE_MIN:=1.6}" "${DECODER_MIN:=1.6}" "${CLIP_MIN:=3.0}" "${UNET_MIN:=4.5}" ;;
  cpu)     DEVICE=cpu;  PREFIX="";      : "${VAE_MIN:=50}"  "${DECODER_MIN:=40}"  "${CLIP_MIN:=40}"  "${UNET_MIN:=230}" ;;
  --smoke) DEVICE=cpu;  PREFIX="tiny_"; : "${VAE_MIN:=2}"   "${DECODER_MIN:=2}"   "${CLIP_MIN:=2}"   "${UNET_MIN:=2}" ;;
  *) echo "unknown mode $MODE: use --gpu, --smoke or nothing (CPU)" >&2; exit 2 ;;
esac

mkdir -p "$OUT"
UNETS=${UNETS:-unet}
PARALLEL=${PARALLEL:-$([[ $DEVICE == cuda ]] && echo 1 || echo 0)}

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
  echo "wall seconds $name: $(( $(date +%s) - start ))"
}

together() {  # together "STAGE CALLS" ...: all at once with PARALLEL=1, else one after another
  if [[ $PARALLEL != 1 ]]; then
    for calls in "$@"; do eval "$calls"; done
    return
  fi
  local pids=() i=0
  for calls in "$@"; do  # each group logs to its own file: interleaved progress bars are unreadable
    i=$((i + 1)); (eval "$calls") >"$OUT/together-$i.log" 2>&1 & pids+=($!)
  done
  local failed=0
  for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
  for ((j = 1; j <= i; j++)); do tr '\r' '\n' <"$OUT/together-$j.log" | grep -v '^\s*$' | grep -v '%|' ; done
  return $failed
}

VAE_RECIPE=${VAE_RECIPE:-vae} CLIP_RECIPE=${CLIP_RECIPE:-clip}
RECIPES="$(dirname "$0")/../src/sfumato/configs/train"
if [[ -f "$RECIPES/$PREFIX${VAE_RECIPE}_decoder.toml" ]]; then  # then its decoder alone, the encoder kept
  ENCODER=$OUT/$VAE_RECIPE DECODER=$OUT/${VAE_RECIPE}_decoder
  vae_stages="stage $VAE_RECIPE vae $VAE_MIN '${INIT_FROM:-}'; stage ${VAE_RECIPE}_decoder vae $DECODER_MIN '$ENCODER'"
else
  ENCODER=$OUT/$VAE_RECIPE DECODER=$OUT/$VAE_RECIPE
  vae_stages="stage $VAE_RECIPE vae $VAE_MIN '${INIT_FROM:-}'"
fi
ENCODER=${VAE_FROM:-$ENCODER} DECODER=${VAE_FROM:-$DECODER} CLIP=${CLIP_FROM:-$OUT/$CLIP_RECIPE}
unet_stage() { stage "$1" unet "$UNET_MIN" "${INIT_FROM:-}" --vae "$ENCODER" --clip "$CLIP"; }

TOTAL_START=$(date +%s)
first_stages=()
[[ -n ${VAE_FROM:-} ]] || first_stages+=("$vae_stages")
[[ -n ${CLIP_FROM:-} ]] || first_stages+=("stage $CLIP_RECIPE clip $CLIP_MIN '${INIT_FROM:-}'")
(( ${#first_stages[@]} == 0 )) || together "${first_stages[@]}"
ASSEMBLE_CLIP=$CLIP
if [[ ${CHAIN:-0} == 1 ]]; then
  init=${INIT_FROM:-} text_from=$CLIP
  for name in $UNETS; do
    stage "$name" unet "$UNET_MIN" "$init" --vae "$ENCODER" --clip "$text_from"
    init=$OUT/$name
    [[ ! -d "$init/text_encoder" ]] || text_from=$init  # a run that tuned its text encoder keeps it beside it
  done
  if [[ -d "$init/text_encoder" ]]; then
    stage clip_realign clip "$CLIP_MIN" "$CLIP" --lock-text "$init"
    ASSEMBLE_CLIP=$OUT/clip_realign
  fi
  UNETS=$name  # the last stage is the model
else
  unet_calls=()
  for name in $UNETS; do unet_calls+=("unet_stage $name"); done
  together "${unet_calls[@]}"
fi

HARDWARE=$($PYTHON -c "import torch; print(torch.cuda.get_device_name() if '$DEVICE' == 'cuda' else f'CPU ({torch.get_num_threads()} threads)')")
first=1
for name in $UNETS; do
  model="$OUT/builtin"; [[ $first == 1 ]] || model="$OUT/builtin-$name"; first=0
  $PYTHON -m sfumato.train.cli assemble --vae "$DECODER" --clip "$ASSEMBLE_CLIP" --unet "$OUT/$name" \
    --out "$model" --hardware "$HARDWARE"
  echo; echo "== $model"
  sed -n '/^## Figures/,/^## Recipes/p' "$model/MODEL_CARD.md" | sed '$d'
done
echo "wall seconds total: $(( $(date +%s) - TOTAL_START ))"
