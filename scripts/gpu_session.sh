#!/usr/bin/env bash
# One GPU call of at most 10 minutes: the whole built-in model from scratch (train_builtin.sh --gpu),
# with two UNets side by side on the same VAE and CLIP (the shipped architecture, and unet_attn16 with
# cross-attention at 16x16 too) for the adherence benchmark to choose between, packed into parts small
# enough to copy back (15 MB each). Session 5 paired unet_zero_snr instead: it did not win.
# Next (model card, session 10): unet_budget, 64 channels at 16x16 within the size budget, from scratch,
# on a CLIP trained in the same call (session 5's GPU CLIP was never committed, and is gone):
#   VAE_FROM=src/sfumato/models/builtin CLIP_MIN=2 UNETS="unet_budget" UNET_MIN=6.5 OUT=folder bash scripts/gpu_session.sh
# Next (model card, session 15): a VAE whose round trip keeps the shapes, trained with its encoder on whole
# images, then CLIP (on a GPU its recipe has the shape-swapped hard negatives) and unet_budget on both
# (VAE_MIN=2.5: ~400k images on an H100, at the decoder's measured rate; then vae_robust_decoder):
#   VAE_RECIPE=vae_robust VAE_MIN=2.5 DECODER_MIN=1.5 CLIP_MIN=2 UNETS="unet_budget" UNET_MIN=3.5 \
#     OUT=folder bash scripts/gpu_session.sh
# Next (model card, session 16), the first choice: that VAE and a shape-aware CLIP exist now (CPU-trained,
# train_checkpoints/candidate), so the whole call goes to unet_budget on them (~2.5 M samples):
#   VAE_FROM=train_checkpoints/candidate CLIP_FROM=train_checkpoints/candidate UNETS="unet_budget" UNET_MIN=7 \
#     OUT=folder bash scripts/gpu_session.sh
# Session 7 trained UNets only, on a given VAE and CLIP (model card):
#   VAE_FROM=src/sfumato/models/builtin CLIP_FROM=MODEL UNETS="unet_wide unet_wide_zero_snr" UNET_MIN=7 \
#     OUT=folder bash scripts/gpu_session.sh
#
#   OUT=folder bash scripts/gpu_session.sh            # on the GPU machine
#   OUT=/tmp/o bash scripts/gpu_session.sh --smoke    # here: the same plumbing with tiny recipes
#
# Wheels in .whl/ (e.g. diffusers, which a bare CUDA image may lack) are installed first.
# Back home: cat OUT/builtin.tar.part-* | tar x -C runs/gpu   (then assemble's usual checks, the
# adherence benchmark, and src/sfumato/models/builtin if it wins).
set -u
MODE=${1:---gpu}
OUT=${OUT:-out}
RUN=${RUN:-/tmp/sfumato-gpu-run}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  [[ -f /tmp/site/.installed ]] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  touch /tmp/site/.installed
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=15 PYTHON=${PYTHON:-python3}
# Both UNets beside each other on the same VAE and CLIP; the minute budgets are train_builtin.sh's --gpu ones.
export UNETS=${UNETS:-unet unet_attn16}
timeout 570 "$(dirname "$0")/train_builtin.sh" "$RUN" "$MODE" >"$OUT/train.log" 2>&1
echo "train_builtin.sh exit status $?"
tr '\r' '\n' <"$OUT/train.log" | grep -v '^\s*$' | grep -v '%|' | tail -40
# The model, and each stage's metrics and last sample grid: what the model card and a review need.
files=()
for model in "$RUN"/builtin "$RUN"/builtin-*; do [[ -d $model ]] && files+=("${model#"$RUN"/}"); done
for stage in $(printf '%s\n' vae vae_decoder ${VAE_RECIPE:-} ${VAE_RECIPE:+${VAE_RECIPE}_decoder} clip ${CLIP_RECIPE:-} $UNETS | awk '!seen[$0]++'); do
  [[ -f "$RUN/$stage/metrics.json" ]] && files+=("$stage/metrics.json")
  last=$(cd "$RUN" && ls "$stage"/samples/*.png 2>/dev/null | tail -1)
  [[ -n "$last" ]] && files+=("$last")
done
tar cf - -C "$RUN" "${files[@]}" | split -b 15M - "$OUT/builtin.tar.part-"
ls -l "$OUT"
