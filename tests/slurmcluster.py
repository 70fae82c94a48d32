"""The local Slurm test cluster of ``scripts/cluster.sh`` for the tests that use it.

``cluster_sections()`` reads the DoPQ config ``cluster.sh up`` wrote and gives
the ``[runtime]``, ``[slurm]`` and ``[registry]`` tables a test server needs;
tests skip when no cluster is up (``bash scripts/cluster.sh up``; the test
command starts one). ``slurm(*argv)`` runs a Slurm command against it.
"""

from __future__ import annotations

import os
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
CLUSTER_DIR = Path(os.environ.get("DOPQ_CLUSTER_DIR", "/var/lib/dopq-cluster"))
CONFIG = Path(os.environ.get("DOPQ_SLURM_CONFIG") or CLUSTER_DIR / "dopq.toml")
NODES = ("dopq-n1", "dopq-n2")


def cluster_sections() -> dict[str, Any]:
    if not CONFIG.is_file():
        pytest.skip("no Slurm test cluster: bash scripts/cluster.sh up")
    cfg = tomllib.loads(CONFIG.read_text())
    if slurm("sinfo", "-h", "-o", "%N").returncode != 0:
        pytest.skip("the Slurm test cluster does not answer: bash scripts/cluster.sh up")
    return {"runtime": cfg["runtime"], "slurm": cfg["slurm"], "registry": cfg["registry"]}


def slurm(*argv: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SLURM_CONF": tomllib.loads(CONFIG.read_text())["slurm"]["conf"]}
    return subprocess.run(list(argv), env=env, capture_output=True, text=True, timeout=60,
                          check=check)


def cluster(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(ROOT / "scripts" / "cluster.sh"), *argv], check=check,
                          capture_output=True, text=True, timeout=300)


def jobs_of(owner: str) -> list[dict[str, str]]:
    """Slurm's jobs (pending, running, and ended ones it still keeps) of server ``owner``."""
    out = slurm("squeue", "-h", "-t", "all", "-o", "%i|%T|%N|%k").stdout
    rows = [dict(zip(("id", "state", "node", "comment"), line.split("|"), strict=True))
            for line in out.splitlines() if line.strip()]
    return [r for r in rows if r["comment"].startswith(f"dopq:{owner}:")]


def resume_nodes() -> None:
    """Both nodes' slurmd up and their states cleared (what a fault test left)."""
    for node in NODES:
        state = slurm("sinfo", "-h", "-n", node, "-o", "%T").stdout.strip()
        if state.startswith(("down", "drain", "fail")) or state.endswith("*"):
            cluster("node-start", node, check=False)
            slurm("scontrol", "update", f"nodename={node}", "state=resume")
