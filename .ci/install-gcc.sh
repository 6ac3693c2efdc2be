#!/usr/bin/env bash
# Install a C compiler for ernie45/kernels (the decode kernels are compiled on first use), unless one
# is already there. Idempotent. Needs root or passwordless sudo for apt-get.
set -euo pipefail

if command -v gcc >/dev/null 2>&1; then
    echo "install-gcc: found $(gcc --version | head -n1)"
    exit 0
fi
if [ "$(id -u)" -eq 0 ]; then
    SUDO=()
elif command -v sudo >/dev/null 2>&1; then
    SUDO=(sudo)
else
    echo "install-gcc: need root or sudo to apt-get install gcc" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -qq
"${SUDO[@]}" apt-get install -y -qq --no-install-recommends gcc libc6-dev libgomp1
echo "install-gcc: installed $(gcc --version | head -n1)"
