#!/usr/bin/env bash
# Make sure Debian's Prometheus server is installed (tests/test_metrics.py runs
# its own copy on a free loopback port). The package's service is kept from
# starting: nothing here should listen on :9090, where DoPQ's name server lives.
set -euo pipefail
if command -v prometheus >/dev/null 2>&1; then
    exit 0
fi
echo "prometheus: installing Debian's prometheus"
export DEBIAN_FRONTEND=noninteractive
# policy-rc.d answering 101 tells invoke-rc.d not to start the service it installs.
made_policy=0
if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    made_policy=1
fi
trap '[ "$made_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d' EXIT
apt-get update -qq
apt-get install -y -qq --no-install-recommends prometheus >/dev/null
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    systemctl disable --now prometheus >/dev/null 2>&1 || true
fi
command -v prometheus >/dev/null
echo "prometheus: $(prometheus --version 2>&1 | head -1)"
