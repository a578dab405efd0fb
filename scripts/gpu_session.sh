#!/usr/bin/env bash
# One GPU call of at most 10 minutes: the whole built-in model from scratch (train_builtin.sh --gpu),
# packed into parts small enough to copy back (15 MB each).
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
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=15 PYTHON=${PYTHON:-python3}
# Minute budgets (each stage's set-up included) that leave ~1.5 min of the 10 for start-up and packing.
: "${VAE_MIN:=1.4}" "${DECODER_MIN:=0.7}" "${CLIP_MIN:=1.1}" "${UNET_MIN:=4.3}"
export VAE_MIN DECODER_MIN CLIP_MIN UNET_MIN
timeout 540 "$(dirname "$0")/train_builtin.sh" "$RUN" "$MODE" >"$OUT/train.log" 2>&1
echo "train_builtin.sh exit status $?"
tr '\r' '\n' <"$OUT/train.log" | grep -v '^\s*$' | tail -20
# The model, and each stage's metrics and last sample grid: what the model card and a review need.
files=(builtin)
for stage in vae vae_decoder clip unet; do
  [[ -f "$RUN/$stage/metrics.json" ]] && files+=("$stage/metrics.json")
  last=$(cd "$RUN" && ls "$stage"/samples/*.png 2>/dev/null | tail -1)
  [[ -n "$last" ]] && files+=("$last")
done
tar cf - -C "$RUN" "${files[@]}" | split -b 15M - "$OUT/builtin.tar.part-"
ls -l "$OUT"
