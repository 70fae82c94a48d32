#!/usr/bin/env python3
"""Check DoPQ's NVML backend on a real GPU host.

Opens the ``nvml`` backend, prints its devices and one sample as JSON, and exits
0; exits 1 with the reason on stderr when NVML is not usable. Run from the
repository root: ``python scripts/nvml_check.py``.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

# Works from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dopq.core.errors import ConfigError  # noqa: E402
from dopq.server.gpus import external_busy, open_backend  # noqa: E402


def main() -> int:
    try:
        backend = open_backend("nvml", 0)
    except ConfigError as exc:
        print(f"nvml_check: {exc}", file=sys.stderr)
        return 1
    try:
        devices = backend.devices()
        samples = backend.sample()
    finally:
        backend.close()
    report = {
        "backend": backend.kind,
        "devices": [asdict(d) for d in devices],
        "sample": [asdict(s) for s in samples],
        # with no PIDs of ours, every GPU with a process counts as busy from outside
        "busy_without_dopq": sorted(external_busy(samples, set())),
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
