#!/usr/bin/env bash
# Install Debian's headless-capable Chromium for tests/test_plan_web.py, unless one is already there.
# Idempotent: a second run only prints the version. Needs root or passwordless sudo for apt-get.
set -euo pipefail

for name in chromium chromium-browser google-chrome; do
    if command -v "$name" >/dev/null 2>&1; then
        echo "install-chromium: found $(command -v "$name"): $("$name" --version 2>/dev/null | head -n1)"
        exit 0
    fi
done

source "$(dirname "$0")/apt.sh"
apt_install chromium
echo "install-chromium: installed $(chromium --version 2>/dev/null | head -n1)"
