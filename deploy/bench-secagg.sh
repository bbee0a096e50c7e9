#!/usr/bin/env bash
# What secure aggregation costs: deploy/bench-transport.sh with --secure-aggregation and without
# (plain FedAvg), alternating PAIRS times on the same machine over mutual TLS, then per mode the
# mean round time (rounds 2.., the first holds start-up), the bytes each round moved (tensors
# plus, under secure aggregation, the key, share and reveal messages), the CPU time of the
# coordinator and of each client, and the coordinator's peak memory. All clients share this
# machine's cores: on real devices each client's masking runs on its own.
#
#   deploy/bench-secagg.sh [PARAMS=1M] [CLIENTS=10] [ROUNDS=4] [PAIRS=3]
set -euo pipefail
cd "$(dirname "$0")/.."
params="${1:-1M}"; clients="${2:-10}"; rounds="${3:-4}"; pairs="${4:-3}"
out="$(mktemp)"; trap 'rm -f "$out"' EXIT
for i in $(seq 1 "$pairs"); do
  for mode in secure plain; do
    if [ "$mode" = secure ]; then args="--secure-aggregation"; else args=""; fi
    COORDINATOR_ARGS="$args" deploy/bench-transport.sh "$params" "$clients" "$rounds" 2>/dev/null \
      | sed -n -e "s/^  round \([0-9]*\): *\([0-9.]*\) s *down *\([0-9.]*\) \([MG]B\) *up *\([0-9.]*\) \([MG]B\).*/$mode round \1 \2 \3 \4 \5 \6/p" \
               -e "s/^  peak RSS: coordinator \([0-9.]*\) GiB.*/$mode rss \1/p" \
               -e "s/^  CPU time (user + system): coordinator \([0-9.]*\) s; clients \([0-9., ]*\) s.*/$mode cpu \1 \2/p" >> "$out"
  done
done
python3 - "$out" "$params" "$clients" "$rounds" "$pairs" <<'PY'
import sys, statistics
path, params, clients, rounds, pairs = sys.argv[1:6]
unit = {"MB": 1e6, "GB": 1e9}
modes = {m: {"time": [], "down": [], "up": [], "rss": [], "cpu": [], "client_cpu": []} for m in ("secure", "plain")}
for line in open(path):
    f = line.split()
    m = modes[f[0]]
    if f[1] == "round":
        if int(f[2]) >= 2:
            m["time"].append(float(f[3]))
            m["down"].append(float(f[4]) * unit[f[5]])
            m["up"].append(float(f[6]) * unit[f[7]])
    elif f[1] == "cpu":
        m["cpu"].append(float(f[2]))
        per_client = [float(x) for x in " ".join(f[3:]).split(",")]
        m["client_cpu"].append(sum(per_client) / len(per_client))
    else:
        m[f[1]].append(float(f[2]))
if not all(m["time"] for m in modes.values()):
    sys.exit("no rounds measured: run COORDINATOR_ARGS=--secure-aggregation deploy/bench-transport.sh by hand to see why")
print(f"secure aggregation cost: synthetic:{params}, {clients} clients (--train none), mutual TLS, {pairs} alternating pairs of {rounds} rounds, rounds 2..")
for name, m in modes.items():
    t = m["time"]
    print(f"  {name:6}: round mean {statistics.mean(t):.2f} s (median {statistics.median(t):.2f}, range {min(t):.2f}-{max(t):.2f}, {len(t)} rounds)"
          f"  down {statistics.mean(m['down'])/1e6:.3f} MB  up {statistics.mean(m['up'])/1e6:.3f} MB per round"
          f"  CPU per run: coordinator {statistics.mean(m['cpu']):.1f} s, each client {statistics.mean(m['client_cpu']):.1f} s; coordinator peak RSS {statistics.mean(m['rss']):.2f} GiB")
s, p = modes["secure"], modes["plain"]
print(f"  secure aggregation: round time x{statistics.mean(s['time']) / statistics.mean(p['time']):.2f}, "
      f"bytes x{(statistics.mean(s['down']) + statistics.mean(s['up'])) / (statistics.mean(p['down']) + statistics.mean(p['up'])):.3f}")
PY
