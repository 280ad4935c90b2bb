#!/usr/bin/env bash
# Prints the path of a usable Prometheus binary on stdout (and nothing else there),
# installing one when missing. Messages go to stderr. Idempotent; safe to run concurrently.
# Used by tests/prometheus_scrape.rs (through $PAGODA_PROMETHEUS, which scripts/test.sh sets).
#
# Order:
#   1. $PAGODA_PROMETHEUS, when set (must be an executable file, or a command on PATH).
#   2. The project-local cache .tools/prometheus/ (git-ignored), when a binary is there.
#   3. `prometheus` on PATH.
#   4. Debian's package `prometheus`, fetched with `apt-get download` and unpacked with
#      `dpkg -x` into .tools/prometheus/ — nothing is installed system-wide, and it works as
#      root or not (when apt has no package lists yet, root runs `apt-get update` first).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cache_dir="$root/.tools/prometheus"
tree="$cache_dir/root"
bin="$tree/usr/bin/prometheus"

say() { echo "prometheus.sh: $*" >&2; }
fail() {
  say "error: $1"
  say "install Prometheus (Debian/Ubuntu: apt-get install prometheus; or a release from"
  say "https://prometheus.io/download/) and set PAGODA_PROMETHEUS=/path/to/prometheus"
  exit 1
}
runs() { "$1" --version >/dev/null 2>&1; }

# 1. explicit override
if [ -n "${PAGODA_PROMETHEUS:-}" ]; then
  cand="$PAGODA_PROMETHEUS"
  if [ -f "$cand" ] && [ -x "$cand" ]; then
    echo "$cand"; exit 0
  fi
  if resolved=$(command -v -- "$cand" 2>/dev/null) && [ -x "$resolved" ]; then
    echo "$resolved"; exit 0
  fi
  say "error: PAGODA_PROMETHEUS=$cand is not an executable file"
  exit 1
fi

# 2. cache
if [ -x "$bin" ] && runs "$bin"; then
  echo "$bin"; exit 0
fi

# 3. system binary
if sys=$(command -v prometheus 2>/dev/null) && runs "$sys"; then
  echo "$sys"; exit 0
fi

# 4. Debian package, unpacked into the cache
command -v apt-get >/dev/null 2>&1 || fail "no prometheus on PATH and no apt-get to fetch Debian's package"
command -v dpkg >/dev/null 2>&1 || fail "no prometheus on PATH and no dpkg to unpack Debian's package"

mkdir -p "$cache_dir"
# One installer at a time (tests may call this script from several processes at once).
if command -v flock >/dev/null 2>&1; then
  exec 9>"$cache_dir/.lock"
  flock 9
  if [ -x "$bin" ] && runs "$bin"; then echo "$bin"; exit 0; fi
fi

tmp=$(mktemp -d "$cache_dir/.install.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
download() { (cd "$tmp" && apt-get download prometheus) >&2 2>&1; }
say "downloading Debian's package prometheus (apt-get download) ..."
if ! download; then
  if [ "$(id -u)" = 0 ]; then
    say "apt-get download failed; running apt-get update and trying again"
    apt-get update >&2 || fail "apt-get update failed"
    download || fail "apt-get download prometheus failed"
  else
    fail "apt-get download prometheus failed (no package lists? run: sudo apt-get update)"
  fi
fi
deb=$(ls "$tmp"/prometheus_*.deb 2>/dev/null | head -n 1)
[ -n "$deb" ] || fail "apt-get download left no prometheus_*.deb in $tmp"
dpkg -x "$deb" "$tmp/root" || fail "dpkg -x $deb failed"
runs "$tmp/root/usr/bin/prometheus" || fail "the unpacked $tmp/root/usr/bin/prometheus does not run"
rm -rf "$tree"
mv "$tmp/root" "$tree"
say "installed $("$bin" --version 2>&1 | head -n 1): $bin"
echo "$bin"
