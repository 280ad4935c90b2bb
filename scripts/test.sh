#!/usr/bin/env bash
# pagoda's test command: fetches what the tests need (the default model), then runs the
# whole workspace's tests in release mode (the model-loading tests need the speed).
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/fetch-model.sh
cargo test --release --workspace "$@"
