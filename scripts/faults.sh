#!/usr/bin/env bash
# The fault and hostile-input suite in its long form (issue 7): 10 kill -9
# cycles, more stalled connections, the engine restart last.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/engine.sh
bash scripts/venv.sh
bash scripts/base-image.sh
export DOPQ_FAULTS_FULL=1 QT_QPA_PLATFORM=offscreen
.venv/bin/pytest -q -p no:cacheprovider -s tests/test_recovery.py tests/test_faults.py \
    tests/test_fuzz_intake.py tests/test_nameserver.py tests/test_walls_images.py \
    tests/test_walls_transport.py tests/test_tls.py tests/test_walls_host.py \
    tests/test_walls_auth.py \
    tests/test_engine_restart.py "$@"
