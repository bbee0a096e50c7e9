#!/usr/bin/env bash
# Fuzzes what fedtune reads from peers and files (fuzz/fuzz_targets: the chunk assembler, the
# update checks, IDX / CSV / image-folder data, safetensors and PyTorch .pt files, the settings
# files: serve's --config and a client's kit) with
# cargo-fuzz (libFuzzer, AddressSanitizer, a nightly toolchain), SECONDS per target, each
# started from real files (the bundled data, a checkpoint, the .pt fixture, settings files). Prints
# per target the executions and crashes; a crash's input is kept under fuzz/artifacts/<target>/
# (turn it into a regression test) and the script fails. The fuzzed crates, fedtune-formats and
# fedtune-settings, have no burn in them, so a cold build takes minutes.
#
#   deploy/fuzz.sh [SECONDS=60] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-60}"; shift || true
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(assembler update idx csv image_folder safetensors pytorch config)

# Seeds: real inputs of each kind.
seeds="$(mktemp -d)"; trap 'rm -rf "$seeds"' EXIT
mkdir -p "$seeds"/{assembler,update,idx,csv,image_folder,safetensors,pytorch,config}
cp data/fashion-mnist-subset/*-ubyte* "$seeds/idx/" 2>/dev/null || true
head -c 4000 data/digits.csv > "$seeds/csv/digits-head.csv"
cp tests/fixtures/mlp-torch.pt "$seeds/pytorch/"
# Settings files as people write them: a serve --config with most kinds of value, and a kit.
cat > "$seeds/config/serve.toml" <<'TOML'
listen = "0.0.0.0:50051"
rounds = 20
min_clients = 3
available_timeout = "10m"
model = "cnn"
strategy = "fedadam"
optimizer = "sgd"
momentum = 0.9
lr_schedule = "step:1:0.5"
round_timeout = "90s"
grace_period = "30s"
on_round_failure = "stop"
freeze = "conv1.*,conv2.*"
log_format = "json"
labels = ["neg", "pos"]
[init]
file = "resnet-ish.pt"
layout = "pytorch"
reset_head = true
[init.remap]
"^backbone\\." = ""
"^classifier\\.(\\w+)" = "fc2.$1"
TOML
cat > "$seeds/config/client.toml" <<'TOML'
coordinator = "https://10.0.0.5:50051"
name = "site-a"
ca_cert = "ca.pem"
cert = "client.pem"
key = "client.key"
TOML
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
