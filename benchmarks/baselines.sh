#!/usr/bin/env bash
# The paper's comparison (CHORDS vs SRDS vs ParaDIGMS), as committed in benchmarks/results/.
# Run from the repository root with the project's venv active (or via deploy/dev.sh bash ...).
# Not a test: it prints tables and writes bench.json / bench.md that docs/benchmarks.md quotes.
set -euo pipefail
methods=sequential,chords,srds,srds-parareal,paradigms

# The shipped demo model: 10 prompts (one per digit) x 10 seeds per row.
chords bench --model digits --methods "$methods" --cores 4,6,8 --steps 50 --seeds 0-9 \
    --tolerance 0.1,0.02 --out benchmarks/results/bench_digits_cpu

# The synthetic model with a 100 ms forward: wall-clock on 2 CPU cores is meaningful.
chords bench --model synthetic --latency-ms 100 --methods "$methods" --cores 4,6,8 --steps 50 \
    --seeds 0-2 --out benchmarks/results/bench_synthetic_cpu
