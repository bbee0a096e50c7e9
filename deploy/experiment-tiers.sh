#!/usr/bin/env bash
# Tiered aggregation against flat on this machine: the root's bytes per round, its peak memory
# and the round time, for the same clients (a synthetic model and `--train none`, so the figures
# are the transport's, not training's). docs/benchmarks.md, "Tiered aggregation".
#
#   deploy/experiment-tiers.sh [PARAMS] [CLIENTS] [AGGREGATORS] [ROUNDS]    (default 10000000 8 2 3)
set -euo pipefail
cd "$(dirname "$0")/.."
params="${1:-10000000}" clients="${2:-8}" aggs="${3:-2}" rounds="${4:-3}"
[ $((clients % aggs)) -eq 0 ] || { echo "CLIENTS must be a multiple of AGGREGATORS" >&2; exit 2; }
cargo build --release --bin fedtune-coordinator --bin fedtune-client
target_dir="$(cargo metadata --format-version 1 --no-deps | grep -o '"target_directory":"[^"]*"' | cut -d'"' -f4)"
coord="$target_dir/release/fedtune-coordinator" client="$target_dir/release/fedtune-client"
work="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
root_args=(--insecure --model "synthetic:$params" --rounds "$rounds" --round-timeout 10m)

# $1: run name, $2: clients the root waits for. The root runs under /usr/bin/time for its peak RSS.
start_root() {
  root_port="$(port)"
  /usr/bin/time -f "%M" -o "$work/$1.rss" "$coord" serve "${root_args[@]}" --listen "127.0.0.1:$root_port" \
    --out "$work/$1" --min-available-clients "$2" > "$work/$1.log" 2>&1 &
  root_pid=$!
}
leaf() { "$client" run --insecure --coordinator "http://127.0.0.1:$1" --train none --name "$2" --no-progress > "$work/$2.log" 2>&1 & }

start_root flat "$clients"
for i in $(seq 1 "$clients"); do leaf "$root_port" "client-$i"; done
wait "$root_pid"

start_root tiered "$aggs"
per=$((clients / aggs))
for a in $(seq 1 "$aggs"); do
  agg_port="$(port)"
  "$coord" serve --insecure --listen "127.0.0.1:$agg_port" --out "$work/agg-$a" \
    --upstream "http://127.0.0.1:$root_port" --upstream-insecure --upstream-name "agg-$a" \
    --min-available-clients "$per" > "$work/agg-$a.log" 2>&1 &
  for i in $(seq 1 "$per"); do leaf "$agg_port" "client-$a-$i"; done
done
wait "$root_pid"

python3 - "$work" "$params" "$clients" "$aggs" <<'PY'
import json, sys
work, params, clients, aggs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
print(f"synthetic model of {params:,} parameters ({params * 4 / 1e6:.0f} MB), {clients} clients, tiered: {aggs} aggregators")
print("| run | root bytes down / round | root bytes up / round | clients behind the root's updates | round time (s) | root peak RSS (MiB) |")
print("|---|---|---|---|---|---|")
for run in ["flat", "tiered"]:
    rows = [json.loads(l) for l in open(f"{work}/{run}/metrics.jsonl")]
    rss = int(open(f"{work}/{run}.rss").read().split()[-1]) / 1024
    n = len(rows)
    down = sum(r["bytes_down"] for r in rows) / n / 1e6
    up = sum(r["bytes_up"] for r in rows) / n / 1e6
    secs = sum(r["round_ms"] for r in rows[1:] or rows) / max(len(rows[1:]), 1) / 1000
    print(f"| {run} | {down:,.0f} MB | {up:,.0f} MB | {rows[-1]['contributors']} | {secs:.2f} | {rss:.0f} |")
PY
