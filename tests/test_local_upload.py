"""The local upload socket (``dopq.server.localupload``), used and attacked.

A client on the server's host sends an upload's bytes through
``<state>/local/upload.sock``; everything around them (sign-in, the verdicts,
the job) stays the API's. The attacks come from any local account: the socket
is 0666, so its only key is the upload id.
"""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import Running, wait_for
from hostile import good_job, zip_it

from dopq.client import localsend
from dopq.core.errors import Conflict, NotFound
from dopq.server.localupload import MAX_CONNECTIONS, LocalUploads
from dopq.wire.localsocket import address, request

docker = pytest.mark.docker


def raw(path: str, data: bytes, *, shut: bool = True, timeout: float = 10.0) -> str:
    """What the server answers to ``data`` sent as is."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(timeout)
        with address(path) as where:
            conn.connect(where)
        conn.sendall(data)
        if shut:
            conn.shutdown(socket.SHUT_WR)
        return localsend._line(conn)


class Spy:
    """Counts the calls of one method of an object (and keeps their arguments)."""

    def __init__(self, obj: Any, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        self.args: list[tuple[Any, ...]] = []
        real = getattr(obj, name)

        def spy(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            self.args.append(args)
            return real(*args, **kwargs)

        monkeypatch.setattr(obj, name, spy)


@pytest.fixture
def local(server: Running) -> str:
    path = server["alice"].call("upload_socket")
    assert path == str(server.settings.state_path / "local" / "upload.sock")
    return str(path)


def begin(server: Running, archive: Path, user: str = "alice") -> str:
    upload: str = server[user].call("submit_begin", archive.stat().st_size, {})
    return upload


def finished_and_ran(server: Running, upload: str) -> None:
    """Finish ``upload`` through the API; its job must build and succeed."""
    job = server["alice"].call("submit_finish", upload)
    assert server.wait_job(job["id"])["state"] == "succeeded"


# -- the door as users meet it ------------------------------------------------------------
@docker
def test_a_local_submit_sends_its_bytes_through_the_socket(
    server: Running, local: str, jobs_dir: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    uploads = server.server.platform.uploads
    streams, chunks = Spy(uploads, "receive", monkeypatch), Spy(uploads, "chunk", monkeypatch)
    seen: list[tuple[int, int]] = []
    job = server["alice"].submit(good_job(jobs_dir, "alice", "viasock"),
                                 progress=lambda sent, size: seen.append((sent, size)))
    assert (streams.calls, chunks.calls) == (1, 0)
    assert seen and seen[-1][0] == seen[-1][1]
    assert server.wait_job(job["id"])["state"] == "succeeded"
    # The socket: anyone may connect; its folder is root's, passed through, not listed.
    st, folder = os.lstat(local), os.lstat(os.path.dirname(local))
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o666
    assert folder.st_uid == os.geteuid() and stat.S_IMODE(folder.st_mode) == 0o711
    assert localsend.trusted_socket(local)


@docker
@pytest.mark.parametrize("how", ["client", "server"])
def test_without_the_socket_the_bytes_go_in_chunks(
    how: str, server_factory: Callable[..., Running], jobs_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if how == "client":
        monkeypatch.setenv("DOPQ_LOCAL_UPLOADS", "0")
        server = server_factory()
    else:
        server = server_factory(intake={"local_uploads": False})
        assert server["alice"].call("upload_socket") == ""
        assert not (server.settings.state_path / "local").exists()
    uploads = server.server.platform.uploads
    streams, chunks = Spy(uploads, "receive", monkeypatch), Spy(uploads, "chunk", monkeypatch)
    job = server["alice"].submit(good_job(jobs_dir, "alice", "viachunks"))
    assert streams.calls == 0 and chunks.calls >= 1
    assert server.wait_job(job["id"])["state"] == "succeeded"


# -- attacks ------------------------------------------------------------------------------
@docker
def test_bad_requests_get_one_line_and_change_nothing(
    server: Running, local: str, jobs_dir: Path,
) -> None:
    archive = zip_it(good_job(jobs_dir, "alice", "target"))
    upload = begin(server, archive)
    for data, said in [
        (request("0" * 32) + b"junk", "error no such upload"),  # a guessed id
        (b"DOPQ-UPLOAD 1 " + upload.upper().encode() + b"\n", "error bad request line"),
        (b"\x00\xff" * 40 + b"\n", "error bad request line"),
        (b"A" * 4096, "error request line too long"),
        (b"DOPQ-UPLOAD 1 " + upload.encode(), "error closed before the request line"),
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "error bad request line"),
    ]:
        answer = raw(local, data)
        assert answer.startswith(said) and "\n" not in answer, (data[:40], answer)
    # Nothing stuck to the upload: it still takes its bytes, and becomes a job.
    with archive.open("rb") as fh:
        assert localsend.send(local, upload, fh, archive.stat().st_size)
    finished_and_ran(server, upload)


@docker
def test_a_silent_connection_is_closed_after_the_handshake_time(
    server: Running, local: str,
) -> None:
    t = time.monotonic()
    answer = raw(local, b"", shut=False)
    assert answer == "error no request line in time"
    assert time.monotonic() - t < server.settings.server.handshake_timeout + 2


@docker
def test_more_bytes_than_announced_discard_the_upload(
    server: Running, local: str, jobs_dir: Path,
) -> None:
    archive = zip_it(good_job(jobs_dir, "alice", "toolong"))
    upload = begin(server, archive)
    answer = raw(local, request(upload) + archive.read_bytes() + b"x" * 5000)
    assert answer == "error upload is larger than announced; discarded"
    with pytest.raises(NotFound):
        server["alice"].call("submit_finish", upload)
    assert not list((server.settings.state_path / "uploads").iterdir())


@docker
def test_a_cut_stream_leaves_the_upload_empty_for_chunks(
    server: Running, local: str, jobs_dir: Path,
) -> None:
    archive = zip_it(good_job(jobs_dir, "alice", "cut"))
    data = archive.read_bytes()
    upload = begin(server, archive)
    answer = raw(local, request(upload) + data[:100])
    assert answer == f"error stream ended after 100 of {len(data)} bytes"
    with pytest.raises(Conflict, match="incomplete: 0 of"):
        server["alice"].call("submit_finish", upload)
    server["alice"].call("submit_chunk", upload, data)  # the fallback the client takes
    finished_and_ran(server, upload)


@docker
def test_an_upload_takes_one_stream_and_no_chunks_beside_it(
    server: Running, local: str, jobs_dir: Path,
) -> None:
    archive = zip_it(good_job(jobs_dir, "alice", "once"))
    data = archive.read_bytes()
    upload = begin(server, archive)
    server["alice"].call("submit_chunk", upload, data[:10])
    assert raw(local, request(upload) + data) == "error upload has data already"
    server["alice"].call("submit_abort", upload)
    # While a stream is open, chunks and finish are refused.
    upload = begin(server, archive)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.connect(local)
        conn.sendall(request(upload) + data[:10])
        uploads = server.server.platform.uploads
        wait_for(lambda: uploads.pending[upload].streaming, 5)
        for call, args in [("submit_chunk", (upload, data[10:])), ("submit_finish", (upload,))]:
            with pytest.raises(Conflict, match="being sent through the local socket"):
                server["alice"].call(call, *args)
        conn.sendall(data[10:])
        conn.shutdown(socket.SHUT_WR)
        assert localsend._line(conn) == f"ok {len(data)}"
    finished_and_ran(server, upload)


@docker
def test_connections_beyond_the_slots_are_answered_busy_and_the_door_recovers(
    server: Running, local: str, jobs_dir: Path,
) -> None:
    idle = []
    try:
        for _ in range(MAX_CONNECTIONS):
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            conn.connect(local)
            idle.append(conn)
        assert raw(local, b"").startswith("error busy")
    finally:
        for conn in idle:
            conn.close()
    uploads = server.server.platform.uploads
    archive = zip_it(good_job(jobs_dir, "alice", "after"))
    upload = begin(server, archive)
    with archive.open("rb") as fh:
        assert wait_for(lambda: localsend.send(local, upload, fh, archive.stat().st_size), 10)
    assert uploads.pending[upload].received == archive.stat().st_size


@docker
def test_another_local_account_gets_nothing_without_the_id(
    server: Running, local: str, jobs_dir: Path, tmp_path: Path,
) -> None:
    """An unprivileged account can connect (0666) but not reach anyone's upload, nor
    plant a socket where the server's is: the folder is root's."""
    archive = zip_it(good_job(jobs_dir, "alice", "victim"))
    upload = begin(server, archive)
    code = (
        "import os, socket, sys\n"
        # The test's temporary folders are root's 0700: the account starts in the
        # socket's folder (as if the state folder above were 0711, as it is).
        f"fd = os.open({os.path.dirname(local)!r}, os.O_PATH | os.O_DIRECTORY)\n"
        "os.setgid(65534); os.setuid(65534)\n"
        "try:\n"
        "    os.open('planted', os.O_WRONLY | os.O_CREAT, 0o666, dir_fd=fd)\n"
        "    print('planted')\n"
        "except OSError:\n"
        "    print('no-plant')\n"
        "s = socket.socket(socket.AF_UNIX); s.connect(f'/proc/self/fd/{fd}/upload.sock')\n"
        f"s.sendall(b'DOPQ-UPLOAD 1 ' + b'{'f' * 32}' + b'\\n'); s.shutdown(socket.SHUT_WR)\n"
        "print(s.recv(200).decode().strip())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=30, check=True).stdout.split("\n")
    assert out[:2] == ["no-plant", "error no such upload (expired or finished)"], out
    assert server.server.platform.uploads.pending[upload].received == 0


def test_the_client_trusts_only_a_socket_no_one_else_could_plant(tmp_path: Path) -> None:
    def make(folder: Path, mode: int) -> str:
        folder.mkdir()
        os.chmod(folder, mode)
        path = folder / "upload.sock"
        sock = socket.socket(socket.AF_UNIX)
        with address(str(path)) as where:
            sock.bind(where)
        sock.close()
        return str(path)

    assert localsend.trusted_socket(make(tmp_path / "ok", 0o755))
    assert not localsend.trusted_socket(make(tmp_path / "open", 0o777))  # anyone could plant
    assert not localsend.trusted_socket(make(tmp_path / "group", 0o775))
    plain = tmp_path / "ok" / "plain"
    plain.write_text("x")
    assert not localsend.trusted_socket(str(plain))  # not a socket
    assert not localsend.trusted_socket("relative/upload.sock")
    assert not localsend.trusted_socket("")
    other = tmp_path / "theirs"
    other.mkdir()
    os.chown(other, 65534, 65534)
    path = other / "upload.sock"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    sock.close()
    os.chown(other, 12345, 12345)  # a folder of one user, a socket of another (root)
    assert not localsend.trusted_socket(str(path))
    for host, local in [("127.0.0.1", True), ("127.3.4.5", True), ("::1", True),
                        ("localhost", True), ("10.0.0.1", False), ("example.org", False),
                        ("192.168.1.2", False)]:
        assert localsend.is_loopback(host) is local, host


class _Uploads:
    """Takes one stream for ``upload_id``, as ``Uploads.receive`` does."""

    def __init__(self) -> None:
        self.got = b""

    def receive(self, upload_id: str, read: Callable[[memoryview], int],
                open_ended: bool = False) -> int:
        buf = memoryview(bytearray(1 << 16))
        while n := read(buf):
            self.got += bytes(buf[:n])
        return len(self.got)


def test_a_deep_state_folder_still_gets_its_socket(tmp_path: Path) -> None:
    from conftest import make_config

    from dopq.core import settings as settings_mod

    state = tmp_path.joinpath(*["deep-folder-name"] * 8)
    cfg = make_config(tmp_path)
    cfg["state_dir"] = str(state)
    s = settings_mod.from_dict(cfg)
    sink = _Uploads()
    door = LocalUploads(s, sink)  # type: ignore[arg-type]
    door.start()
    try:
        assert len(door.address) > 108 and door.address.startswith(str(state))
        data = os.urandom(300_000)
        src = tmp_path / "data"
        src.write_bytes(data)
        with src.open("rb") as fh:
            assert localsend.send(door.address, "a" * 32, fh, len(data))
        assert sink.got == data
    finally:
        door.stop()
    assert not os.path.exists(door.path)


def test_a_stopped_server_leaves_the_client_to_chunks(tmp_path: Path) -> None:
    path = tmp_path / "gone.sock"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    sock.close()  # a socket file nobody listens on
    src = tmp_path / "data"
    src.write_bytes(b"x" * 100)
    with src.open("rb") as fh:
        assert not localsend.send(str(path), "a" * 32, fh, 100)
        assert fh.tell() == 0


@docker
def test_a_cancel_that_meets_the_provider_taking_the_job_up_still_cancels(
    server: Running, jobs_dir: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Faster uploads made this race common: the cancel read 'received', the Provider
    moved the job to 'building', and the cancel's compare-and-set was refused."""
    from dopq.core.jobs import JobState

    monkeypatch.setattr(server.server.platform, "_send", lambda cmd: None)  # held in received
    job_id = server["alice"].submit(good_job(jobs_dir, "alice", "race"))["id"]
    store = server.server.platform.store
    real = store.job
    reads = []

    def job(i: int) -> Any:
        row = real(i)
        reads.append(i)
        if len(reads) == 2:  # the Provider, just after the queue's cancel read the row
            store.transition(i, JobState.BUILDING, expect=[JobState.RECEIVED])
        return row

    monkeypatch.setattr(store, "job", job)
    assert server["alice"].call("cancel", job_id)["state"] == "cancelled"
    assert len(reads) >= 3


