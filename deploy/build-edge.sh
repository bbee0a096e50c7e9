#!/usr/bin/env bash
# Cross-builds the edge client for 64-bit ARM Linux boards (Raspberry Pi 4/5, Jetson's CPU,
# most aarch64 SBCs) from an x86-64 Debian/Ubuntu machine, with burn's pure-Rust flex backend:
#
#   sudo apt-get install gcc-aarch64-linux-gnu g++-aarch64-linux-gnu   # the cross toolchain
#   rustup target add aarch64-unknown-linux-gnu                        # Rust's std for the target
#   deploy/build-edge.sh                 # -> target/aarch64-unknown-linux-gnu/dist/fedtune-client
#
# With qemu-user installed (apt-get install qemu-user), `deploy/build-edge.sh --check` also runs
# the built binary under emulation (`fedtune-client --version` and `devices`). docs/deploy.md,
# "Edge builds", says what is tested and how the CUDA client is built on a Jetson itself.
set -euo pipefail
cd "$(dirname "$0")/.."
target=aarch64-unknown-linux-gnu
for tool in aarch64-linux-gnu-gcc aarch64-linux-gnu-g++; do
  command -v "$tool" >/dev/null || { echo "build-edge.sh: no $tool: apt-get install gcc-aarch64-linux-gnu g++-aarch64-linux-gnu" >&2; exit 1; }
done
rustup target list --installed 2>/dev/null | grep -qx "$target" \
  || { echo "build-edge.sh: Rust's std for $target is missing: rustup target add $target" >&2; exit 1; }
# The linker and the C/C++ compilers of crates that build native code, for this target only.
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export CXX_aarch64_unknown_linux_gnu=aarch64-linux-gnu-g++
export AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar
cargo build --profile dist --locked --target "$target" -p fedtune-client --bin fedtune-client
target_dir="$(cargo metadata --format-version 1 --no-deps | grep -o '"target_directory":"[^"]*"' | cut -d'"' -f4)"
bin="$target_dir/$target/dist/fedtune-client"
echo "built $bin"
if [ "${1:-}" = "--check" ]; then
  export QEMU_LD_PREFIX=/usr/aarch64-linux-gnu
  qemu-aarch64 "$bin" --version
  qemu-aarch64 "$bin" devices
fi
