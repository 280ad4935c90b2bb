#!/usr/bin/env bash
# Side-by-side benchmark of pagoda and llama.cpp's llama-server on the same GGUF, with the
# same prompts (token ids), driven by one client: `pagoda bench`. Not run in CI.
#
#   benches/compare_llamacpp.sh [--sweep 1,8,32] [--input-len 128] [--output-len 128]
#                               [--num-prompts N] [--out DIR] [--no-nats] [--build-only]
#                               [--wait-idle SECONDS] [--cpu native|avx2] [--repeat N]
#
# 1. Builds llama-server (CPU only, -DGGML_NATIVE=ON, only the server target) from the
#    llama.cpp that the PyPI sdist of llama-cpp-python vendors, into
#    ${PAGODA_CACHE:-$HOME/.cache/pagoda}/llama.cpp (idempotent; never in the repository).
#    cmake comes from PyPI (a venv in the cache) when the system has none.
# 2. Starts `llama-server -m <model> -np <max concurrency> --cont-batching -t <threads>
#    -c <slots × (input + output + 16), rounded up to 256>` on a free port, waits for
#    /health, runs `pagoda bench --llama-server-url …`, and stops it.
# 3. Only then runs pagoda in-process (and, unless --no-nats, through a nats-server from
#    scripts/nats-server.sh via --compare-nats-url) with the same arguments, passing the
#    llama-server results as --baseline so that one report shows every row, the ratios
#    pagoda / llama.cpp, and one plot. The two engines never run at the same time.
#
# --cpu avx2 measures both engines as on an AVX2-only machine, on any newer x86 CPU:
# llama-server is built with GGML_NATIVE=OFF and only AVX/AVX2/FMA/F16C (no AVX-512, no
# VNNI; a separate build directory) and pagoda runs with PAGODA_KERNELS_INT8=avx2.
#
# --repeat N measures the pair N times in turn (llama-server, pagoda, llama-server, …),
# each into --out/runK, then prints every run's ratios and their median per row: on a
# noisy machine one run says little (llama.cpp swings by ±10-30 % between runs).
#
# Environment: PAGODA_CACHE (cache root), LLAMA_CPP_PYTHON_VERSION (default below),
# PAGODA_THREADS (llama-server -t, default: nproc), PAGODA_MODEL (default: the model that
# scripts/fetch-model.sh puts in models/).
# Results go to --out (default target/bench-compare/): llama-server.json, pagoda.json
# (every row, llama-server included), compare.png, and the logs. Before each engine's
# measurement the script samples the CPU for 2 s and warns when something else is using it;
# --wait-idle S first waits up to S seconds for the CPU to become idle (shared machines).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
version="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
cache="${PAGODA_CACHE:-$HOME/.cache/pagoda}/llama.cpp"
threads="${PAGODA_THREADS:-$(nproc)}"

sweep="1,8,32"
input_len=128
output_len=128
num_prompts=""
out="$root/target/bench-compare"
nats=1
build_only=0
wait_idle=0
cpu=native
repeat=1
while [ $# -gt 0 ]; do
  case "$1" in
    --sweep) sweep="$2"; shift 2 ;;
    --input-len) input_len="$2"; shift 2 ;;
    --output-len) output_len="$2"; shift 2 ;;
    --num-prompts) num_prompts="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --no-nats) nats=0; shift ;;
    --build-only) build_only=1; shift ;;
    --wait-idle) wait_idle="$2"; shift 2 ;;
    --cpu) cpu="$2"; shift 2 ;;
    --repeat) repeat="$2"; shift 2 ;;
    -h|--help) sed -n '2,35p' "$0"; exit 0 ;;
    *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

say() { echo "compare_llamacpp: $*" >&2; }

case "$repeat" in ''|*[!0-9]*|0) say "error: --repeat takes a positive integer, got $repeat"; exit 2 ;; esac

case "$cpu" in
  native) isa_flags=(-DGGML_NATIVE=ON) ;;
  avx2)
    isa_flags=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
      -DGGML_BMI2=ON -DGGML_AVX_VNNI=OFF -DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF
      -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF)
    export PAGODA_KERNELS_INT8=avx2
    ;;
  *) say "error: --cpu takes native or avx2, got $cpu"; exit 2 ;;
esac

py=""
for cand in python3 python; do
  if command -v "$cand" >/dev/null 2>&1 && "$cand" -m pip --version >/dev/null 2>&1; then py="$cand"; break; fi
done

# ---------------------------------------------------------------------------------------
# 1. llama-server
src="$cache/llama_cpp_python-$version/vendor/llama.cpp"
build="$cache/build-$version"
[ "$cpu" = native ] || build="$build-$cpu"
server="$build/bin/llama-server"