# -- a folder zipped straight into the socket ---------------------------------------------
@docker
def test_a_folder_is_zipped_straight_into_the_socket_with_no_zip_file(
    server: Running, local: str, jobs_dir: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_temp_file(*_args: Any, **_kwargs: Any) -> Any:
        raise AssertionError("a zip file was written")

    monkeypatch.setattr("dopq.client.remote.tempfile.mkstemp", no_temp_file)
    uploads = server.server.platform.uploads
    streams = Spy(uploads, "receive", monkeypatch)
    folder = good_job(jobs_dir, "alice", "streamed")
    (folder / "weights.bin").write_bytes(os.urandom(3 * 2**20))
    job = server["alice"].submit(folder)
    assert streams.calls == 1 and streams.args[0][2] is True  # open-ended
    assert server.wait_job(job["id"])["state"] == "succeeded"


@docker
def test_an_open_ended_stream_ends_where_it_ends_within_its_bound(
    server: Running, local: str, jobs_dir: Path,
) -> None:
    data = zip_it(good_job(jobs_dir, "alice", "open")).read_bytes()
    upload = server["alice"].call("submit_begin", len(data) + 5000, {})
    assert raw(local, request(upload, open_ended=True) + data) == f"ok {len(data)}"
    finished_and_ran(server, upload)
    # The bound still holds: a byte past it discards the upload.
    upload = server["alice"].call("submit_begin", len(data) - 1, {})
    assert raw(local, request(upload, open_ended=True) + data) == \
        "error upload is larger than announced; discarded"
    # And an empty stream is no upload.
    upload = server["alice"].call("submit_begin", len(data), {})
    assert raw(local, request(upload, open_ended=True)).startswith("error stream ended after 0")


@docker
def test_a_bound_over_the_upload_limit_falls_back_to_a_zip_file(
    server_factory: Callable[..., Running], jobs_dir: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from dopq.core.context import zip_bound
    from dopq.core.dockerignore import context_files

    folder = good_job(jobs_dir, "alice", "tight")
    size = zip_it(folder, jobs_dir / "probe.zip").stat().st_size
    assert zip_bound(list(context_files(folder, {"Dockerfile"}))) > size + 100
    server = server_factory(limits={"max_upload": f"{size + 100}b"})
    streams = Spy(server.server.platform.uploads, "receive", monkeypatch)
    job = server["alice"].submit(folder)
    assert [a[2] for a in streams.args] == [False]  # the zip file, sent as it is
    assert server.wait_job(job["id"])["state"] == "succeeded"
