#!/usr/bin/env bash
# Installs the test dependencies, then runs the whole test suite. The README's test command.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-test-deps.sh
cargo test --workspace --all-features --locked
# Milvus's API as Milvus users reach it: pymilvus against a real `walden standalone` (the
# binary the line above built).
python3 -m pytest -q tests/milvus
# Again under pymilvus 3.x (the current release), then milvus-lite's own pymilvus-driven suite
# against Walden: every test in tests/milvus_lite/expected_pass.txt must pass, and no other.
VENV3="${WALDEN_TEST_CACHE:-$HOME/.cache/walden}/venv-pymilvus3"
"$VENV3/bin/python" -m pytest -q tests/milvus
"$VENV3/bin/python" tests/milvus_lite/run.py
