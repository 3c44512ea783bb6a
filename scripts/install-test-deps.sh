#!/usr/bin/env bash
# Installs what the test suite needs on a fresh Debian machine. Idempotent.
#
# Walden's own protos compile with protox (pure Rust), so no protoc is needed. The standalone
# tests start real `walden` processes and need no external server. Services added later
# (etcd for distributed mode, brokers for other WAL backends) are installed here too.
set -euo pipefail

need=()
# Debian packages: command -> package.
declare -A packages=(
  [redis-server]=redis-server   # the peer of `walden bench --peer redis` (tests/bench.rs)
  [openssl]=openssl             # makes the certificates of tests/security.rs
)
for cmd in "${!packages[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || need+=("${packages[$cmd]}")
done
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}"
fi
command -v cargo >/dev/null || { echo "cargo not found: install Rust (rustup) first" >&2; exit 1; }
echo "test dependencies ready"
