"""Shared fixtures: a real Docker engine, real DoPQ servers, signed-in clients.

Servers run in-process (``dopq.server.api.Server``) on free loopback ports with their
own state directory, name server and container-name prefix, so tests never
see each other's containers. Every fixture removes what it created.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

PASSWORDS = {"root": "rootpass1", "alice": "alicepass1", "bob": "bobpass12"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(cond: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05) -> Any:
    """Poll ``cond`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


def _engine_up() -> bool:
    try:
        import docker

        with docker.APIClient(version="auto", timeout=5) as api:
            api.ping()
        return True
    except Exception:  # noqa: BLE001
        return False


@pytest.fixture(scope="session")
def engine() -> None:
    if not _engine_up():
        pytest.fail("no Docker engine: run scripts/engine.sh (the test command does)")
    subprocess.run(["bash", str(ROOT / "scripts" / "base-image.sh")], check=True)


def cleanup_docker(prefix: str) -> None:
    import docker

    with docker.APIClient(version="auto", timeout=30) as api:
        for c in api.containers(all=True, filters={"label": f"dopq.instance={prefix}"}):
            try:
                api.remove_container(c["Id"], force=True)
            except docker.errors.APIError:
                pass
        for img in api.images(filters={"label": f"dopq.instance={prefix}"}):
            try:
                api.remove_image(img["Id"], force=True)
            except docker.errors.APIError:
                pass


@functools.cache
def shared_tls() -> tuple[str, str, str]:
    """One certificate, key and fingerprint for the test servers of this process.

    Servers made by ``make_config`` present it and the autouse fixture below
    pins it (``DOPQ_FINGERPRINT``), so every client of the suite verifies
    the server it talks to. Tests of TLS itself make servers with their own.
    """
    from dopq.wire import tls

    folder = Path(tempfile.mkdtemp(prefix="dopq-test-tls-"))
    atexit.register(shutil.rmtree, folder, True)
    cert, key = folder / "cert.pem", folder / "key.pem"
    tls.make_self_signed(cert, key, "tests")
    return str(cert), str(key), tls.file_fingerprint(cert)


@pytest.fixture(autouse=True)
def _pin_test_servers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOPQ_FINGERPRINT", shared_tls()[2])


# Every container prefix a test server of this session was given (``make_config``).
PREFIXES: set[str] = set()


@pytest.fixture(scope="session", autouse=True)
def no_images_left() -> Iterator[None]:
    """A build the engine finishes after its server stopped (the Provider gone while
    the engine commits) tags its image after the test's ``cleanup_docker``: sweep
    every prefix of the session once more at its end. A build cut off by a kill -9
    (test_recovery) leaves its last step's image untagged and unlabelled: the
    dangling images the session made on the test base image go too."""
    before = _dangling() if _engine_up() else set()
    yield
    if _engine_up():
        for prefix in sorted(PREFIXES):
            cleanup_docker(prefix)
        _remove_dangling_from_base(_dangling() - before)


def _dangling() -> set[str]:
    import docker

    with docker.APIClient(version="auto", timeout=30) as api:
        return {img["Id"] for img in api.images(filters={"dangling": True})}


def _remove_dangling_from_base(ids: set[str], base: str = "dopq/busybox:latest") -> None:
    """Remove those of ``ids`` whose parents lead to ``base`` (built from it here)."""
    import docker

    with docker.APIClient(version="auto", timeout=30) as api:
        try:
            base_id = api.inspect_image(base)["Id"]
        except docker.errors.APIError:
            return
        for image in ids:
            parent, steps = image, 0
            while parent and parent != base_id and steps < 64:
                try:
                    parent = api.inspect_image(parent).get("Parent") or ""
                except docker.errors.APIError:
                    parent = ""
                steps += 1
            if parent == base_id:
                try:
                    api.remove_image(image, force=False)
                except docker.errors.APIError:
                    pass


def make_config(tmp: Path, **sections: Any) -> dict[str, Any]:
    prefix = "dopqt" + uuid.uuid4().hex[:8]
    cert, key, _fp = shared_tls()
    cfg: dict[str, Any] = {
        "state_dir": str(tmp / "state"),
        "server": {"name": prefix, "host": "127.0.0.1", "tls_cert": cert, "tls_key": key},
        "nameserver": {"host": "127.0.0.1", "port": free_port(), "embedded": "yes"},
        "gpus": {"backend": "virtual", "virtual_count": 2},
        "docker": {"name_prefix": prefix, "stop_grace": 2.0},
        "intake": {"poll_interval": 0.1, "settle_seconds": 0.5},
        "limits": {"default_memory": "256m", "max_unpacked": "16m", "max_entries": 20,
                   "default_cpus": 1.0},
        "users": {"uid_map": {"alice": os.getuid(), "bob": os.getuid()}},
        "build": {"network": False},  # builds here install nothing
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    PREFIXES.add(str((cfg.get("docker") or {}).get("name_prefix", prefix)))
    return cfg


def write_toml(cfg: dict[str, Any], path: Path) -> Path:
    from dopq.core import settings

    path.write_text(settings.to_toml(settings.from_dict(cfg)))
    return path


def add_users(db_path: Path) -> None:
    from dopq.server.auth import Role, Users
    from dopq.server.store import Store

    store = Store(db_path)
    users = Users(store)
    for name, pw in PASSWORDS.items():
        if users.get(name) is None:
            users.add(name, pw, Role.ADMIN if name == "root" else Role.USER)
    store.close()


class Running:
    """A started in-process server with signed-in clients for root, alice and bob."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        from dopq.core import settings
        from dopq.server.api import Server

        self.cfg = cfg
        self.settings = settings.from_dict(cfg)
        add_users(self.settings.db_path)
        self.server = Server(self.settings)
        self.server.start()
        self.fingerprint: str = self.server.fingerprint  # what clients pin
        self.clients: dict[str, Any] = {}
        self.stopped = False

    def client(self, user: str | None = None) -> Any:
        from dopq.client.remote import Client

        ns = self.settings.nameserver
        c = Client(ns.host, ns.port, self.settings.server_name, token="",
                   fingerprint=self.fingerprint)
        if user is not None:
            c.login(user, PASSWORDS[user], remember=False)
        return c

    def __getitem__(self, user: str) -> Any:
        if user not in self.clients:
            self.clients[user] = self.client(user)
        return self.clients[user]

    def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            try:
                self.server.stop()
            finally:
                release_outputs(self.settings)

    def wait_job(self, job_id: int, timeout: float = 60.0) -> dict[str, Any]:
        def final() -> Any:
            job = self["root"].call("job", job_id)
            return job if job["state"] in ("succeeded", "failed", "cancelled") else None

        return wait_for(final, timeout, 0.1)


@pytest.fixture
def server_factory(tmp_path: Path, engine: None) -> Iterator[Callable[..., Running]]:
    started: list[Running] = []

    def start(**sections: Any) -> Running:
        run = Running(make_config(tmp_path / f"s{len(started)}", **sections))
        started.append(run)
        return run

    yield start
    for run in started:
        try:
            run.stop()
        finally:
            cleanup_docker(run.settings.docker.name_prefix)


def release_outputs(settings: Any) -> None:
    """Undo the nosuid outputs mount a server kept for jobs it left running."""
    from dopq.server.hostfs import OutputMount

    OutputMount(settings).unmount(force=True)


@pytest.fixture(scope="session", autouse=True)
def no_mounts_left(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Servers killed with -9 leave their outputs mounted: undo that under this
    session's temp folder, or pytest cannot remove it later."""
    yield
    from dopq.server.hostfs import unmount_all_under

    unmount_all_under(tmp_path_factory.getbasetemp())


@pytest.fixture
def server(server_factory: Callable[..., Running]) -> Running:
    return server_factory()


@pytest.fixture
def jobs_dir(tmp_path: Path) -> Path:
    d = tmp_path / "jobs"
    d.mkdir()
    return d


# -- the CLI in tests --------------------------------------------------------------------
def run_cli(capsys: Any, *argv: str) -> tuple[int, str, str]:
    """``dopq ARGV`` in this process: (exit code, stdout, stderr)."""
    from dopq import cli

    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def cli_login(server: Running, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
              user: str = "alice") -> None:
    """Point the CLI at ``server`` with a config folder of its own, and sign in as
    ``user`` the way a person does (``dopq login --password-stdin``)."""
    import io

    from dopq import cli

    monkeypatch.setenv("DOPQ_NS_PORT", str(server.settings.nameserver.port))
    monkeypatch.setenv("DOPQ_SERVER", server.settings.server_name)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("DOPQ_TOKEN", raising=False)
    monkeypatch.setattr("sys.stdin", io.StringIO(PASSWORDS[user] + "\n"))
    assert cli.main(["login", "--user", user, "--password-stdin"]) == 0


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``slurm_long`` tests (faults on the Slurm test cluster) run with
    ``DOPQ_SLURM_FULL=1`` (``make test-slurm``); the test command runs the rest."""
    if os.environ.get("DOPQ_SLURM_FULL") == "1":
        return
    skip = pytest.mark.skip(reason="the long Slurm suite: make test-slurm")
    for item in items:
        if "slurm_long" in item.keywords:
            item.add_marker(skip)
