#!/usr/bin/env bash
# The system libraries PySide6 needs to run offscreen on a bare Debian.
set -euo pipefail
if .venv/bin/python -c 'from PySide6 import QtWidgets' >/dev/null 2>&1; then
    exit 0
fi
echo "qt-deps: installing Qt runtime libraries"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq libgl1 libegl1 libxkbcommon0 libfontconfig1 libdbus-1-3 \
    libglib2.0-0 fonts-dejavu-core >/dev/null
