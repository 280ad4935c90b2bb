#!/usr/bin/env bash
# One command to serve pagoda on NATS:
#   ./scripts/serve.sh [--config FILE] [--model PATH] [--nats-url URL] [other `pagoda serve` flags]
#
# 1. fetches the default model (scripts/fetch-model.sh) unless --model is given;
# 2. when the NATS URL (--nats-url, else $PAGODA_NATS_URL, else nats.url of the config file,
#    else nats://127.0.0.1:4222) points at this machine and nothing listens on its port,
#    starts a nats-server there with JetStream (store .tools/nats-data, log
#    .tools/nats-server.log), found or installed by scripts/nats-server.sh;
# 3. builds the release binary and runs `pagoda serve "$@"` in the foreground;
# 4. when pagoda exits (Ctrl-C / SIGTERM are passed on to it, so it drains), stops the
#    nats-server it started. A server that was already running is left alone.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

say() { echo "serve.sh: $*" >&2; }

# --- what the arguments say -------------------------------------------------------------
url="" config="" model=""
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  a="${args[$i]}"
  next="${args[$((i + 1))]:-}"
  case "$a" in
    --nats-url) url="$next" ;;
    --nats-url=*) url="${a#*=}" ;;
    --config) config="$next" ;;
    --config=*) config="${a#*=}" ;;
    --model) model="$next" ;;
    --model=*) model="${a#*=}" ;;
  esac
done

# nats.url from a TOML file: the `url = "..."` line of its [nats] table.
toml_nats_url() {
  awk '
    /^[[:space:]]*\[/ { in_nats = ($0 ~ /^[[:space:]]*\[nats\][[:space:]]*(#.*)?$/); next }
    in_nats && /^[[:space:]]*url[[:space:]]*=/ {
      if (match($0, /"[^"]*"/)) { print substr($0, RSTART + 1, RLENGTH - 2); exit }
    }' "$1"
}
if [ -z "$url" ]; then url="${PAGODA_NATS_URL:-}"; fi
if [ -z "$url" ]; then
  cfg="${config:-configs/default.toml}"
  if [ -f "$cfg" ]; then url=$(toml_nats_url "$cfg"); fi
fi
url="${url:-nats://127.0.0.1:4222}"

# --- the model ------------------------------------------------------------------------
if [ -z "$model" ]; then
  ./scripts/fetch-model.sh
fi

# --- a local nats-server, when needed -----------------------------------------------
first="${url%%,*}"                  # the first of a comma-separated list
first="${first#"${first%%[![:space:]]*}"}"
scheme="nats"
case "$first" in *://*) scheme="${first%%://*}"; first="${first#*://}" ;; esac
first="${first#*@}"                 # user:pass@ or token@
first="${first%%/*}"
host="${first%:*}"
port="${first##*:}"
if [ "$host" = "$first" ]; then port=4222; fi   # no :port
[ -n "$port" ] || port=4222

listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

nats_pid=""
cleanup() {
  trap '' PIPE   # a closed stderr must not stop the clean-up half way
  if [ -n "$nats_pid" ] && kill -0 "$nats_pid" 2>/dev/null; then
    kill -TERM "$nats_pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$nats_pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$nats_pid" 2>/dev/null || true
    say "stopped the nats-server it started (pid $nats_pid)" || true
  fi
}
trap cleanup EXIT

case "$host" in
  127.0.0.1 | localhost | 0.0.0.0 | "")
    if [ "$scheme" != "nats" ]; then
      say "NATS URL $url is not plain nats://; not starting a local server"
    elif listening "$port"; then
      say "a server already listens on 127.0.0.1:$port; using it"
    else
      bin=$(./scripts/nats-server.sh)
      mkdir -p .tools/nats-data
      say "starting $("$bin" --version) on 127.0.0.1:$port (JetStream store .tools/nats-data, log .tools/nats-server.log)"
      # Its own session, so a Ctrl-C meant for pagoda does not take NATS down mid-drain.
      if command -v setsid >/dev/null 2>&1; then
        setsid "$bin" -a 127.0.0.1 -p "$port" -n pagoda-dev -js -sd .tools/nats-data \
          </dev/null >>.tools/nats-server.log 2>&1 &
      else
        "$bin" -a 127.0.0.1 -p "$port" -n pagoda-dev -js -sd .tools/nats-data \
          </dev/null >>.tools/nats-server.log 2>&1 &
      fi
      nats_pid=$!
      for _ in $(seq 1 100); do
        listening "$port" && break
        if ! kill -0 "$nats_pid" 2>/dev/null; then
          say "error: nats-server exited; the end of .tools/nats-server.log:"
          tail -n 20 .tools/nats-server.log >&2
          nats_pid=""
          exit 1
        fi
        sleep 0.1
      done
      listening "$port" || { say "error: nats-server did not listen on 127.0.0.1:$port within 10 s"; exit 1; }
    fi
    ;;
  *) say "NATS server $host:$port is remote; not starting a local one" ;;
esac

# --- build and run -------------------------------------------------------------------
cargo build --release
"${CARGO_TARGET_DIR:-target}/release/pagoda" serve "$@" &
pagoda_pid=$!
# pagoda drains on SIGINT and SIGTERM alike; pass both on as SIGTERM (a background job of
# a script starts with SIGINT ignored).
trap 'kill -TERM "$pagoda_pid" 2>/dev/null || true' INT TERM
# A trapped signal interrupts `wait`: keep waiting until pagoda is gone, then take its status.
while kill -0 "$pagoda_pid" 2>/dev/null; do wait "$pagoda_pid" || true; done
rc=0
wait "$pagoda_pid" || rc=$?
exit "$rc"
