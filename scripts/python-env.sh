#!/usr/bin/env bash
# Prints the path of a Python interpreter that can import the Python example's
# dependencies (examples/python/requirements.txt: nats-py, msgpack, jsonschema) on stdout, and nothing
# else there, installing them when missing. Messages go to stderr. Idempotent; safe to
# run concurrently. The Python example's tests (tests/python_client.rs) use it.
#
# Order:
#   1. $PAGODA_PYTHON, when set (it must already import nats, msgpack and jsonschema).
#   2. The project-local cache .tools/python/python: a wrapper that runs python3 with
#      PYTHONPATH=.tools/python/lib, when the lib was installed from the current
#      requirements.txt by the same interpreter.
#   3. Install: `python3 -m pip install --target .tools/python/lib -r requirements.txt`
#      (no venv module needed), then write the wrapper.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
req="$root/examples/python/requirements.txt"
cache_dir="$root/.tools/python"
lib="$cache_dir/lib"
wrapper="$cache_dir/python"
stamp="$cache_dir/stamp"

say() { echo "python-env.sh: $*" >&2; }
imports_ok() { "$1" -c 'import nats, msgpack, jsonschema' >/dev/null 2>&1; }

# 1. explicit override
if [ -n "${PAGODA_PYTHON:-}" ]; then
  if imports_ok "$PAGODA_PYTHON"; then
    echo "$PAGODA_PYTHON"; exit 0
  fi
  say "error: PAGODA_PYTHON=$PAGODA_PYTHON cannot import nats, msgpack and jsonschema (pip install -r $req)"
  exit 1
fi

py=""
for cand in python3 python; do
  if command -v "$cand" >/dev/null 2>&1 && "$cand" -m pip --version >/dev/null 2>&1; then
    py=$(command -v "$cand"); break
  fi
done
if [ -z "$py" ]; then
  say "error: python3 with pip is required for the Python example's tests; install python3-pip"
  say "(or point PAGODA_PYTHON at an interpreter that imports nats, msgpack and jsonschema)"
  exit 1
fi
want="$(sha256sum "$req" | cut -d' ' -f1) $py $("$py" --version 2>&1)"

# 2. cached install
cached_ok() {
  [ -x "$wrapper" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && imports_ok "$wrapper"
}
if cached_ok; then
  echo "$wrapper"; exit 0
fi

# 3. install, one installer at a time
mkdir -p "$cache_dir"
if command -v flock >/dev/null 2>&1; then
  exec 9>"$cache_dir/.lock"
  flock 9
  if cached_ok; then echo "$wrapper"; exit 0; fi
fi
tmp=$(mktemp -d "$cache_dir/.install.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
say "installing $(grep -v '^#' "$req" | tr '\n' ' ')into $lib ..."
if ! PIP_ROOT_USER_ACTION=ignore "$py" -m pip install --quiet --disable-pip-version-check --no-warn-script-location \
    --target "$tmp/lib" -r "$req" >&2; then
  say "error: pip could not install $req"
  exit 1
fi
rm -rf "$lib"
mv "$tmp/lib" "$lib"
cat >"$tmp/python" <<EOF
#!/bin/sh
# Written by scripts/python-env.sh: $py with the Python example's dependencies.
PYTHONPATH="$lib\${PYTHONPATH:+:\$PYTHONPATH}" exec "$py" "\$@"
EOF
chmod +x "$tmp/python"
mv -f "$tmp/python" "$wrapper"
if ! imports_ok "$wrapper"; then
  say "error: $wrapper cannot import nats, msgpack and jsonschema after the install"
  exit 1
fi
echo "$want" >"$stamp"
say "ready: $wrapper"
echo "$wrapper"
