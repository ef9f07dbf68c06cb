#!/usr/bin/env bash
# Installs what the tests need and runs every test: Rust unit and property tests, black-box
# tests against the real binary, and interop tests with real PouchDB 9 from npm.
set -euo pipefail
cd "$(dirname "$0")/.."

need() {
  command -v "$1" >/dev/null 2>&1 || { echo "run-all: '$1' is required but not installed ($2)" >&2; exit 1; }
}
need cargo "install Rust with rustup"
need node "install Node.js 20 or newer"
need npm "install npm"

echo "== installing npm packages for interop tests"
(cd tests/interop && npm ci --no-audit --no-fund --loglevel=error)

echo "== building"
cargo build --workspace --all-targets

echo "== cargo test"
cargo test --workspace

echo "== PouchDB interop"
THALI_BIN="$PWD/target/debug/thali" npm --prefix tests/interop test
echo "== all tests passed"
