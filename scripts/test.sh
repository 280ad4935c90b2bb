#!/usr/bin/env bash
# pagoda's test command: fetches what the tests need (the default model, a nats-server for
# the end-to-end tests, which start their own on free ports, the Python example's packages
# (nats-py, msgpack) into .tools/python/, and a Prometheus for the
# scrape test, unpacked from Debian's package into .tools/), then runs the whole
# workspace's tests in release mode (the model-loading tests need the speed).
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/fetch-model.sh
PAGODA_NATS_SERVER=$(./scripts/nats-server.sh)
export PAGODA_NATS_SERVER
echo "using $PAGODA_NATS_SERVER ($("$PAGODA_NATS_SERVER" --version))" >&2
PAGODA_PYTHON=$(./scripts/python-env.sh)
export PAGODA_PYTHON
echo "using $PAGODA_PYTHON ($("$PAGODA_PYTHON" --version 2>&1)) for the Python example's tests" >&2
PAGODA_PROMETHEUS=$(./scripts/prometheus.sh)
export PAGODA_PROMETHEUS
echo "using $PAGODA_PROMETHEUS ($("$PAGODA_PROMETHEUS" --version 2>&1 | head -n 1))" >&2
cargo test --release --workspace "$@"
