#!/usr/bin/env bash
# Installs what the tests need and runs every test: Rust unit and property tests, black-box
# tests against the real binary (with the example WASM plugins built for wasm32), and interop
# tests with real PouchDB 9 and pouchdb-server from npm, and Tor tests on a private Tor network
# made from Debian's `tor`.
set -euo pipefail
cd "$(dirname "$0")/.."

need() {
  command -v "$1" >/dev/null 2>&1 || { echo "run-all: '$1' is required but not installed ($2)" >&2; exit 1; }
}
need cargo "install Rust with rustup"
need node "install Node.js 20 or newer"
need npm "install npm"

echo "== Debian's tor (a private Tor network for the onion tests)"
if ! command -v tor >/dev/null 2>&1 && [ ! -x /usr/sbin/tor ] || ! command -v tor-gencert >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq tor >/dev/null
  else
    echo "run-all: the Tor tests need Debian's tor package (tor and tor-gencert): apt-get install -y tor" >&2
    exit 1
  fi
fi

echo "== Debian's chromium (the dashboard's browser tests, driven by playwright-core)"
if [ ! -x /usr/bin/chromium ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "run-all: the dashboard tests need Debian's chromium: apt-get install -y chromium" >&2
    exit 1
  fi
fi

echo "== iproute2 (two network namespaces on a veth pair for the LAN discovery test)"
if [ "$(id -u)" != 0 ]; then
  echo "run-all: the LAN test creates network namespaces (ip netns) and must run as root" >&2
  exit 1
fi
if ! command -v ip >/dev/null 2>&1; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2 >/dev/null
fi

echo "== installing npm packages for interop tests"
(cd tests/interop && npm ci --no-audit --no-fund --loglevel=error)

echo "== building the example WASM plugins (wasm32-unknown-unknown)"
need rustup "install Rust with rustup (the wasm32 target is added with it)"
rustup target add wasm32-unknown-unknown
# Its own target directory whatever CARGO_TARGET_DIR says: the tests read the modules there.
cargo build --release --target wasm32-unknown-unknown --manifest-path plugins/Cargo.toml \
  --target-dir plugins/target

echo "== building"
cargo build --workspace --all-targets

echo "== cargo test"
# Every need is installed above: a test whose need is missing fails instead of skipping.
THALI_TEST_ALL=1 cargo test --workspace

echo "== PouchDB interop"
THALI_BIN="$PWD/target/debug/thali" npm --prefix tests/interop test
echo "== all tests passed"
