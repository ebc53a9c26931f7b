#!/usr/bin/env bash
# The README's main job: the whole pipeline on the synthetic default, on CPU, in a few minutes.
# synth -> extract (random-init vit_tiny) -> fit-head, fit-ridge -> finetune (1 epoch) -> predict --subject all
# -> evaluate -> report
set -euo pipefail
out=${1:-demo}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}  # the demo never downloads
rm -rf "$out"
blobenc synth "$out/data" --quiet
blobenc extract "$out/data" --model vit_tiny_patch16_224 --no-pretrained \
    --layers 'blocks.[0369]' --layers blocks.11 --out "$out/cache"
blobenc fit-head "$out/cache" --data "$out/data" --out "$out/run"  # defaults: schedule and PCA sized to the data
blobenc predict "$out/run" --data "$out/data" --subject all --out "$out/pred-phase1" --quiet
blobenc fit-ridge "$out/cache" --data "$out/data" --out "$out/ridge" --quiet  # the bar the head must clear
blobenc predict "$out/ridge" --data "$out/data" --subject all --out "$out/pred-ridge" --quiet
blobenc finetune "$out/run" --data "$out/data" --out "$out/run-phase2" \
    --set epochs=1 --set batch_size=64 --set lr=1e-4
blobenc predict "$out/run-phase2" --data "$out/data" --subject all --out "$out/pred" --quiet
echo "ridge baseline (fit-ridge, per subject, on the same cache):"
blobenc evaluate "$out/pred-ridge" --data "$out/data" --no-rois --json "$out/scores-ridge.json"
echo "phase 1 (head on cached features):"
blobenc evaluate "$out/pred-phase1" --data "$out/data" --no-rois --json "$out/scores-phase1.json"
echo "phase 2 (attention blocks fine-tuned for one epoch):"
blobenc evaluate "$out/pred" --data "$out/data" --json "$out/scores.json"
# One HTML page comparing both phases: curves, tables, histograms, surface maps (needs the report extra).
if python -c "import matplotlib, nilearn, jinja2" 2>/dev/null; then
    blobenc report "$out/ridge" "$out/run" "$out/run-phase2" --data "$out/data" \
        --predictions "$out/pred-ridge" --predictions "$out/pred-phase1" --predictions "$out/pred" \
        --out "$out/report.html"
    echo "report: $out/report.html"
else
    echo "report skipped: pip install -e '.[report]' for blobenc report"
fi
