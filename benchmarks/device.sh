#!/usr/bin/env bash
# The GPU checks in one go, for a lent GPU machine that has torch and timm but no network:
#   1. the whole test suite with CUDA visible (the CLI's device "auto" picks the GPU);
#   2. the scale pipeline (synth, extract, fit-head, fit-ridge, predict) at --train-images;
#   3. fit-head with the features held as int8 in GPU memory, on the scale run's cache;
#   4. fit_head.py's speed section (head from the cache vs the trunk every batch; 8-trial sweep).
# pytest -v so that a run cut off by its time limit still names each test it finished.
# The Python packages the machine lacks travel as wheels in .whl/ (see docs/benchmarks.md).
#     OUT=/tmp/gpu bash benchmarks/device.sh [TRAIN_IMAGES]
set -u
OUT=${OUT:-/tmp/blobenc-gpu}
mkdir -p "$OUT"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
mkdir -p /tmp/bin && printf '#!/bin/sh\nexec python3 -m blobenc "$@"\n' >/tmp/bin/blobenc && chmod +x /tmp/bin/blobenc
export PATH=/tmp/bin:$PATH PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    nproc
    python3 -c "import torch, timm, zarr, himalaya; print('torch', torch.__version__, 'timm', timm.__version__, 'zarr', zarr.__version__, 'cuda', torch.cuda.is_available())"
} 2>&1 | tee "$OUT/machine.txt"

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    echo "$name: rc=$? in $((SECONDS - t0)) s" | tee -a "$OUT/steps.txt"
}
step pytest 210 python3 -m pytest -v -n 12 -m 'slow or not slow' -p no:cacheprovider -p no:benchmark --timeout 120 tests
pkill -f 'python3 -m pytest' 2>/dev/null  # xdist workers outlive a timed-out pytest and skew what follows
step scale 180 python3 benchmarks/scale.py --workdir /tmp/scale --train-images "${1:-250}"
step fit_head_int8 120 blobenc fit-head "/tmp/scale/n${1:-250}/this/cache" --data "/tmp/scale/n${1:-250}/data" \
    --out /tmp/scale/int8 --set feature_dtype=int8 --profile -q
step fit_head_speed 120 python3 benchmarks/fit_head.py --sections speed --device cuda --train-images 400 --workdir /tmp/fh
tail -n 25 "$OUT"/pytest.log "$OUT"/scale.log "$OUT"/fit_head_int8.log "$OUT"/fit_head_speed.log
