#!/usr/bin/env bash
# Install a C compiler for ernie45/kernels (the decode kernels are compiled on first use), unless one
# is already there. Idempotent. Needs root or passwordless sudo for apt-get.
set -euo pipefail

if command -v gcc >/dev/null 2>&1; then
    echo "install-gcc: found $(gcc --version | head -n1)"
    exit 0
fi
source "$(dirname "$0")/apt.sh"
apt_install gcc libc6-dev libgomp1
echo "install-gcc: installed $(gcc --version | head -n1)"
