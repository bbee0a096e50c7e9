#!/usr/bin/env bash
# Installs libtorch for fedtune's `tch` feature, offline-friendly: the only libtorch reachable from
# package registries is the one inside PyPI's torch wheel, so we install that wheel into a venv
# and point LIBTORCH at its `torch` package directory.
#
#   deploy/install-libtorch.sh [DIR]      (default: ~/.cache/fedtune/libtorch-venv)
#   TORCH_VERSION=2.11.0 deploy/install-libtorch.sh DIR   (another version; see README "GPU")
#
# Prints the line to export. Idempotent: a second run with the venv in place does nothing.
set -euo pipefail
version="${TORCH_VERSION:-2.9.0}"
dir="${1:-$HOME/.cache/fedtune/libtorch-venv}"
python="${PYTHON:-python3}"

if [ ! -x "$dir/bin/python" ]; then
  "$python" -m venv "$dir"
fi
if ! "$dir/bin/python" -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '$version' else 1)" 2>/dev/null; then
  echo "installing torch==$version into $dir (a CUDA build, several GB; a few minutes)" >&2
  "$dir/bin/python" -m pip install --quiet --disable-pip-version-check "torch==$version"
fi
torch_dir="$("$dir/bin/python" -c 'import os, torch; print(os.path.dirname(torch.__file__))')"
if [ ! -f "$torch_dir/lib/libtorch.so" ]; then
  echo "error: $torch_dir/lib/libtorch.so not found; the torch wheel looks incomplete" >&2
  exit 1
fi
echo "export LIBTORCH=$torch_dir"
