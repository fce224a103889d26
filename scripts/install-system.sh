#!/usr/bin/env bash
# System packages the tests need beyond .venv: Chromium, to render the Prefect UI headless
# (tests/test_flows.py, scripts/screenshot-prefect.sh). Debian/Ubuntu, run as root. Idempotent.
set -euo pipefail

if command -v chromium >/dev/null; then
  echo "chromium already installed: $(chromium --version 2>/dev/null || echo chromium)"
  exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo
$SUDO apt-get update -q
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q chromium
chromium --version
