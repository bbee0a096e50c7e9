#!/usr/bin/env bash
# Load: CLIENTS clients simulated in one process (tests/src/bin/fedtune-load.rs: a tokio task
# and a connection each, the real protocol, a fixed delta like --train none) against one
# coordinator on 127.0.0.1 (plaintext), ROUNDS rounds of a small model, FRACTION of the clients
# selected per round. Prints each round's time, the coordinator's peak memory and open file
# descriptors (sampled every 0.2 s), its CPU time, and from the load generator how many tasks
# each client got: with FRACTION x CLIENTS x ROUNDS >= CLIENTS, every client must get one.
# Prometheus scrapes /metrics (--metrics-listen) every second meanwhile: the series a scrape
# holds, its size and its slowest answer (the series must not grow with the clients).
#
#   deploy/bench-load.sh [CLIENTS=1000] [ROUNDS=5] [FRACTION=1.0] [PARAMS=10000]
set -euo pipefail
cd "$(dirname "$0")/.."
clients="${1:-1000}"; rounds="${2:-5}"; fraction="${3:-1.0}"; params="${4:-10000}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/fedtune/target}"
cargo build --release --workspace --bin fedtune-coordinator --bin fedtune-load >&2
bin="$CARGO_TARGET_DIR/release"
work="$(mktemp -d)"; trap 'kill $(jobs -p) 2>/dev/null || true; [ -n "${KEEP:-}" ] || rm -rf "$work"' EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
port=$(free_port); mport=$(free_port)
# A connection per client on each side, plus files.
ulimit -n "$(ulimit -Hn)"

/usr/bin/time -f "%U %S %M" -o "$work/coordinator.time" "$bin/fedtune-coordinator" serve --insecure \
  --listen "127.0.0.1:$port" --metrics-listen "127.0.0.1:$mport" --model "synthetic:$params" --rounds "$rounds" \
  --min-clients "$clients" --fraction-fit "$fraction" --min-fit-clients 1 \
  --max-clients "$clients" --max-joins-per-minute $((clients * 2)) --available-timeout "${AVAILABLE_TIMEOUT:-10m}" \
  --out "$work/out" 2> "$work/coordinator.log" &
timer=$!
sleep 0.5
coord=$(pgrep -P "$timer" fedtune-coordin || true)
( max=0; while kill -0 "$coord" 2>/dev/null; do
    n=$(ls "/proc/$coord/fd" 2>/dev/null | wc -l); [ "$n" -gt "$max" ] && max=$n && echo "$max" > "$work/fds"
    sleep 0.2; done ) &
( while kill -0 "$coord" 2>/dev/null; do
    curl -s -o "$work/scrape" -w '%{time_total}\n' "http://127.0.0.1:$mport/metrics" >> "$work/scrape.times" 2>/dev/null \
      && grep -vc '^#' "$work/scrape" >> "$work/scrape.series"
    sleep 1; done ) &
"$bin/fedtune-load" --coordinator "http://127.0.0.1:$port" --clients "$clients" > "$work/load.json" 2> "$work/load.log" &
load=$!
wait $timer || { echo "coordinator failed:"; tail -20 "$work/coordinator.log"; exit 1; }
wait $load || { echo "load generator failed:"; tail -20 "$work/load.log"; exit 1; }
echo "load: $clients clients in one process, synthetic:$params, $rounds rounds, fraction_fit $fraction, 127.0.0.1, plaintext"
python3 - "$work" "$clients" "$rounds" "$fraction" <<'PY'
import json, math, sys
work, clients, rounds, fraction = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
rows = [json.loads(l) for l in open(f"{work}/out/metrics.jsonl")]
for r in rows:
    print(f"  round {r['round']}: {r['round_ms']/1000:6.2f} s  {r['clients_reported']}/{r['clients_selected']} reported  (aggregate {r['aggregate_ms']} ms)")
user, system, rss = open(f"{work}/coordinator.time").read().split()[-3:]
fds = int(open(f"{work}/fds").read()) if __import__("os").path.exists(f"{work}/fds") else 0
print(f"  coordinator: peak RSS {int(rss)/1024:.1f} MiB, peak open fds {fds}, CPU {float(user)+float(system):.1f} s")
load = json.loads(open(f"{work}/load.json").read())
print(f"  clients: tasks per client min {load['tasks_min']} median {load['tasks_median']} max {load['tasks_max']}, "
      f"{load['clients_without_a_task']} without a task, {load['errors']} errors; all done in {load['seconds']:.1f} s")
import os
if os.path.exists(f"{work}/scrape.series"):
    series = [int(x) for x in open(f"{work}/scrape.series").read().split()]
    times = [float(x) for x in open(f"{work}/scrape.times").read().split()]
    size = os.path.getsize(f"{work}/scrape")
    print(f"  /metrics: {len(times)} scrapes, {min(series)}..{max(series)} series, {size} bytes, slowest {max(times)*1000:.1f} ms")
expected_all = fraction * clients * rounds >= clients
ok = load["errors"] == 0 and len(rows) == rounds and (not expected_all or load["clients_without_a_task"] == 0)
print("  PASS" if ok else "  FAIL")
sys.exit(0 if ok else 1)
PY
