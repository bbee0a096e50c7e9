#!/usr/bin/env bash
# Transport benchmark: a synthetic model of PARAMS parameters (~10 tensors), CLIENTS clients that
# send a fixed delta without training (--train none), ROUNDS rounds on 127.0.0.1. Prints each
# round's time and bytes (from metrics.jsonl), the effective throughput, the peak memory
# (max RSS) and the CPU time of the coordinator and of each client.
#
#   deploy/bench-transport.sh [PARAMS=100M] [CLIENTS=2] [ROUNDS=3]
#
# Extra coordinator flags go in COORDINATOR_ARGS, e.g.
#   COORDINATOR_ARGS="--strategy median --buffer-memory-mb 128" deploy/bench-transport.sh 25M 5
# It runs over mutual TLS with a throwaway kit, as a federation does; INSECURE=1 runs plaintext
# (to measure what TLS costs).
set -euo pipefail
cd "$(dirname "$0")/.."
params="${1:-100M}"; clients="${2:-2}"; rounds="${3:-3}"
cargo build --release --workspace --bin fedtune-coordinator --bin fedtune-client >&2
bin="$(cargo metadata --format-version 1 --no-deps | grep -o '"target_directory":"[^"]*"' | cut -d'"' -f4)/release"
work="$(mktemp -d)"; trap 'kill $(jobs -p) 2>/dev/null || true; [ -n "${KEEP:-}" ] || rm -rf "$work"' EXIT
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')

names=$(seq -s, -f "bench-%g" 1 "$clients")
if [ -n "${INSECURE:-}" ]; then
  mode="plaintext (--insecure)"; serve_tls=(--insecure); url="http://127.0.0.1:$port"
else
  mode="mutual TLS"
  "$bin/fedtune-coordinator" provision --out "$work/kits" --san 127.0.0.1 --clients "$names" >/dev/null
  serve_tls=(--config "$work/kits/coordinator/coordinator.toml"); url="https://127.0.0.1:$port"
fi
client_tls() { if [ -n "${INSECURE:-}" ]; then echo --insecure; else echo --config "$work/kits/clients/bench-$1/client.toml"; fi; }

/usr/bin/time -f "%U %S %M" -o "$work/coordinator.rss" "$bin/fedtune-coordinator" serve "${serve_tls[@]}" --listen "127.0.0.1:$port" \
  --model "synthetic:$params" --rounds "$rounds" --min-clients "$clients" --out "$work/out" ${COORDINATOR_ARGS:-} 2> "$work/coordinator.log" &
coord=$!
for i in $(seq 1 "$clients"); do
  # shellcheck disable=SC2046
  /usr/bin/time -f "%U %S %M" -o "$work/client$i.rss" "$bin/fedtune-client" run $(client_tls "$i") --coordinator "$url" \
    --train none --name "bench-$i" --no-progress 2> "$work/client$i.log" &
done
wait $coord || { echo "coordinator failed:"; tail -20 "$work/coordinator.log"; exit 1; }
wait
echo "transport benchmark: synthetic:$params, $clients clients (--train none), $rounds rounds, 127.0.0.1, $mode ${COORDINATOR_ARGS:-}"
python3 - "$work" "$clients" <<'PY'
import json, sys
work, clients = sys.argv[1], int(sys.argv[2])
rows = [json.loads(l) for l in open(f"{work}/out/metrics.jsonl")]
for r in rows:
    moved = r["bytes_down"] + r["bytes_up"]
    size = lambda b: f"{b/1e9:6.2f} GB" if b >= 1e9 else f"{b/1e6:8.3f} MB"
    print(f"  round {r['round']}: {r['round_ms']/1000:7.2f} s  down {size(r['bytes_down'])}  up {size(r['bytes_up'])}"
          f"  -> {moved/1e9/(r['round_ms']/1000):5.2f} GB/s  (aggregate {r['aggregate_ms']} ms)")
rss = lambda name: int(open(f"{work}/{name}.rss").read().split()[-1]) / 1024 / 1024
print(f"  peak RSS: coordinator {rss('coordinator'):.2f} GiB; clients " + ", ".join(f"{rss(f'client{i}'):.2f}" for i in range(1, clients + 1)) + " GiB")
cpu = lambda name: sum(float(x) for x in open(f"{work}/{name}.rss").read().split()[-3:-1])
print(f"  CPU time (user + system): coordinator {cpu('coordinator'):.1f} s; clients " + ", ".join(f"{cpu(f'client{i}'):.1f}" for i in range(1, clients + 1)) + f" s; {len(rows)} rounds")
PY
