#!/usr/bin/env bash
# The main job in one command: build fedtune, then run a whole local federation on real data —
# a coordinator and 3 client processes on 127.0.0.1, Fashion-MNIST split non-IID (Dirichlet)
# across the clients, 5 rounds, server-side test accuracy per round.
#
#   deploy/demo.sh [demo options...]      e.g. deploy/demo.sh --clients 4 --rounds 8 --model mlp
#
# Data: /usr/share/datasets/fashion-mnist when `apt-get install dataset-fashion-mnist` put it
# there (60,000 + 10,000 images), else the real subset bundled in data/fashion-mnist-subset.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --workspace --bin fedtune-coordinator --bin fedtune-client
target_dir="$(cargo metadata --format-version 1 --no-deps | grep -o '"target_directory":"[^"]*"' | cut -d'"' -f4)"
exec "$target_dir/release/fedtune-coordinator" demo "$@"
