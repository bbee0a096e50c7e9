# Sourced by the deploy/experiment-*.sh scripts: the data they default to and the binaries
# they run. Sets $data (DATA, else the full Fashion-MNIST when installed, else the bundled
# subset) and $coordinator / $client (release builds in the workspace's target dir).
data="${DATA:-}"
if [[ -z "$data" ]]; then
  if [[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]]; then
    data=/usr/share/datasets/fashion-mnist
  else
    data=data/fashion-mnist-subset
  fi
fi
cargo build --release --workspace --bin fedtune-coordinator --bin fedtune-client >&2
target_dir="$(cargo metadata --format-version 1 --no-deps | grep -o '"target_directory":"[^"]*"' | cut -d'"' -f4)"
coordinator="$target_dir/release/fedtune-coordinator"
client="$target_dir/release/fedtune-client"
