#!/usr/bin/env bash
# Installs the peers `walden bench --peer ...` runs against. Idempotent.
#   redis: Debian's redis-server (the bench starts it itself with appendonly yes,
#          appendfsync always, on 127.0.0.1 and a free port).
set -euo pipefail
if ! command -v redis-server >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server
fi
redis-server --version
