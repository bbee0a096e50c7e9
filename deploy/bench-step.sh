#!/usr/bin/env bash
# The local training step against its PyTorch eager twin on this machine's CPU: fedtune's CNN on
# libtorch (target ≤ 1.2× PyTorch) and on flex (pure Rust, target ≤ 2× PyTorch), and the same
# model, batch and optimiser in PyTorch (the python of the libtorch venv), with the ratios.
#
#   deploy/bench-step.sh [DATA=data/fashion-mnist-subset] [BATCHES=64,256] [STEPS=50]
#
# Builds the workspace with the tch features as CI does (the same build outputs).
set -euo pipefail
cd "$(dirname "$0")/.."
data="${1:-data/fashion-mnist-subset}"; batches="${2:-64,256}"; steps="${3:-50}"
eval "$(deploy/install-libtorch.sh)"
cargo build --release --workspace --features fedtune-client/tch,fedtune-coordinator/tch,fedtune-tests/tch >&2
bin="$(cargo metadata --format-version 1 --no-deps | grep -o '"target_directory":"[^"]*"' | cut -d'"' -f4)/release"
python="${LIBTORCH%/lib/python*/site-packages/torch}/bin/python"
"$python" deploy/step_compare.py --device cpu --fedtune "$bin/fedtune-client" --data "$data" \
  --batch-sizes "$batches" --steps "$steps"
