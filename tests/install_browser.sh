#!/usr/bin/env bash
# Headless Chromium and its driver for the web page's browser test (tests/test_server.py), from
# Debian's packages: chromium + chromium-driver (matching versions; selenium then needs no
# driver download). Does nothing when both are installed. Run as root or with sudo.
set -euo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
    echo "browser: $(chromium --version 2>/dev/null || echo chromium), $(chromedriver --version | head -1)"
    exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends chromium chromium-driver
echo "browser: $(chromium --version 2>/dev/null || echo chromium), $(chromedriver --version | head -1)"
