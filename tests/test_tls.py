"""Pyro5 over TLS: a self-signed pair as the README makes it, verified by the client."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import PASSWORDS, add_users, make_config, wait_for, write_toml

from dopq import settings as settings_mod


def _cert(tmp: Path) -> tuple[Path, Path]:
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
         "-out", str(cert), "-days", "2", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True,
    )
    return cert, key


def test_tls_server_and_client(tmp_path: Path) -> None:
    cert, key = _cert(tmp_path)
    cfg = make_config(tmp_path, server={"tls_cert": str(cert), "tls_key": str(key)})
    settings = settings_mod.from_dict(cfg)
    add_users(settings.db_path)
    config = write_toml(cfg, tmp_path / "config.toml")
    log = (tmp_path / "server.log").open("wb")
    server = subprocess.Popen([sys.executable, "-m", "dopq.cli", "server", "--config",
                               str(config)], stdout=log, stderr=subprocess.STDOUT)
    env = {**os.environ, "DOPQ_NS_PORT": str(settings.nameserver.port),
           "DOPQ_SERVER": settings.server_name, "XDG_CONFIG_HOME": str(tmp_path / "home")}

    def dopq(*args: str, stdin: str = "", extra: dict[str, str] | None = None
             ) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "dopq.cli", *args], input=stdin,
                              capture_output=True, text=True, env={**env, **(extra or {})},
                              timeout=60)

    try:
        wait_for(lambda: b"ready at" in (tmp_path / "server.log").read_bytes(), 60, 0.2)
        ok = dopq("login", "--user", "alice", "--password-stdin", "--tls-ca", str(cert),
                  stdin=PASSWORDS["alice"] + "\n")
        assert ok.returncode == 0, ok.stderr
        status = dopq("status", "--json", extra={"DOPQ_TLS_CA": str(cert)})
        assert status.returncode == 0 and '"name"' in status.stdout
        # A client that does not speak TLS gets a one-line error, not a traceback.
        plain = dopq("status")
        assert plain.returncode == 1 and plain.stderr.count("\n") == 1
        (tmp_path / "other").mkdir()
        other, _ = _cert(tmp_path / "other")
        wrong = dopq("status", extra={"DOPQ_TLS_CA": str(other)})
        assert wrong.returncode == 1 and wrong.stderr.count("\n") == 1
    finally:
        server.terminate()
        server.wait(30)
        log.close()


def test_tls_settings_are_checked(tmp_path: Path) -> None:
    from dopq.errors import ConfigError

    with pytest.raises(ConfigError, match="server.tls_cert"):
        settings_mod.from_dict({"server": {"tls_cert": str(tmp_path / "nope.pem"),
                                           "tls_key": str(tmp_path / "nope.key")}})
