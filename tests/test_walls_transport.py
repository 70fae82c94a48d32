"""Issue 10, walls 4-6, as the attacks: a hijacked name, memory bombs, slow connections.

Every attack is sent raw over loopback to a real server running in this
process; the server must close the attacker and go on answering others.
"""

from __future__ import annotations

import contextlib
import marshal
import socket
import ssl
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from conftest import PASSWORDS, Running, wait_for
from Pyro5 import protocol

from dopq.client.remote import Client, save_pin
from dopq.core.errors import ServerIdentityChanged
from dopq.wire import tls
from dopq.wire.transport import ANON_ITEMS, ANON_MAX, SIGNED_MAX, Refused, Slots, check_msgpack

pytestmark = pytest.mark.docker
SERPENT, MARSHAL, JSON, MSGPACK = 1, 2, 3, 4


# -- helpers -----------------------------------------------------------------------------------
def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _header(msgtype: int, ser: int, data_size: int, ann_size: int = 0, flags: int = 0) -> bytes:
    return struct.pack(protocol._header_format, b"PYRO", protocol.PROTOCOL_VERSION, msgtype,
                       ser, flags, 0, data_size, ann_size, b"\0" * 16, 0, 0x4DC5)


def _api(run: Running) -> tuple[str, int]:
    uri = run.server.uri
    return uri.host, uri.port


def _tls(addr: tuple[str, int]) -> ssl.SSLSocket:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    raw = socket.create_connection(addr, timeout=10)
    try:
        return ctx.wrap_socket(raw)
    except BaseException:
        raw.close()
        raise


def _closed_without_answer(sock: socket.socket, within: float = 15.0) -> bool:
    """True when the server closes the connection (and sent nothing) within ``within``."""
    sock.settimeout(within)
    try:
        return sock.recv(1 << 16) == b""
    except (ConnectionError, ssl.SSLError):
        return True
    except TimeoutError:
        return False
    finally:
        sock.close()


def _answered_within(client: Client, seconds: float = 1.0) -> float:
    t0 = time.monotonic()
    assert client.call("ping")["name"]
    assert client.call("whoami")["user"]
    took = time.monotonic() - t0
    assert took < seconds, f"another client waited {took:.2f} s"
    return took


def _connected(addr: tuple[str, int], token: str = "") -> ssl.SSLSocket:
    """A raw connection past TLS and Pyro's CONNECT, as a client would have it."""
    sock = _tls(addr)
    body = msgpack.packb({"handshake": "hello", "object": "x"})
    ann = b"TOKN" + struct.pack("!I", len(token)) + token.encode() if token else b""
    sock.sendall(_header(protocol.MSG_CONNECT, MSGPACK, len(body), len(ann)) + ann + body)
    head = sock.recv(protocol._header_size)
    assert head[:4] == b"PYRO"
    size = sum(struct.unpack("!II", head[12:20]))
    while size > 0:
        size -= len(sock.recv(size))
    return sock


def _invoke(addr: tuple[str, int], body: bytes, token: str = "", declared: int | None = None,
            ser: int = MSGPACK, flags: int = 0) -> ssl.SSLSocket:
    sock = _connected(addr, token)
    ann = b"TOKN" + struct.pack("!I", len(token)) + token.encode() if token else b""
    size = len(body) if declared is None else declared
    with contextlib.suppress(OSError):  # the server may close before all is sent
        sock.sendall(_header(protocol.MSG_INVOKE, ser, size, len(ann), flags) + ann)
        sock.sendall(body)
    return sock


# -- 4. the name server hijacked ---------------------------------------------------------------
class Impostor:
    """A TLS server of its own that records every byte a client sends it."""

    def __init__(self, tmp: Path) -> None:
        tls.make_self_signed(tmp / "evil.pem", tmp / "evil.key", "evil")
        self.ctx = tls.server_context(tmp / "evil.pem", tmp / "evil.key")
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.received = bytearray()
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                raw, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._one, args=(raw,), daemon=True).start()

    def _one(self, raw: socket.socket) -> None:
        raw.settimeout(5)
        with raw, contextlib.suppress(OSError), \
                self.ctx.wrap_socket(raw, server_side=True) as s:
            while chunk := s.recv(1 << 16):
                self.received += chunk

    def close(self) -> None:
        self.sock.close()


