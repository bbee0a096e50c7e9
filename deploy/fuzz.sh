#!/usr/bin/env bash
# Fuzzes what fedtune reads from peers and files (fuzz/fuzz_targets: the chunk assembler, the
# update checks, IDX / CSV / image-folder data, safetensors and PyTorch .pt files) with
# cargo-fuzz (libFuzzer, AddressSanitizer, a nightly toolchain), SECONDS per target, each
# started from real files (the bundled data, a checkpoint, the .pt fixture). Prints per target
# the executions and crashes; a crash's input is kept under fuzz/artifacts/<target>/ (turn it
# into a regression test) and the script fails. The fuzzed crate, fedtune-formats, has no
# burn in it, so a cold build takes minutes.
#
#   deploy/fuzz.sh [SECONDS=60] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-60}"; shift || true
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(assembler update idx csv image_folder safetensors pytorch)

# Seeds: real inputs of each kind.
seeds="$(mktemp -d)"; trap 'rm -rf "$seeds"' EXIT
mkdir -p "$seeds"/{assembler,update,idx,csv,image_folder,safetensors,pytorch}
cp data/fashion-mnist-subset/*-ubyte* "$seeds/idx/" 2>/dev/null || true
head -c 4000 data/digits.csv > "$seeds/csv/digits-head.csv"
cp tests/fixtures/mlp-torch.pt "$seeds/pytorch/"
python3 - "$seeds" <<'PY'
import json, struct, sys, zlib
seeds = sys.argv[1]
# A small safetensors file: an 8-byte header length, the JSON header, the data.
header = json.dumps({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}).encode()
with open(f"{seeds}/safetensors/small.safetensors", "wb") as f:
    f.write(struct.pack("<Q", len(header)) + header + struct.pack("<4f", 1, 2, 3, 4))
# A 2x2 grey PNG, with the harness's kind byte (0: PNG) in front.
def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 2, 2, 8, 0, 0, 0, 0)) \
    + chunk(b"IDAT", zlib.compress(b"\x00\x10\x20\x00\x30\x40")) + chunk(b"IEND", b"")
open(f"{seeds}/image_folder/grey.png", "wb").write(b"\x00" + png)
PY

cd fuzz
cargo +nightly fuzz build -O
failed=0
printf '%-14s %12s %8s\n' target executions crashes
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t"
  cp -n "$seeds/$t/"* "corpus/$t/" 2>/dev/null || true
  log="$(mktemp)"
  if cargo +nightly fuzz run -O "$t" "corpus/$t" -- -max_total_time="$seconds" -rss_limit_mb=2048 \
       -print_final_stats=1 > "$log" 2>&1; then crashes=0; else crashes=1; failed=1; fi
  runs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)"
  printf '%-14s %12s %8s\n' "$t" "${runs:-?}" "$crashes"
  if [ "$crashes" -ne 0 ]; then grep -E "^==|panicked|ERROR|SUMMARY|artifact" "$log" | head -20; fi
  rm -f "$log"
done
exit "$failed"
