#!/usr/bin/env bash
# Coverage-guided fuzzing of one target with AFL++ (the long run; the test command runs every
# target briefly with thali-fuzz's own driver). Usage:
#   scripts/fuzz-afl.sh <target> [seconds]     # default 600; targets: cargo run -p thali-fuzz -- list
# Needs `cargo install cargo-afl` (it builds AFL++ on first use: `cargo afl config --build`).
# Findings land in fuzz/afl/out/<target>/default/crashes and hangs; replay one with
#   THALI_FUZZ_TARGET=<target> fuzz/afl/target/release/thali-fuzz-afl < <file>
set -euo pipefail
cd "$(dirname "$0")/.."
target=${1:?usage: scripts/fuzz-afl.sh <target> [seconds]}
seconds=${2:-600}
command -v cargo-afl >/dev/null || { echo "fuzz-afl: cargo install cargo-afl first" >&2; exit 1; }
cargo afl config --build >/dev/null 2>&1 || true
cargo run -q -p thali-fuzz --bin thali-fuzz -- seeds fuzz/afl/seeds
(cd fuzz/afl && cargo afl build --release)
mkdir -p fuzz/afl/out
# Persistent mode (afl::fuzz!): one process, hence one in-process node, runs many inputs.
export AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 AFL_NO_UI=1
export THALI_FUZZ_TARGET="$target"
exec cargo afl fuzz -V "$seconds" -t 20000 -i "fuzz/afl/seeds/$target" -o "fuzz/afl/out/$target" \
  fuzz/afl/target/release/thali-fuzz-afl
