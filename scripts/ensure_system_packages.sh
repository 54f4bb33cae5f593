#!/usr/bin/env bash
# Debian packages the end-to-end tests use: a real Prometheus server (and Chromium for the
# web page's browser test). Installed only when missing; needs root (or sudo) and apt.
set -euo pipefail
missing=()
command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if ! command -v sudo >/dev/null 2>&1; then
        echo "[setup] the tests need Debian's ${missing[*]} (installing them needs root, and there is no sudo):" \
            "run apt-get install ${missing[*]} as root, then make test again" >&2
        exit 1
    fi
    SUDO="sudo"
fi
echo "[setup] installing Debian packages (as root${SUDO:+, through sudo}): ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq || true
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
