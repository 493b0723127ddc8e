#!/usr/bin/env bash
# chords-calibrate on a CPU-only machine (no GPU here): one evaluation of the reference CPU
# setting against another CPU kernel setting (threads=1, mkldnn=off, or another
# ATEN_CPU_CAPABILITY in a child process), for tests/tiny_pipelines.py's Stable Diffusion
# (float32, bfloat16) and the digits model, 20 steps; writes
# benchmarks/results/calibrate_<model>_<setting>_cpu.json (the files chords-broker
# --verify-tolerance @FILE reads). Not a test. Usage, from the repository root:
#   bash benchmarks/calibrate_cpu.sh
set -euo pipefail
export HF_HUB_OFFLINE=1
py=${PYTHON:-.venv/bin/python}
results=benchmarks/results
folder=$(mktemp -d)/tiny-sd
trap 'rm -rf "$(dirname "$folder")"' EXIT
"$py" -c "from tests import tiny_pipelines as t; t.save_tiny(t.build_tiny_sd(), '$folder')"
sd=(-p prompt=a-red-cube -p height=32 -p width=32 -p guidance_scale=5.0)
for setting in threads=1 mkldnn=off capability=default capability=avx2; do
    tag=${setting/=/_}
    "$py" -m chords_mq.apps.calibrate --model "$folder" --dtype float32 --dtype bfloat16 \
        --steps 20 --against "cpu:$setting" "${sd[@]}" --out "$results/calibrate_tiny_sd_${tag}_cpu.json"
    "$py" -m chords_mq.apps.calibrate --model digits --steps 20 --against "cpu:$setting" \
        --out "$results/calibrate_digits_${tag}_cpu.json"
done
# bfloat16 cannot catch scale:1.001 (1.001 is 1 in bfloat16): what it catches at 1.05.
"$py" -m chords_mq.apps.calibrate --model "$folder" --dtype bfloat16 --steps 20 \
    --against cpu:mkldnn=off --catch 1.05 "${sd[@]}" \
    --out "$results/calibrate_tiny_sd_mkldnn_off_catch105_cpu.json"
