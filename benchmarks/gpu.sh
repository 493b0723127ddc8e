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
