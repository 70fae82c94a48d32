#!/usr/bin/env bash
# Build dopq/busybox:latest, the offline base image of the examples and tests:
# FROM scratch with Debian's static busybox. Nothing is pulled.
set -euo pipefail
cd "$(dirname "$0")/.."
if docker image inspect dopq/busybox:latest >/dev/null 2>&1; then
    exit 0
fi
BB=$(command -v busybox || true)
[ -n "$BB" ] || { echo "base-image: busybox-static is not installed" >&2; exit 1; }
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
cp "$BB" "$ctx/busybox"
cp examples/base/Dockerfile "$ctx/Dockerfile"
docker build -q -t dopq/busybox:latest "$ctx" >/dev/null 2>&1
echo "base-image: built dopq/busybox:latest"
