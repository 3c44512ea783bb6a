#!/usr/bin/env bash
# Runs each fuzz target for a while (default 60 s each). Needs cargo-fuzz; on a stable
# toolchain RUSTC_BOOTSTRAP=1 enables the sanitizer flags it uses.
#   ./scripts/fuzz.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs=${1:-60}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
for target in decode_record wal_segment insert_payload; do
  RUSTC_BOOTSTRAP=1 cargo fuzz run "$target" -- -max_total_time="$secs"
done
