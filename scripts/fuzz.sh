#!/usr/bin/env bash
# Runs each fuzz target for a while (default 60 s each) from its seed corpus in fuzz/corpus/
# (new inputs go to a scratch directory, so the tree stays clean). Needs cargo-fuzz (installed
# here if missing); on a stable toolchain RUSTC_BOOTSTRAP=1 enables the sanitizer flags it uses.
# A crash fails the script and leaves the input under fuzz/artifacts/. Each run uses a fixed
# seed (FUZZ_SEED, printed) so a failure replays exactly, and an input that takes over 10 s
# counts as a hang.
#   ./scripts/fuzz.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs=${1:-60}
seed=${FUZZ_SEED:-20261206}
echo "fuzz smoke: seed $seed (replay with FUZZ_SEED=$seed)"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
targets=(decode_record wal_segment shared_layout insert_payload object_fragment segment_files filter_expr key_filter)
for target in "${targets[@]}"; do
  mkdir -p "$scratch/$target"
  RUSTC_BOOTSTRAP=1 cargo fuzz run "$target" "$scratch/$target" "corpus/$target" -- \
    -max_total_time="$secs" -timeout=10 -seed="$seed" -print_final_stats=1
done
echo "fuzz smoke: ${#targets[@]} targets, ${secs} s each, seed $seed, no crash"
