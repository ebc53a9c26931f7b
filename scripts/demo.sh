#!/usr/bin/env bash
# The README's main job: the whole pipeline on the synthetic default, on CPU, in a few minutes.
# synth -> extract (random-init vit_tiny) -> fit-head -> predict --subject all -> evaluate
set -euo pipefail
out=${1:-demo}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}  # the demo never downloads
rm -rf "$out"
blobenc synth "$out/data" --quiet
blobenc extract "$out/data" --model vit_tiny_patch16_224 --no-pretrained \
    --layers 'blocks.[0369]' --layers blocks.11 --out "$out/cache"
blobenc fit-head "$out/cache" --data "$out/data" --out "$out/run" \
    --set epochs=10 --set batch_size=64 --set hidden_dim=256
blobenc predict "$out/run" --data "$out/data" --subject all --out "$out/pred" --quiet
blobenc evaluate "$out/pred" --data "$out/data" --json "$out/scores.json"
