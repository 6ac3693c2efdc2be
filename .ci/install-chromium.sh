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

if [ "$(id -u)" -eq 0 ]; then
    SUDO=()
elif command -v sudo >/dev/null 2>&1; then
    SUDO=(sudo)
else
    echo "install-chromium: need root or sudo to apt-get install chromium" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -qq
"${SUDO[@]}" apt-get install -y -qq --no-install-recommends chromium
echo "install-chromium: installed $(chromium --version 2>/dev/null | head -n1)"
