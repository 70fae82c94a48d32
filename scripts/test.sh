#!/usr/bin/env bash
# Command 2 of the README: set everything up and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/engine.sh
bash scripts/prometheus.sh
bash scripts/venv.sh
bash scripts/qt-deps.sh
bash scripts/base-image.sh
bash scripts/cluster.sh up >/dev/null  # the Slurm test cluster (tests/slurmcluster.py)
export QT_QPA_PLATFORM=offscreen
echo "== ruff"; .venv/bin/ruff check dopq tests bench scripts
echo "== mypy"; .venv/bin/mypy dopq
echo "== lint-imports"; .venv/bin/lint-imports --no-cache --no-logo  # the layers: pyproject.toml
echo "== pytest"
.venv/bin/pytest -q -p no:cacheprovider "$@"
