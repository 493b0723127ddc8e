#!/usr/bin/env bash
# The baselines comparison on a lent GPU machine (device tool), as committed in
# benchmarks/results/*_h200 (or *_h100). Not a test. Usage, from the repository root:
#   bash benchmarks/gpu.sh OUTDIR
# The machine has python3 with torch; pyzmq, diffusers and importlib_metadata travel as wheels
# in .whl/ (see docs/benchmarks.md, "GPU runs"). Every row, sequential included, runs on the
# same machine in the same call.
set -uo pipefail
out=${1:?usage: gpu.sh OUTDIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
mkdir -p /tmp/bin && printf '#!/bin/sh\nexec python3 -c "from chords_mq.apps.cli import main; main()" "$@"\n' > /tmp/bin/chords
chmod +x /tmp/bin/chords && export PATH=/tmp/bin:$PATH
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, diffusers, zmq; print('torch', torch.__version__, 'diffusers',
diffusers.__version__, 'pyzmq', zmq.__version__, torch.cuda.get_device_name(0))" | tee -a "$out/gpu.txt"
methods=sequential,chords,srds,srds-parareal,paradigms
SECONDS=0

# 1. Core 1 on the GPU: with no stop rule CHORDS returns core 1, whose latent RMSE against the
#    engine's sequential sample must print as 0.
timeout 100 chords bench --model digits --methods sequential,chords --chords-stop none \
    --cores 4,8 --steps 50 --seeds 0 --device cuda --workers 8 --out "$out/core1_cuda" \
    || echo "core1 check failed rc=$?"
echo "after core-1 check: ${SECONDS}s"

# 2. The demo model on the GPU: 8 workers share the one card.
timeout 280 chords bench --model digits --methods "$methods" --cores 4,6,8 --steps 50 \
    --seeds 0-1 --tolerance 0.1,0.02 --device cuda --workers 8 --out "$out/bench_digits" \
    || echo "digits bench failed rc=$?"
echo "after digits: ${SECONDS}s"

# 3. The synthetic model (100 ms forward) on this machine's 16 CPU cores: no core contention.
timeout 170 chords bench --model synthetic --latency-ms 100 --methods "$methods" \
    --cores 4,6,8 --steps 50 --seeds 0-2 --workers 8 --out "$out/bench_synthetic" \
    || echo "synthetic bench failed rc=$?"
echo "after synthetic: ${SECONDS}s"

# 4. Calibration of cross-class verification (broker/tolerance.py): one evaluation on the GPU
#    against the same input on this machine's CPU, at every step of a sequential solve, per
#    dtype. Commit the --out files as benchmarks/results/calibrate_<model>_cuda_h100.json (or
#    _h200): chords-broker --verify-tolerance @FILE reads them; quote them in tolerance.py.
printf '#!/bin/sh\nexec python3 -c "from chords_mq.apps.calibrate import main; main()" "$@"\n' > /tmp/bin/chords-calibrate
chmod +x /tmp/bin/chords-calibrate
timeout 120 chords-calibrate --model digits --device cuda --against cpu --steps 50 \
    --out "$out/calibrate_digits_cuda.json" || echo "digits calibration failed rc=$?"
python3 -c "from tests import tiny_pipelines as t; t.save_tiny(t.build_tiny_sd(), '/tmp/tiny-sd')" \
    && timeout 240 chords-calibrate --model /tmp/tiny-sd --device cuda --against cpu \
        --dtype float32 --dtype bfloat16 --dtype float16 --steps 20 -p prompt=a-red-cube \
        -p height=32 -p width=32 -p guidance_scale=5.0 --out "$out/calibrate_tiny_sd_cuda.json" \
    || echo "tiny-sd calibration failed rc=$?"
echo "after calibration: ${SECONDS}s"
