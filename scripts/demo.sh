#!/usr/bin/env bash
# The whole pipeline on synthetic data: the README's main job.
set -euo pipefail
out=${1:-demo}
rm -rf "$out"
blobenc synth "$out/data"
