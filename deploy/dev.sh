#!/usr/bin/env bash
# Run a command inside the project's virtual environment, creating or refreshing it first.
#   deploy/dev.sh                     set up .venv only (CPU torch, pinned by constraints-cpu.txt)
#   deploy/dev.sh chords plan ...     run a command with .venv/bin first on PATH
# CHORDS_VENV overrides the location. GPU machines: see README, "Installing on a GPU machine".
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${CHORDS_VENV:-$root/.venv}"
constraints="$root/deploy/constraints-cpu.txt"
stamp="$venv/.chords-installed"

if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ] || [ "$constraints" -nt "$stamp" ]; then
  echo "deploy/dev.sh: installing chords-mq into $venv (CPU torch)..." >&2
  python3 -m venv "$venv"
  # torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
  "$venv/bin/pip" install --quiet --disable-pip-version-check -c "$constraints" "torch==2.13.0"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -c "$constraints" -e "$root[dev]"
  touch "$stamp"
fi

# No model hub is reachable from tests or CI: fail fast on an accidental hub id.
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"
export PATH="$venv/bin:$PATH"
cd "$root"
if [ "$#" -gt 0 ]; then
  exec "$@"
fi
