"""A DoPQ server as a child process (``python -m dopq.cli server``), for the tests
that kill it with -9 (``test_recovery``, ``test_slurm_faults``), and a client
signed in to it once it answers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from conftest import PASSWORDS, wait_for

from dopq.client.remote import Client
from dopq.core.errors import DopqError


class ServerProc:
    """``python -m dopq.cli server --config X`` as a child process (killed with -9)."""

    def __init__(self, config: Path, log: Path) -> None:
        self.config, self.log = config, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dopq.cli", "server", "--config", str(self.config)],
                stdout=out, stderr=subprocess.STDOUT)

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def term(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def signed_in(settings: Any, user: str) -> Client:
    c = Client(settings.nameserver.host, settings.nameserver.port, settings.server_name,
               token="")

    def login() -> bool:
        try:
            c.login(user, PASSWORDS[user], remember=False)
            return True
        except DopqError:
            return False

    wait_for(login, 60, 0.2)
    return c
