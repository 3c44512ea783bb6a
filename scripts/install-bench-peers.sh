#!/usr/bin/env bash
# Installs the peers `walden bench --peer ...` runs against. Idempotent.
#   redis: Debian's redis-server (the bench starts it itself with appendonly yes,
#          appendfsync always, on 127.0.0.1 and a free port).
#   milvus-lite, lancedb (`walden bench search`): PyPI wheels in .venv-peers/, which the bench
#          uses when it is present (about a minute).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v redis-server >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server python3-venv
fi
redis-server --version
[ -x .venv-peers/bin/python ] || python3 -m venv .venv-peers
.venv-peers/bin/pip install --quiet pymilvus milvus-lite lancedb numpy
.venv-peers/bin/pip list 2>/dev/null | grep -Ei '^(pymilvus|milvus-lite|lancedb|pyarrow|numpy) '
