#!/usr/bin/env bash
# What split placement costs: the same `pagoda bench --nats-url` workload against
#   all    — one `pagoda serve --role all` process, and
#   split  — `pagoda serve --role engine` + `pagoda serve --role frontend`, two processes,
# on one machine and one nats-server, alternating (all, split, all, split, …) so that
# drift on a shared machine hits both. Not run in CI.
#
#   benches/split_vs_all.sh [--rounds 2] [--sweep 1,32] [--input-len 128]
#                           [--output-len 128] [--prompts-per-concurrency 2] [--out DIR]
#
# Prints, per round and concurrency, output tok/s and TPOT / ITL p50 and p99 of both, and
# the ratios split / all. Reports go to --out (default target/bench-split/).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
rounds=2
sweep="1,32"
input_len=128
output_len=128
ppc=2
out="$root/target/bench-split"
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) rounds="$2"; shift 2 ;;
    --sweep) sweep="$2"; shift 2 ;;
    --input-len) input_len="$2"; shift 2 ;;
    --output-len) output_len="$2"; shift 2 ;;
    --prompts-per-concurrency) ppc="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
say() { echo "split_vs_all: $*" >&2; }

cd "$root"
# shellcheck source=benches/common.sh
. benches/common.sh
bench_prepare
mkdir -p "$out"
"$nats_bin" -a 127.0.0.1 -p "$port" >"$out/nats.log" 2>&1 &
nats_pid=$!
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  kill "$nats_pid" 2>/dev/null || true
}
trap cleanup EXIT
sleep 0.5

# Both placements serve with the same settings; the prefix cache is off (every run reuses
# the same seeded prompts).
export PAGODA_CACHE__ENABLE_PREFIX_CACHING=false PAGODA_LOG__STATS_INTERVAL_S=0
serve() { # name, role
  RUST_LOG=info "$bin" serve --nats-url "$url" --metrics-listen "" --role "$2" \
    >"$out/$1-$2.log" 2>&1 &
  pids+=($!)
}
stop_all() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  pids=()
}
bench() { # label
  "$bin" bench --nats-url "$url" --sweep "$sweep" --input-len "$input_len" \
    --output-len "$output_len" --prompts-per-concurrency "$ppc" --no-progress \
    --save-result "$out/$1.json" >"$out/$1.txt" 2>&1
}

for r in $(seq 1 "$rounds"); do
  say "round $r: all"
  serve "all-$r" all
  wait_ready "$out/all-$r-all.log" "serving"
  bench "all-$r"
  stop_all
  say "round $r: split"
  serve "split-$r" engine
  wait_ready "$out/split-$r-engine.log" "serving as an engine"
  serve "split-$r" frontend
  wait_ready "$out/split-$r-frontend.log" "frontend routing to engines"
  sleep 1 # the frontend hears the engine's first announcement
  bench "split-$r"
  stop_all
done

cpu=$(grep -o 'avx512_vnni\|avx_vnni\|avx2' /proc/cpuinfo | sort -u | tr '\n' ' ')
python3 - "$out" "$rounds" "$cpu" <<'EOF'
import json, sys
out, rounds, cpu = sys.argv[1], int(sys.argv[2]), sys.argv[3]
def rows(label):
    data = json.load(open(f"{out}/{label}.json"))
    reports = data if isinstance(data, list) else data.get("reports", data)
    return {r["max_concurrency"]: r for r in reports}
print(f"CPU features: {cpu}")
print(f"{'round':>5} {'conc':>4} | {'all tok/s':>9} {'split tok/s':>11} {'ratio':>6} | "
      f"{'ITL p50 all/split ms':>21} {'+ms':>6} | {'ITL p99 all/split ms':>21} {'+ms':>6} | "
      f"{'TPOT p50 all/split':>19}")
for r in range(1, rounds + 1):
    a, s = rows(f"all-{r}"), rows(f"split-{r}")
    for c in sorted(a):
        x, y = a[c], s[c]
        ta, ts = x["output_throughput"], y["output_throughput"]
        i50a, i50s = x["itl_ms"]["p50"], y["itl_ms"]["p50"]
        i99a, i99s = x["itl_ms"]["p99"], y["itl_ms"]["p99"]
        p50a, p50s = x["tpot_ms"]["p50"], y["tpot_ms"]["p50"]
        print(f"{r:>5} {c:>4} | {ta:>9.1f} {ts:>11.1f} {ts/ta:>6.3f} | "
              f"{i50a:>9.2f} / {i50s:>9.2f} {i50s-i50a:>+6.2f} | {i99a:>9.2f} / {i99s:>9.2f} "
              f"{i99s-i99a:>+6.2f} | {p50a:>8.2f} / {p50s:>8.2f}")
EOF