def _hijack(run: Running, port: int) -> None:
    """Stop the server re-registering itself, then point its name at ``port``."""
    import Pyro5.api

    run.server.stop_event.set()
    assert run.server.registrar is not None
    run.server.registrar.join(10)
    ns = Pyro5.api.locate_ns(run.settings.nameserver.host, run.settings.nameserver.port)
    with ns:
        ns.register(run.settings.object_name, f"PYRO:{run.settings.object_name}@127.0.0.1:{port}")


def test_a_hijacked_name_gets_nothing(server: Running, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("DOPQ_FINGERPRINT")
    save_pin(server.settings.server_name, server.fingerprint)
    signed_in = server.client("alice")  # holds a token from before the hijack
    signed_in.close()
    impostor = Impostor(tmp_path)
    try:
        _hijack(server, impostor.port)
        ns = server.settings.nameserver
        fresh = Client(ns.host, ns.port, server.settings.server_name, token="")
        with pytest.raises(ServerIdentityChanged) as err:
            fresh.login("alice", PASSWORDS["alice"])
        assert "server identity changed" in str(err.value) and "\n" not in str(err.value)
        with pytest.raises(ServerIdentityChanged):
            signed_in.call("whoami")
        with pytest.raises(ServerIdentityChanged):  # a write is not sent either
            signed_in.call("cancel", 1)
        assert impostor.connections >= 1  # it was asked for its certificate, and that only
        time.sleep(0.2)  # let the impostor's reader threads record what came
        assert bytes(impostor.received) == b""
    finally:
        impostor.close()


class Relay:
    """A TCP relay in front of the real server that keeps what passes through it."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.seen = bytearray()
        self.open: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                a, _ = self.sock.accept()
            except OSError:
                return
            b = socket.create_connection(self.target)
            self.open += [a, b]
            for src, dst in ((a, b), (b, a)):
                threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while chunk := src.recv(1 << 16):
                self.seen += chunk
                dst.sendall(chunk)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.sock.close()
        for s in self.open:
            s.close()


def test_a_relay_sees_no_password_or_token(server: Running, tmp_path: Path) -> None:
    relay = Relay(_api(server))
    try:
        _hijack(server, relay.port)
        ns = server.settings.nameserver
        c = Client(ns.host, ns.port, server.settings.server_name, token="",
                   fingerprint=server.fingerprint)
        token = c.login("alice", PASSWORDS["alice"], remember=False)["token"]
        assert c.call("whoami")["user"] == "alice"  # the real server, through the relay
        c.close()
        assert relay.seen and PASSWORDS["alice"].encode() not in relay.seen
        assert token.encode() not in relay.seen and b"PYRO" not in relay.seen
    finally:
        relay.close()


# -- 5. memory bombs ----------------------------------------------------------------------------
def _bombs(token: str) -> dict[str, Callable[[tuple[str, int]], socket.socket]]:
    def raw(data: bytes) -> Callable[[tuple[str, int]], socket.socket]:
        def send(addr: tuple[str, int]) -> socket.socket:
            sock = _tls(addr)
            with contextlib.suppress(OSError):  # the server may close before all is sent
                sock.sendall(data)
            return sock
        return send

    huge_tuple = b"(" + struct.pack("<i", 150_000_000) + b"N"  # marshal: a tuple of 150M
    empties = b"\xdd" + struct.pack(">I", 1_000_000) + b"\x90" * 1_000_000
    anon_empties = b"\xdd" + struct.pack(">I", ANON_MAX - 16) + b"\x90" * (ANON_MAX - 16)
    signed_empties = b"\xdd" + struct.pack(">I", SIGNED_MAX - 16) + b"\x90" * (SIGNED_MAX - 16)
    serpent_bomb = b"# serpent utf-8 python3.2\n(" + b"[]," * 20_000 + b")"
    zbomb = zlib.compress(msgpack.packb(["x" * (64 << 20)]))
    return {
        "marshal handshake, 46 bytes": raw(
            _header(protocol.MSG_CONNECT, MARSHAL, len(huge_tuple)) + huge_tuple),
        "serpent handshake": raw(
            _header(protocol.MSG_CONNECT, SERPENT, len(serpent_bomb)) + serpent_bomb),
        "json handshake": raw(_header(protocol.MSG_CONNECT, JSON, 2) + b"[]"),
        "huge declared size": raw(_header(protocol.MSG_CONNECT, MSGPACK, 0xFFFF_FFF0)),
        "huge annotations": raw(_header(protocol.MSG_CONNECT, MSGPACK, 10, 0xFFFF_0000)),
        "a million empty arrays": raw(
            _header(protocol.MSG_CONNECT, MSGPACK, len(empties)) + empties),
        "anonymous empty arrays": lambda a: _invoke(a, anon_empties),
        "signed-in empty arrays": lambda a: _invoke(a, signed_empties, token),
        "deep nesting": lambda a: _invoke(a, b"\x91" * 5000 + b"\xc0"),
        "chunk size without a token": lambda a: _invoke(a, b"\xc6" + struct.pack(
            ">I", ANON_MAX * 2) + b"x" * ANON_MAX * 2),
        "marshal call": lambda a: _invoke(a, marshal.dumps((1, "ping", (), {})), ser=MARSHAL),
        "compressed (zip bomb)": lambda a: _invoke(a, zbomb, token,
                                                   flags=protocol.FLAGS_COMPRESSED),
        "one-way call": lambda a: _invoke(a, msgpack.packb(["x", "ping", [], {}]),
                                          flags=protocol.FLAGS_ONEWAY),
        "blob call": lambda a: _invoke(a, b"\xc0", flags=protocol.FLAGS_KEEPSERIALIZED),
        "extension type": lambda a: _invoke(a, b"\xd4\x31\x01"),
    }


def test_memory_bombs_are_refused_before_decoding(server: Running) -> None:
    token = server["alice"].call("whoami") and server["alice"].token
    other = server.client("bob")
    bombs = _bombs(token)
    before = _rss()
    latencies: list[float] = []
    for name, bomb in bombs.items():
        socks = [bomb(_api(server)) for _ in range(8)]  # eight at a time
        latencies.append(_answered_within(other))
        for sock in socks:
            assert _closed_without_answer(sock), name
    grown = _rss() - before
    assert grown < 200 * 2**20, f"the server grew by {grown >> 20} MiB"
    print(f"\nmemory bombs: RSS grew by {grown / 2**20:.1f} MiB; the other client's "
          f"ping+whoami took at most {max(latencies) * 1000:.0f} ms")
    assert other.call("whoami")["user"] == "bob"


def test_the_name_server_refuses_bombs_too(server: Running) -> None:
    ns = (server.settings.nameserver.host, server.settings.nameserver.port)
    huge_tuple = b"(" + struct.pack("<i", 150_000_000) + b"N"
    before = _rss()
    for _ in range(8):
        sock = socket.create_connection(ns, timeout=10)
        sock.sendall(_header(protocol.MSG_CONNECT, MARSHAL, len(huge_tuple)) + huge_tuple)
        assert _closed_without_answer(sock)
    assert _rss() - before < 200 * 2**20
    assert server.client("bob").call("whoami")["user"] == "bob"  # the name server still works


def test_calls_that_are_too_large_get_a_clear_error(server: Running) -> None:
    from dopq.core.errors import LimitExceeded

    with pytest.raises(LimitExceeded) as err:
        server["alice"].call("submit_chunk", "x", b"y" * SIGNED_MAX)
    assert "\n" not in str(err.value)
    assert server["alice"].call("whoami")["user"] == "alice"


def test_the_body_walk() -> None:
    ok = msgpack.packb([1, "call", [{"a": [1, 2, b"x" * 1000]}], {"k": None, "f": 1.5}])
    check_msgpack(ok, 100)
    for bad in (b"\xdd\xff\xff\xff\xff", b"\x91" * 40 + b"\xc0", ok + b"\xc0", ok[:-1],
                b"\xc6\x00\x10\x00\x00", b"\xd4\x00\x00", b"\xc1"):
        with pytest.raises(Refused):
            check_msgpack(bad, ANON_ITEMS)
    with pytest.raises(Refused):
        check_msgpack(msgpack.packb([[]] * 101), 100)


# -- 6. slow connections -------------------------------------------------------------------------
@contextlib.contextmanager
def _tricklers(addr: tuple[str, int], n: int, tls_first: bool = False
               ) -> Iterator[list[socket.socket]]:
    """``n`` connections that send one byte every 4 s (after TLS when ``tls_first``)."""
    socks: list[socket.socket] = []
    for _ in range(n):
        socks.append(_tls(addr) if tls_first else socket.create_connection(addr, timeout=10))
    stop = threading.Event()
    byte = b"P" if tls_first else b"\x16"

    def trickle() -> None:
        while not stop.is_set():
            for s in socks:
                with contextlib.suppress(OSError):
                    s.send(byte)
            stop.wait(4.0)

    t = threading.Thread(target=trickle, daemon=True)
    t.start()
    try:
        yield socks
    finally:
        stop.set()
        t.join(10)
        for s in socks:
            s.close()


def _all_closed(socks: list[socket.socket], within: float) -> bool:
    deadline = time.monotonic() + within
    for s in socks:
        if not _closed_without_answer(s, max(0.1, deadline - time.monotonic())):
            return False
    return True


@pytest.mark.parametrize("tls_first", [False, True], ids=["in-tls", "after-tls"])
def test_trickling_connections_do_not_hold_the_api(server: Running, tls_first: bool) -> None:
    other = server.client("bob")
    transport = server.server.daemon.transportServer
    with _tricklers(_api(server), 260, tls_first) as socks:
        took = [_answered_within(server.client("alice")) for _ in range(3)]
        took.append(_answered_within(other))
        assert len(transport.slots) <= server.settings.server.max_connections
        # closed once the handshake timeout (2 s) has passed, all of them
        assert _all_closed(socks, 15.0)
    print(f"\n260 tricklers ({'after' if tls_first else 'in'} TLS): another client's "
          f"ping+whoami took at most {max(took) * 1000:.0f} ms")


def test_silent_connections_never_block_accepting(server: Running) -> None:
    silent = [socket.create_connection(_api(server)) for _ in range(20)]
    try:
        _answered_within(server.client("alice"))
    finally:
        for s in silent:
            s.close()


def test_a_signed_in_trickler_is_closed_too(server_factory: Any) -> None:
    run = server_factory(server={"idle_timeout": 2.0})
    token = run["alice"].token
    with _connected(_api(run), token) as sock:
        sock.sendall(_header(protocol.MSG_INVOKE, MSGPACK, 100, 0))  # and the rest never
        assert wait_for(lambda: _sends_fail(sock), 20, 0.5)
    _answered_within(run.client("bob"))


def _sends_fail(sock: socket.socket) -> bool:
    try:
        sock.send(b"x")
        sock.settimeout(0.01)
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except (OSError, ssl.SSLError):
        return True


def test_slots_give_way_to_new_connections() -> None:
    slots = Slots(per_address=2, total=3)
    a, _ = slots.admit("a", None, 1.0)
    b, _ = slots.admit("a", None, 2.0)
    assert a is not None and b is not None
    a.signed = True
    c, victims = slots.admit("a", None, 3.0)  # the unsigned one gives way
    assert c is not None and victims == [b]
    c.signed = True
    d, victims = slots.admit("a", None, 4.0)  # both signed in: refused
    assert d is None and victims == []
    e, _ = slots.admit("b", None, 5.0)
    f, victims = slots.admit("c", None, 6.0)  # in total: the oldest unsigned gives way
    assert f is not None and victims == [e] and len(slots) == 3
