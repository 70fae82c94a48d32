#!/usr/bin/env bash
# The system libraries PySide6 needs on a bare Debian (as root): offscreen (tests,
# screenshots) and on a real X display (Qt's xcb platform plugin, for `dopq gui`).
# Installs only what is missing; run without root it names what is missing.
set -euo pipefail
PACKAGES=(
    # offscreen and every platform
    libgl1 libegl1 libxkbcommon0 libfontconfig1 libdbus-1-3 libglib2.0-0 fonts-dejavu-core
    # a real X server: the xcb plugin and the xcb libraries it loads
    libx11-xcb1 libxkbcommon-x11-0 libxcb-cursor0 libxcb-icccm4 libxcb-image0
    libxcb-keysyms1 libxcb-randr0 libxcb-render-util0 libxcb-shape0 libxcb-xinerama0
    libxcb-xkb1 libxcb-xfixes0 libxcb-sync1 libxcb-shm0 libxrender1
)
missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "qt-deps: missing ${missing[*]}; install them as root (apt-get install ...)" >&2
    exit 1
fi
echo "qt-deps: installing Qt runtime libraries: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