find_cmake() {
  if command -v cmake >/dev/null 2>&1; then command -v cmake; return; fi
  if [ ! -x "$cache/venv/bin/cmake" ]; then
    [ -n "$py" ] || { say "error: no cmake and no pip to install it from PyPI"; exit 1; }
    say "installing cmake from PyPI into $cache/venv"
    "$py" -m venv "$cache/venv" >&2
    "$cache/venv/bin/pip" install --quiet --disable-pip-version-check cmake >&2
  fi
  echo "$cache/venv/bin/cmake"
}

build_server() {
  mkdir -p "$cache"
  if [ ! -f "$src/tools/server/server.cpp" ]; then
    [ -n "$py" ] || { say "error: pip is required to download the llama-cpp-python sdist"; exit 1; }
    local dl="$cache/download"
    mkdir -p "$dl"
    if ! ls "$dl"/llama_cpp_python-"$version".tar.gz >/dev/null 2>&1; then
      say "downloading the sdist of llama-cpp-python==$version from PyPI"
      # Only llama-cpp-python itself from source: its build tools come as wheels.
      "$py" -m pip download --quiet --disable-pip-version-check --no-deps \
        --no-binary llama-cpp-python "llama-cpp-python==$version" -d "$dl" >&2
    fi
    tar -xzf "$dl/llama_cpp_python-$version.tar.gz" -C "$cache"
  fi
  local cmake
  cmake=$(find_cmake)
  say "building llama-server from $src with $cmake (this takes a while)"
  "$cmake" -S "$src" -B "$build" -DCMAKE_BUILD_TYPE=Release "${isa_flags[@]}" \
    -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DGGML_BLAS=OFF -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DBUILD_SHARED_LIBS=OFF >&2
  "$cmake" --build "$build" --target llama-server -j "$(nproc)" >&2
}

if [ ! -x "$server" ]; then
  build_server
fi
say "llama-server: $server ($("$server" --version 2>&1 | grep -m1 -i version || true))"
[ "$build_only" = 1 ] && exit 0

# ---------------------------------------------------------------------------------------
# 2. the workload, the model, pagoda
IFS=, read -r -a levels <<<"$sweep"
max_c=0
for c in "${levels[@]}"; do
  case "$c" in ''|*[!0-9]*) say "error: --sweep takes positive integers, got $sweep"; exit 2 ;; esac
  [ "$c" -gt "$max_c" ] && max_c=$c
done
[ "$max_c" -ge 1 ] || { say "error: empty --sweep"; exit 2; }
# llama-server splits -c evenly among its -np slots: each needs the prompt, the output and
# a little slack.
ctx=$(( max_c * (input_len + output_len + 16) ))
ctx=$(( (ctx + 255) / 256 * 256 ))

model="${PAGODA_MODEL:-}"
if [ -z "$model" ]; then
  "$root/scripts/fetch-model.sh"
  model="$root/models/SmolLM2-135M-Instruct.Q4_1.gguf"
fi
[ -f "$model" ] || { say "error: no model at $model"; exit 1; }

pagoda="${PAGODA_BIN:-}"
if [ -z "$pagoda" ]; then
  (cd "$root" && cargo build --release --bin pagoda >&2)
  pagoda="${CARGO_TARGET_DIR:-$root/target}/release/pagoda"
fi

mkdir -p "$out"
common=(--model "$model" --sweep "$sweep" --input-len "$input_len" --output-len "$output_len" --seed 0)
if [ -n "$num_prompts" ]; then
  common+=(--num-prompts "$num_prompts")
else
  common+=(--prompts-per-concurrency 2)   # 2 × concurrency, at least 8
fi

free_port() {
  "${py:-python3}" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

http_ok() {
  if command -v curl >/dev/null 2>&1; then
    curl -fsS -o /dev/null "$1" 2>/dev/null
  else
    "${py:-python3}" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' "$1" 2>/dev/null
  fi
}

pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
}
trap cleanup EXIT
stop() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }

# Both engines want every core: anything else running distorts the numbers. Say so,
# instead of silently reporting them.
cpu_busy() {  # percent of the CPU busy over 2 s, from /proc/stat
  local a b
  a=$(head -n1 /proc/stat 2>/dev/null) || { echo 0; return; }
  sleep 2
  b=$(head -n1 /proc/stat)
  awk -v a="$a" -v b="$b" 'BEGIN {
    n = split(a, x, " "); split(b, y, " "); tot = 0
    for (i = 2; i <= n; i++) tot += y[i] - x[i]
    idle = (y[5] - x[5]) + (y[6] - x[6])
    printf "%d", (tot > 0 ? 100 * (tot - idle) / tot : 0) }'
}

