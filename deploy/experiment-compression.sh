#!/usr/bin/env bash
# Update and broadcast compression against raw f32 on the same budget: Fashion-MNIST, the
# demo's federation (client processes, Dirichlet split), the same rounds, data and seed for
# every run; only --compress-up / --compress-down change. Prints, per setting, the server-side
# test accuracy after the last round, its difference to fp32, and the bytes per round on the
# wire against raw f32 (the figures in docs/benchmarks.md come from here).
#
#   deploy/experiment-compression.sh [OUT_DIR]
#
# Environment: ROUNDS (10), MODEL (cnn), CLIENTS (3), ALPHA (1.0),
# SETTINGS ("fp32/fp32 fp16/fp16 bf16/bf16 int8/fp32 int8/fp16 topk:0.1/fp32 topk:0.01/fp32",
# each UP/DOWN), DATA (demo default: the full data set when installed, else the bundled subset).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-runs/experiment-compression}"
rounds="${ROUNDS:-10}" model="${MODEL:-cnn}" clients="${CLIENTS:-3}" alpha="${ALPHA:-1.0}"
settings="${SETTINGS:-fp32/fp32 fp16/fp16 bf16/bf16 int8/fp32 int8/fp16 topk:0.1/fp32 topk:0.01/fp32}"
cargo build --release --workspace --bin fedtune-coordinator --bin fedtune-client >&2
target_dir="$(cargo metadata --format-version 1 --no-deps | grep -o '"target_directory":"[^"]*"' | cut -d'"' -f4)"
bin="$target_dir/release/fedtune-coordinator"
mkdir -p "$out"
data_args=()
[[ -n "${DATA:-}" ]] && data_args=(--data "$DATA")

for s in $settings; do
  up="${s%/*}" down="${s#*/}"
  run="$out/${up//:/-}-${down}"
  echo "running --compress-up $up --compress-down $down -> $run" >&2
  start=$(date +%s)
  "$bin" demo --clients "$clients" --alpha "$alpha" --rounds "$rounds" --model "$model" \
    --fraction-evaluate 0 --seed 42 \
    --compress-up "$up" --compress-down "$down" "${data_args[@]}" --out "$run" > "$run.log" 2>&1 \
    || { echo "$s failed; see $run.log" >&2; exit 1; }
  echo "  $(( $(date +%s) - start )) s" >&2
done

# The last round's figures from metrics.jsonl.
last() { tail -n 1 "$1/metrics.jsonl" | grep -o "\"$2\":[0-9.]*" | cut -d: -f2; }
base="$out/fp32-fp32"
echo
echo "$clients clients (the training set split with Dirichlet alpha $alpha), $model, $rounds rounds; server-side test accuracy after the last round:"
echo
echo "| up | down | accuracy | vs fp32 | up bytes/round | of fp32 | down bytes/round | of fp32 |"
echo "|---|---|---|---|---|---|---|---|"
for s in $settings; do
  up="${s%/*}" down="${s#*/}"
  run="$out/${up//:/-}-${down}"
  acc=$(last "$run" eval_accuracy)
  delta=""
  [[ -f "$base/metrics.jsonl" ]] && delta=$(awk -v a="$acc" -v b="$(last "$base" eval_accuracy)" 'BEGIN { printf "%+.2f", (a - b) * 100 }')
  awk -v up="$up" -v down="$down" -v acc="$acc" -v delta="$delta" \
    -v bu="$(last "$run" bytes_up)" -v fu="$(last "$run" bytes_up_fp32)" \
    -v bd="$(last "$run" bytes_down)" -v fd="$(last "$run" bytes_down_fp32)" \
    'BEGIN { printf "| %s | %s | %.2f%% | %s | %.0f KB | %.3f | %.0f KB | %.3f |\n", up, down, acc * 100, delta, bu / 1000, bu / fu, bd / 1000, bd / fd }'
done
