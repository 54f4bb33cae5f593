#!/usr/bin/env bash
# Debian packages a target uses, each named by the command it provides: by default what the
# end-to-end tests use (a real Prometheus server, Chromium for the web page's browser test);
# make images passes podman, runc and debootstrap. A package that provides no command is named
# FILE:PACKAGE (the real node's CNI plugins). Installed only when missing; needs root (or sudo)
# and apt.
set -euo pipefail
wanted=("$@")
if [ ${#wanted[@]} -eq 0 ]; then
    wanted=(prometheus chromium)
fi
missing=()
for command in "${wanted[@]}"; do
    case "$command" in
        /*:*) [ -e "${command%%:*}" ] || missing+=("${command#*:}") ;;
        *) command -v "$command" >/dev/null 2>&1 || missing+=("$command") ;;
    esac
done
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if ! command -v sudo >/dev/null 2>&1; then
        echo "[setup] this needs Debian's ${missing[*]} (installing them needs root, and there is no sudo):" \
            "run apt-get install ${missing[*]} as root, then run make again" >&2
        exit 1
    fi
    SUDO="sudo"
fi
echo "[setup] installing Debian packages (as root${SUDO:+, through sudo}): ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq || true
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
