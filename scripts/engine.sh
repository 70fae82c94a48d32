#!/usr/bin/env bash
# Make sure a Docker engine answers on /var/run/docker.sock.
# Installs Debian's docker.io and busybox-static when missing and starts dockerd
# without a bridge, so containers never get a private-range address.
set -euo pipefail
SOCK=/var/run/docker.sock

need_install=0
command -v dockerd >/dev/null 2>&1 || need_install=1
[ -x /bin/busybox ] || [ -x /usr/bin/busybox ] || need_install=1
if [ "$need_install" = 1 ]; then
    echo "engine: installing docker.io and busybox-static"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq docker.io busybox-static >/dev/null
fi

if docker -H "unix://$SOCK" info >/dev/null 2>&1; then
    exit 0
fi

echo "engine: starting dockerd"
mkdir -p /var/log
# setsid: the engine outlives the shell (or test) that started it.
setsid nohup dockerd --bridge=none --iptables=false --ip-masq=false \
    >/var/log/dopq-dockerd.log 2>&1 &
echo $! >/var/run/dopq-dockerd.pid
for _ in $(seq 1 120); do
    if docker -H "unix://$SOCK" info >/dev/null 2>&1; then
        echo "engine: up"
        exit 0
    fi
    sleep 0.5
done
echo "engine: dockerd did not come up, see /var/log/dopq-dockerd.log" >&2
exit 1
