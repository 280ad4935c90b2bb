#!/usr/bin/env bash
# What one output token costs in CPU on the NATS path, by process and thread: one
# `pagoda serve` process, a nats-server and a `pagoda bench --nats-url` client on this
# machine, one stream (or --concurrency N). Not run in CI.
#
#   benches/nats_path_cpu.sh [--num-prompts 8] [--concurrency 1] [--input-len 128]
#                            [--output-len 128] [--out DIR]
#
# Reads each thread's on-CPU time (/proc/PID/task/TID/schedstat, nanoseconds) and its
# context switches (voluntary + involuntary, /proc/…/status) before and after the measured
# run, sums them by thread name, and prints microseconds and context switches per output
# token. The serve process and nats-server are read over the whole run; the client from
# 1.5 s after it starts (its start-up left out) until it exits, scaled to the tokens of
# that window, so its line is approximate (marked ~). Environment for each process:
# NATS_ENV (e.g. GOMAXPROCS=1), SERVE_ENV, BENCH_ENV. Throughput on a shared machine is
# noisy; CPU per token moves much less, which is why this script exists beside
# `pagoda bench --compare-nats-url`.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
num_prompts=8
concurrency=1
input_len=128
output_len=128
out="$root/target/bench-nats-cpu"
while [ $# -gt 0 ]; do
  case "$1" in
    --num-prompts) num_prompts="$2"; shift 2 ;;
    --concurrency) concurrency="$2"; shift 2 ;;
    --input-len) input_len="$2"; shift 2 ;;
    --output-len) output_len="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
say() { echo "nats_path_cpu: $*" >&2; }

cd "$root"
# shellcheck source=benches/common.sh
. benches/common.sh
bench_prepare
mkdir -p "$out"
# shellcheck disable=SC2086 # NATS_ENV etc. are lists of K=V words
env ${NATS_ENV:-} "$nats_bin" -a 127.0.0.1 -p "$port" >"$out/nats.log" 2>&1 &
nats_pid=$!
serve_pid=""
cleanup() {
  [ -n "$serve_pid" ] && kill -INT "$serve_pid" 2>/dev/null || true
  kill "$nats_pid" 2>/dev/null || true
}
trap cleanup EXIT
sleep 0.5

export PAGODA_CACHE__ENABLE_PREFIX_CACHING=false PAGODA_LOG__STATS_INTERVAL_S=0
# shellcheck disable=SC2086
env ${SERVE_ENV:-} RUST_LOG=info "$bin" serve --nats-url "$url" --metrics-listen "" \
  >"$out/serve.log" 2>&1 &
serve_pid=$!
wait_ready "$out/serve.log" "serving" "$serve_pid"

# thread name, on-CPU ns, context switches: one line per name (threads of one name summed)
snap() {
  local t
  for t in /proc/"$1"/task/*; do
    printf '%s %s %s\n' "$(tr ' ' _ <"$t/comm" 2>/dev/null)" \
      "$(cut -d' ' -f1 "$t/schedstat" 2>/dev/null)" \
      "$(awk '/ctxt_switches/ {s += $2} END {print s + 0}' "$t/status" 2>/dev/null)"
  done | awk 'NF == 3 {a[$1] += $2; c[$1] += $3} END {for (k in a) print k, a[k], c[k]}' | sort
}
bench() { # extra args; exec_bench=1: replace the (sub)shell
  # shellcheck disable=SC2086
  ${exec_bench:+exec} env ${BENCH_ENV:-} "$bin" bench --nats-url "$url" --no-progress --sweep "$concurrency" \
    --input-len "$input_len" "$@"
}

say "warm-up"
bench --num-prompts 1 --output-len 16 >/dev/null 2>&1
snap "$serve_pid" >"$out/serve.0"
snap "$nats_pid" >"$out/nats.0"
say "measuring $num_prompts requests × $output_len tokens at concurrency $concurrency"
# exec: the background job's pid is the client's own, not a subshell's.
(exec_bench=1 bench --num-prompts "$num_prompts" --output-len "$output_len") \
  >"$out/bench.txt" 2>"$out/bench.log" &
bench_pid=$!
sleep 1.5
snap "$bench_pid" >"$out/bench.0"
t0=$(date +%s.%N)
t1=$t0
while kill -0 "$bench_pid" 2>/dev/null; do
  # (an exiting client has lost threads: keep the last whole reading)
  if snap "$bench_pid" >"$out/bench.tmp" 2>/dev/null &&
    [ "$(wc -l <"$out/bench.tmp")" -ge "$(wc -l <"$out/bench.0")" ]; then
    mv "$out/bench.tmp" "$out/bench.1"
    t1=$(date +%s.%N)
  fi
  sleep 0.1
done
wait "$bench_pid" || { say "the bench failed (see $out/bench.log)"; exit 1; }
snap "$serve_pid" >"$out/serve.1"
snap "$nats_pid" >"$out/nats.1"

tokens=$(awk -F: '/total output tokens/ {gsub(/ /, "", $2); print $2; exit}' "$out/bench.txt")
duration=$(awk -F: '/duration \(s\)/ {gsub(/ /, "", $2); print $2; exit}' "$out/bench.txt")
[ -n "$tokens" ] && [ "$tokens" -gt 0 ] || { say "no output tokens in $out/bench.txt"; exit 1; }
echo "cpu: $(grep -o 'avx512_vnni\|avx_vnni\|avx2' /proc/cpuinfo | sort -u | tr '\n' ' ')($(nproc) cores)"
echo "$(grep 'output throughput' "$out/bench.txt"), $tokens tokens in $duration s"
echo "process thread                 us/token  switches/token"
rows() { # label, before, after, tokens
  join "$2" "$3" | awk -v l="$1" -v n="$4" '{
      us = ($4 - $2) / 1000 / n; cs = ($5 - $3) / n; tu += us; tc += cs
      if (us >= 0.5) printf "%-8s %-20s %8.1f %10.2f\n", l, $1, us, cs }
    END { printf "%-8s %-20s %8.1f %10.2f\n", l, "(all)", tu, tc }'
}
rows serve "$out/serve.0" "$out/serve.1" "$tokens"
rows nats "$out/nats.0" "$out/nats.1" "$tokens"
if [ -s "$out/bench.1" ]; then
  window_tokens=$(awk -v n="$tokens" -v d="$duration" -v a="$t0" -v b="$t1" \
    'BEGIN {w = (b - a) / d; if (w > 1) w = 1; printf "%d", n * w}')
  if [ "$window_tokens" -gt 0 ]; then
    rows "~client" "$out/bench.0" "$out/bench.1" "$window_tokens"
  fi
fi
