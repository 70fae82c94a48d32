"""The house's layers: what each side loads, and how big a room may grow.

The import contract itself (cli over client | server, over wire, over core) is
``lint-imports``'s to check (pyproject.toml, scripts/test.sh); these tests
check what actually gets loaded, which also covers imports made at run time.
"""

from __future__ import annotations

import importlib.util
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

import dopq
from dopq.wire.protocol import IDEMPOTENT_CALLS

PACKAGE = Path(dopq.__file__).parent
MAX_LINES = 500


def loaded_after(code: str) -> set[str]:
    """The modules a fresh interpreter holds after running ``code``."""
    probe = code + "\nimport sys\nprint('\\n'.join(sorted(sys.modules)))\n"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=60, check=True)
    return set(done.stdout.split())


def server_side(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if m == "dopq.server" or m.startswith("dopq.server.")
                  or m == "docker" or m.startswith("docker."))


def test_the_client_and_its_commands_load_neither_the_server_nor_docker() -> None:
    loaded = loaded_after(
        "import dopq.client.commands, dopq.client.remote\n"
        "dopq.client.commands.build_parser()  # loads every client command module\n"
        "import dopq.client.job_commands, dopq.client.account_commands\n"
        "import dopq.client.info_commands\n")
    assert "dopq.client.info_commands" in loaded and "Pyro5" in loaded
    assert server_side(loaded) == []


@pytest.mark.skipif(importlib.util.find_spec("PySide6") is None, reason="PySide6 missing")
def test_the_gui_loads_neither_the_server_nor_docker() -> None:
    loaded = loaded_after("import dopq.client.gui.pipeline, dopq.client.gui.app")
    assert "dopq.client.gui.pipeline" in loaded
    assert server_side(loaded) == []


def test_the_dopq_command_loads_the_server_only_to_run_its_commands() -> None:
    """``dopq status`` starts without the scheduler, the store or docker-py."""
    loaded = loaded_after("import dopq.cli\ndopq.cli.commands.build_parser(dopq.cli.HOST)\n")
    assert server_side(loaded) == ["dopq.server", "dopq.server.host_commands"]


def test_calls_a_client_may_send_twice_are_api_calls() -> None:
    from dopq.server.api import Controller

    methods = {n for n, _ in inspect.getmembers(Controller, inspect.isfunction)
               if not n.startswith("_")}
    assert IDEMPOTENT_CALLS <= methods, IDEMPOTENT_CALLS - methods


def module_lengths() -> dict[str, int]:
    return {str(p.relative_to(PACKAGE.parent)): len(p.read_text().splitlines())
            for p in sorted(PACKAGE.rglob("*.py"))}


def test_no_module_is_over_500_lines() -> None:
    over = {name: n for name, n in module_lengths().items() if n > MAX_LINES}
    assert not over, f"split these modules (at most {MAX_LINES} lines each): {over}"
