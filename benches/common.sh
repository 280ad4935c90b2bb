# Sourced (not run) by the benches that drive `pagoda serve` on a local nats-server
# (split_vs_all.sh, nats_path_cpu.sh), from the repository root, with `say` defined.

# Fetches the model, finds or installs nats-server (sets nats_bin), builds pagoda in release
# mode (bin) and picks a free port on 127.0.0.1 (port, url).
bench_prepare() {
  ./scripts/fetch-model.sh >/dev/null
  nats_bin=$(./scripts/nats-server.sh)
  cargo build --release --quiet
  bin="${CARGO_TARGET_DIR:-$PWD/target}/release/pagoda"
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  url="nats://127.0.0.1:$port"
}

# wait_ready LOG NEEDLE [PID]: returns once NEEDLE is in LOG; exits with LOG on stderr
# after 60 s, or at once when PID (the process writing LOG) has exited.
wait_ready() {
  for _ in $(seq 1 600); do
    grep -q "$2" "$1" 2>/dev/null && return 0
    if [ -n "${3:-}" ] && ! kill -0 "$3" 2>/dev/null; then break; fi
    sleep 0.1
  done
  say "no '$2' in $1"
  cat "$1" >&2
  exit 1
}
