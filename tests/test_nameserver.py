"""Name server gone and back (issue 7, fault 3): servers register again, clients reconnect."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import PASSWORDS, add_users, cleanup_docker, make_config, wait_for, write_toml

from dopq.client.remote import Client
from dopq.core import settings as settings_mod
from dopq.core.errors import DopqError, ServerUnavailable

pytestmark = pytest.mark.docker


def _spawn(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)


def _ns(port: int, log: Path) -> subprocess.Popen[bytes]:
    return _spawn([sys.executable, "-m", "Pyro5.nameserver", "-n", "127.0.0.1", "-p", str(port)],
                  log)


def _server(cfg: dict[str, Any], tmp: Path) -> subprocess.Popen[bytes]:
    config = write_toml(cfg, tmp / "config.toml")
    return _spawn([sys.executable, "-m", "dopq.cli", "server", "--config", str(config)],
                  tmp / "server.log")


def _registered(c: Client, name: str) -> bool:
    try:
        return name in c.servers()
    except DopqError:
        return False


def _works(c: Client) -> bool:
    try:
        return c.call("whoami")["user"] == "alice"
    except DopqError:
        return False


def _stop(p: subprocess.Popen[bytes]) -> None:
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)


def test_external_name_server_restart(tmp_path: Path, engine: None) -> None:
    cfg = make_config(tmp_path, nameserver={"embedded": "no"})
    s = settings_mod.from_dict(cfg)
    add_users(s.db_path)
    ns = _ns(s.nameserver.port, tmp_path / "ns.log")
    server = _server(cfg, tmp_path)
    try:
        c = Client(s.nameserver.host, s.nameserver.port, s.server_name, token="")
        wait_for(lambda: _registered(c, s.server_name), 60, 0.2)
        c.login("alice", PASSWORDS["alice"], remember=False)
        ns.kill()
        ns.wait(10)
        fresh = Client(s.nameserver.host, s.nameserver.port, s.server_name, token=c.token)
        with pytest.raises(ServerUnavailable):
            fresh.call("whoami")
        ns = _ns(s.nameserver.port, tmp_path / "ns.log")
        back = time.monotonic()
        wait_for(lambda: _works(fresh), 30, 0.1)
        assert time.monotonic() - back < 5.0 + 2.0  # registered again within ~5 s
        assert _works(c)
    finally:
        _stop(server)
        _stop(ns)
        cleanup_docker(s.docker.name_prefix)


def test_embedded_name_server_with_server_restart(tmp_path: Path, engine: None) -> None:
    cfg = make_config(tmp_path, nameserver={"embedded": "auto"})
    s = settings_mod.from_dict(cfg)
    add_users(s.db_path)
    server = _server(cfg, tmp_path)
    try:
        c = Client(s.nameserver.host, s.nameserver.port, s.server_name, token="")
        wait_for(lambda: _try_login(c), 60, 0.2)
        server.kill()  # name server and server gone together
        server.wait(10)
        with pytest.raises(ServerUnavailable):
            c.call("whoami")
        server = _server(cfg, tmp_path)
        wait_for(lambda: _works(c), 60, 0.1)  # same client object, no restart
    finally:
        _stop(server)
        cleanup_docker(s.docker.name_prefix)


def _try_login(c: Client) -> bool:
    try:
        c.login("alice", PASSWORDS["alice"], remember=False)
        return True
    except DopqError:
        return False
