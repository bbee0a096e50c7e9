#!/usr/bin/env bash
# GPU check, run on a machine with an NVIDIA GPU whose python3 has torch. It needs the fedtune
# binaries built with the `tch` feature against that torch's libtorch (see README, "GPU and
# libtorch"), in $BIN (default .gpu/bin). It prints:
#   (a) nvidia-smi, torch's view of CUDA, and what the fedtune binary can use;
#   (b) a local federation: coordinator + 2 clients training on cuda:0, 3 rounds, on the
#       Fashion-MNIST subset bundled in data/;
#   (c) the CNN train step at batch 64 and 256 on cuda:0: fedtune (burn + libtorch) against the
#       same step in PyTorch on the same card, and their ratio.
#
#   deploy/gpu-check.sh [OUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
bin="${BIN:-.gpu/bin}"
out="${1:-/tmp/fedtune-gpu-check}"
mkdir -p "$out"
data=data/fashion-mnist-subset
status=0

torch_lib="$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')" || { echo "python3 has no torch"; exit 1; }
# The binaries carry an rpath to the build machine's libtorch; here, use this machine's.
export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

echo "== (a) GPU and CUDA"
nvidia-smi || status=1
python3 -c 'import torch; print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, available: {torch.cuda.is_available()}, device: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}")'
echo "-- fedtune-client devices"
"$bin/fedtune-client" devices || status=1

echo
echo "== (b) local federation: coordinator + 2 clients on cuda:0, 3 rounds"
start=$(date +%s.%N)
"$bin/fedtune-coordinator" demo --clients 2 --rounds 3 --device cuda:0 --data "$data" --out "$out/demo" 2>&1 | tee "$out/demo.log" | grep -E "client joined|round [0-9]+/[0-9]+ \||fedtune demo|^ +[0-9]+ |round +accuracy|error|Error|panick" || true
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "federation FAILED (log: $out/demo.log)"; tail -30 "$out/demo.log"; status=1; }
echo "federation wall time: $(python3 -c "print(f'{$(date +%s.%N) - $start:.1f} s')")"
grep -c "on cuda:0" "$out/demo.log" | sed 's/^/clients that joined on cuda:0: /'

echo
echo "== (c) CNN train step on cuda:0: fedtune vs PyTorch"
python3 deploy/step_compare.py --device cuda:0 --fedtune "$bin/fedtune-client" --data "$data" --batch-sizes 64,256 --steps 200 || status=1
exit $status
