"""The API over TLS: the server's certificate, its fingerprint, pinning in the CLI."""

from __future__ import annotations

import builtins
import io
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import PASSWORDS, Running, add_users, make_config, wait_for, write_toml

from dopq import cli
from dopq.core import settings as settings_mod
from dopq.core.errors import DopqError
from dopq.wire import tls


def _openssl_cert(tmp: Path) -> tuple[Path, Path]:
    """A pair made as SECURITY.md shows an admin making one."""
    tmp.mkdir(parents=True, exist_ok=True)
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
         "-out", str(cert), "-days", "2", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True,
    )
    return cert, key


def _openssl_fingerprint(cert: Path) -> str:
    out = subprocess.run(["openssl", "x509", "-in", str(cert), "-noout", "-fingerprint",
                          "-sha256"], check=True, capture_output=True, text=True).stdout
    return out.strip()  # "sha256 Fingerprint=AB:CD:..."


def test_admin_certificate_and_pinning_in_the_cli(tmp_path: Path, engine: None) -> None:
    cert, key = _openssl_cert(tmp_path / "pair")
    cfg = make_config(tmp_path, server={"tls_cert": str(cert), "tls_key": str(key)})
    settings = settings_mod.from_dict(cfg)
    add_users(settings.db_path)
    config = write_toml(cfg, tmp_path / "config.toml")
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if k != "DOPQ_FINGERPRINT"}
    env.update(DOPQ_NS_PORT=str(settings.nameserver.port), DOPQ_SERVER=settings.server_name,
               XDG_CONFIG_HOME=str(home))

    def dopq(*args: str, stdin: str = "", extra: dict[str, str] | None = None
             ) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "dopq.cli", *args], input=stdin,
                              capture_output=True, text=True, env={**env, **(extra or {})},
                              timeout=60)

    printed = dopq("server", "fingerprint", "--config", str(config))
    assert printed.returncode == 0, printed.stderr
    fingerprint = printed.stdout.strip()
    # the same certificate as openssl sees it, in either spelling
    assert tls.parse_fingerprint(_openssl_fingerprint(cert)) == fingerprint
    log = (tmp_path / "server.log").open("wb")
    server = subprocess.Popen([sys.executable, "-m", "dopq.cli", "server", "--config",
                               str(config)], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        wait_for(lambda: b"ready at" in (tmp_path / "server.log").read_bytes(), 60, 0.2)
        assert fingerprint.encode() in (tmp_path / "server.log").read_bytes()
        # not a terminal, nothing pinned, no --fingerprint: refused, nothing sent or kept
        blind = dopq("login", "--user", "alice", "--password-stdin",
                     stdin=PASSWORDS["alice"] + "\n")
        assert blind.returncode == 1 and blind.stderr.count("\n") == 1, blind.stderr
        assert "not known here" in blind.stderr and "--fingerprint" in blind.stderr
        assert not (home / "dopq" / "tokens.json").exists()
        bad = dopq("login", "--fingerprint", "SHA256:nonsense", "--password-stdin",
                   stdin="x\n")
        assert bad.returncode == 1 and "not a SHA-256 fingerprint" in bad.stderr
        ok = dopq("login", "--user", "alice", "--password-stdin", "--fingerprint", fingerprint,
                  stdin=PASSWORDS["alice"] + "\n")
        assert ok.returncode == 0, ok.stderr
        pins = home / "dopq" / "known_servers.json"
        assert stat.S_IMODE(pins.stat().st_mode) == 0o600
        assert fingerprint in pins.read_text()
        status = dopq("status", "--json")  # the pin from the login is used
        assert status.returncode == 0 and '"name"' in status.stdout, status.stderr
        # another certificate's fingerprint: the server's identity does not match
        other = tls.file_fingerprint(_openssl_cert(tmp_path / "other")[0])
        wrong = dopq("status", extra={"DOPQ_FINGERPRINT": other})
        assert wrong.returncode == 1 and wrong.stderr.count("\n") == 1
        assert "server identity changed" in wrong.stderr
    finally:
        server.terminate()
        server.wait(30)
        log.close()


def test_server_makes_its_certificate_once(server_factory: Any, tmp_path: Path) -> None:
    run: Running = server_factory(server={"tls_cert": "", "tls_key": ""})
    folder = run.settings.state_path / "tls"
    key = folder / tls.KEY_NAME
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert run.fingerprint == tls.file_fingerprint(folder / tls.CERT_NAME)
    assert run.fingerprint != tls.file_fingerprint(Path(make_config(tmp_path)["server"]
                                                        ["tls_cert"]))
    assert run.client("alice").call("whoami")["user"] == "alice"
    config = write_toml(run.cfg, tmp_path / "config.toml")
    out = io.StringIO()
    sys_stdout, sys.stdout = sys.stdout, out
    try:
        assert cli.main(["server", "fingerprint", "--config", str(config)]) == 0
    finally:
        sys.stdout = sys_stdout
    assert out.getvalue().strip() == run.fingerprint
    run.stop()
    again = Running(run.cfg)  # a restart keeps the certificate and so the pins
    try:
        assert again.fingerprint == run.fingerprint
    finally:
        again.stop()


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_first_login_on_a_terminal_asks_like_ssh(
    server: Running, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ns = server.settings.nameserver
    monkeypatch.delenv("DOPQ_FINGERPRINT")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DOPQ_NS_PORT", str(ns.port))
    monkeypatch.setenv("DOPQ_SERVER", server.settings.server_name)
    monkeypatch.setattr("getpass.getpass", lambda prompt="": PASSWORDS["alice"])
    monkeypatch.setattr(sys, "stdin", _Tty())
    answers = iter(["no", "yes"])
    monkeypatch.setattr(builtins, "input", lambda prompt="": next(answers))
    assert cli.main(["login", "--user", "alice"]) == 1
    first = capsys.readouterr()
    assert server.fingerprint in first.out and "not accepted" in first.err
    assert not (tmp_path / "home" / "dopq" / "known_servers.json").exists()
    assert cli.main(["login", "--user", "alice"]) == 0
    assert server.fingerprint in (tmp_path / "home" / "dopq" / "known_servers.json").read_text()
    capsys.readouterr()
    assert cli.main(["whoami"]) == 0  # no question the second time
    assert capsys.readouterr().out.startswith("alice")


def test_fingerprint_spellings() -> None:
    fp = tls.fingerprint(b"certificate")
    hexed = ":".join(f"{b:02X}" for b in bytes.fromhex(
        __import__("hashlib").sha256(b"certificate").hexdigest()))
    assert tls.parse_fingerprint(fp) == fp
    assert tls.parse_fingerprint(f"sha256 Fingerprint={hexed}") == fp
    assert tls.parse_fingerprint(hexed.replace(":", "").lower()) == fp
    for bad in ("", "SHA256:", "SHA256:abc", "MD5:" + "a" * 32, "x" * 200):
        with pytest.raises(DopqError, match="not a SHA-256 fingerprint") as err:
            tls.parse_fingerprint(bad)
        assert "\n" not in str(err.value)


def test_tls_settings_are_checked(tmp_path: Path) -> None:
    from dopq.core.errors import ConfigError

    with pytest.raises(ConfigError, match="server.tls_cert"):
        settings_mod.from_dict({"server": {"tls_cert": str(tmp_path / "nope.pem"),
                                           "tls_key": str(tmp_path / "nope.key")}})
    with pytest.raises(ConfigError, match="server.handshake_timeout"):
        settings_mod.from_dict({"server": {"handshake_timeout": 0}})


def test_fingerprint_command_errors_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "file").write_text("")
    bad = tmp_path / "bad.toml"
    bad.write_text(f'state_dir = "{tmp_path / "file" / "state"}"\n')
    assert cli.main(["server", "fingerprint", "--config", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot make the server's TLS certificate" in err
    broken = tmp_path / "broken.pem"
    broken.write_text("not a certificate")
    with pytest.raises(DopqError, match="no PEM certificate"):
        tls.file_fingerprint(broken)


def test_both_ends_send_without_waiting_for_acks(server: Any) -> None:
    """TCP_NODELAY on the client's and the server's end of an API connection:
    without it, each TLS record after a call's first waited for the other
    side's delayed ACK (a 32 KiB call took 44 ms, an upload ran at 80 MB/s)."""
    client = server.client("alice")
    client.call("whoami")
    mine = client._local.proxy._pyroConnection.sock
    assert mine.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    theirs = [s.sock for s in server.server.daemon.transportServer.slots._slots]
    assert theirs and all(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
                          for s in theirs)
