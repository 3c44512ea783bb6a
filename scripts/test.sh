#!/usr/bin/env bash
# Installs the test dependencies, then runs the whole test suite. The README's test command.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-test-deps.sh
cargo test --workspace --all-features --locked
# Milvus's API as Milvus users reach it: pymilvus against a real `walden standalone` (the
# binary the line above built).
python3 -m pytest -q tests/milvus