check_quiet() {
  local busy deadline=$((SECONDS + wait_idle))
  busy=$(cpu_busy)
  while [ "$busy" -gt 20 ] && [ "$SECONDS" -lt "$deadline" ]; do
    say "the CPU is ${busy}% busy; waiting for it to become idle before measuring $1"
    sleep 8
    busy=$(cpu_busy)
  done
  if [ "$busy" -gt 20 ]; then
    say "warning: the CPU is ${busy}% busy just before measuring $1: other processes distort the numbers (llama.cpp's spinning threads suffer most)"
  fi
}

# ---------------------------------------------------------------------------------------
# 3. what pagoda is measured as: in-process, and (unless --no-nats) through NATS
targets=(--in-process)
if [ "$nats" = 1 ]; then
  if nats_bin=$("$root/scripts/nats-server.sh"); then
    nport=$(free_port)
    "$nats_bin" -a 127.0.0.1 -p "$nport" >"$out/nats-server.log" 2>&1 &
    nats_pid=$!
    pids+=("$nats_pid")
    for _ in $(seq 1 50); do
      (exec 3<>"/dev/tcp/127.0.0.1/$nport") 2>/dev/null && break
      sleep 0.2
    done
    targets=(--compare-nats-url "nats://127.0.0.1:$nport")
  else
    say "warning: no nats-server; measuring pagoda in-process only"
  fi
fi

# ---------------------------------------------------------------------------------------
# 4. --repeat times: llama-server alone on the machine, then pagoda alone.
measure() {
  local run_out=$1
  mkdir -p "$run_out"
  port=$(free_port)
  say "starting llama-server on 127.0.0.1:$port: -np $max_c --cont-batching -t $threads -c $ctx"
  "$server" -m "$model" -np "$max_c" --cont-batching -t "$threads" -c "$ctx" \
    --host 127.0.0.1 --port "$port" >"$run_out/llama-server.log" 2>&1 &
  llama_pid=$!
  pids+=("$llama_pid")
  for _ in $(seq 1 240); do
    http_ok "http://127.0.0.1:$port/health" && break
    kill -0 "$llama_pid" 2>/dev/null || { say "error: llama-server exited; see $run_out/llama-server.log"; tail -20 "$run_out/llama-server.log" >&2; exit 1; }
    sleep 0.5
  done
  http_ok "http://127.0.0.1:$port/health" || { say "error: llama-server not healthy after 120 s"; exit 1; }

  check_quiet "llama-server"
  say "benchmarking llama-server"
  "$pagoda" bench --llama-server-url "http://127.0.0.1:$port" "${common[@]}" \
    --save-result "$run_out/llama-server.json" | tee "$run_out/llama-server.txt"
  stop "$llama_pid"

  check_quiet "pagoda"
  say "benchmarking pagoda (${targets[*]})"
  "$pagoda" bench "${targets[@]}" "${common[@]}" --baseline "$run_out/llama-server.json" \
    --save-result "$run_out/pagoda.json" --plot "$run_out/compare.png" | tee "$run_out/pagoda.txt"
}

if [ "$repeat" = 1 ]; then
  measure "$out"
else
  for rep in $(seq 1 "$repeat"); do
    say "run $rep of $repeat"
    measure "$out/run$rep"
  done
  # Every run's ratio rows (concurrency, target, ratio), then the median of each row.
  echo "========== pagoda / llama-server over $repeat runs (output tok/s ratio) =========="
  for rep in $(seq 1 "$repeat"); do
    awk -v rep="$rep" '/pagoda \/ llama.cpp/ {on = 1; next} on && $1 ~ /^[0-9]+$/ {print rep, $1, $2, $5}' \
      "$out/run$rep/pagoda.txt"
  done | sort -k2,2n -k3,3 -k1,1n | awk '
    function flush(   i, j, x) {
      for (i = 2; i <= n; i++) { x = v[i]; for (j = i - 1; j >= 1 && v[j] > x; j--) v[j + 1] = v[j]; v[j + 1] = x }
      if (n) { m = (n % 2) ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2
        printf "%11s  %-10s  %s  median %.2fx\n", c, t, list, m } n = 0; list = "" }
    { key = $2 " " $3; if (key != last) { flush(); last = key; c = $2; t = $3 }
      r = $4; sub(/x$/, "", r); v[++n] = r + 0; list = list (list == "" ? "" : " ") $4 }
    END { flush() }'
fi

say "llama-server: $("$server" --version 2>&1 | grep -m1 -i version || true) (llama-cpp-python $version)"
if [ "$repeat" = 1 ]; then
  say "results: $out/pagoda.json (all rows), $out/compare.png, logs in $out"
else
  say "results: $out/run1 … $out/run$repeat (pagoda.json with all rows, compare.png, logs)"
fi
