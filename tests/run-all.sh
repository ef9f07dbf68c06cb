#!/usr/bin/env bash
# Installs what the tests need and runs every test: Rust unit and property tests, black-box
# tests against the real binary (with the example WASM plugins built for wasm32), and interop
# tests with real PouchDB 9 and pouchdb-server from npm.
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

echo "== building the example WASM plugins (wasm32-unknown-unknown)"
need rustup "install Rust with rustup (the wasm32 target is added with it)"
rustup target add wasm32-unknown-unknown
cargo build --release --target wasm32-unknown-unknown --manifest-path plugins/Cargo.toml

echo "== building"
cargo build --workspace --all-targets

echo "== cargo test"
cargo test --workspace

echo "== PouchDB interop"
THALI_BIN="$PWD/target/debug/thali" npm --prefix tests/interop test
echo "== all tests passed"
