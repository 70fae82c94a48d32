"""The API's transport: TLS, handshake deadline, connection slots, message limits.

Pyro5's thread-pool server does the TLS handshake inside ``accept()`` (one
slow client stalls every other), and reads and decodes a message of any
declared size, in any serializer, before anyone has signed in.
``GuardedTransport`` replaces it in DoPQ's daemons (the API and the embedded
name server):

- the accept loop only accepts, counts and hands over; the TLS handshake and
  Pyro's CONNECT run in a worker and must finish within ``handshake_timeout``;
- connection slots are bounded per address and in total; when they are full,
  the oldest connection that has not presented a valid token gives way;
- every message header is checked before its body is read: msgpack only, no
  compressed, one-way, batched or blob messages, at most ``ANON_MAX`` bytes
  (``SIGNED_MAX`` when the message carries a valid token), whole within
  ``message_timeout`` once begun;
- a body is walked, not decoded, before Pyro decodes it: a bounded number of
  elements, a bounded depth, no extension types.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from Pyro5 import config, errors, protocol, socketutil
from Pyro5.nameserver import NameServerDaemon
from Pyro5.server import Daemon
from Pyro5.svr_threads import (
    ClientConnectionJob,
    Housekeeper,
    NoFreeWorkersError,
    Pool,
    PoolError,
    SocketServer_Threadpool,
)

from dopq.wire.protocol import TOKEN_ANNOTATION

log = logging.getLogger("dopq.wire.transport")

MSGPACK_ID = 4  # Pyro5's serializer id of msgpack
ANON_MAX = 64 * 1024  # bytes of a message without a valid token (connect, ping, login)
SIGNED_MAX = 2 * 2**20 + 64 * 1024  # with one: an upload chunk (2 MiB) and room
ANNOTATIONS_MAX = 1024
ANON_ITEMS, SIGNED_ITEMS, MAX_DEPTH = 2_000, 200_000, 32
ALLOWED_FLAGS = protocol.FLAGS_CORR_ID
_HEADER = struct.Struct(protocol._header_format)


class Refused(errors.ConnectionClosedError):  # type: ignore[misc]
    """A connection broke the rules: it is closed without an answer."""


# -- message bodies ------------------------------------------------------------------------
_FIXED = {0xC0: 0, 0xC2: 0, 0xC3: 0, 0xCA: 4, 0xCB: 8, 0xCC: 1, 0xCD: 2, 0xCE: 4,
          0xCF: 8, 0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8}
_SIZED = {0xC4: 1, 0xC5: 2, 0xC6: 4, 0xD9: 1, 0xDA: 2, 0xDB: 4}  # bin and str: length bytes
_CONTAINERS = {0xDC: (2, 1), 0xDD: (4, 1), 0xDE: (2, 2), 0xDF: (4, 2)}  # bytes, per entry


def check_msgpack(data: bytes | bytearray | memoryview, max_items: int,
                  max_depth: int = MAX_DEPTH) -> None:
    """Walk one msgpack object without building it; raise ``Refused`` past the limits."""
    buf = data
    n, pos, items = len(buf), 0, 0
    todo = [1]  # objects still to read, per open container
    while todo:
        if todo[-1] == 0:
            todo.pop()
            continue
        todo[-1] -= 1
        items += 1
        if items > max_items:
            raise Refused(f"more than {max_items} elements")
        if pos >= n:
            raise Refused("truncated message")
        b = buf[pos]
        pos += 1
        count = 0
        if b <= 0x7F or b >= 0xE0:
            continue
        if b <= 0x8F:
            count = (b & 0x0F) * 2
        elif b <= 0x9F:
            count = b & 0x0F
        elif b <= 0xBF:
            pos += b & 0x1F
        elif b in _FIXED:
            pos += _FIXED[b]
        elif b in _SIZED:
            width = _SIZED[b]
            pos += width + int.from_bytes(buf[pos:pos + width], "big")
        elif b in _CONTAINERS:
            width, per = _CONTAINERS[b]
            count = int.from_bytes(buf[pos:pos + width], "big") * per
            pos += width
        else:
            raise Refused(f"msgpack type 0x{b:02x} is not accepted")
        if pos > n or count > n - pos:
            raise Refused("truncated message")
        if count:
            if len(todo) >= max_depth:
                raise Refused(f"nested deeper than {max_depth}")
            todo.append(count)
    if pos != n:
        raise Refused("trailing data after the message")


# -- connection slots ----------------------------------------------------------------------
@dataclass(eq=False)
class Slot:
    addr: str
    opened: float
    sock: Any
    signed: bool = False
    kicked: bool = False

    def kick(self) -> None:
        """Make the worker that serves this connection give up now."""
        self.kicked = True
        with contextlib.suppress(OSError, ValueError):
            self.sock.shutdown(socket.SHUT_RDWR)


class Slots:
    """Connections counted per address and in total; unsigned ones give way."""

    def __init__(self, per_address: int, total: int) -> None:
        self.per_address, self.total = per_address, total
        self._slots: list[Slot] = []
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._slots)

    def _victim(self, addr: str | None) -> Slot | None:
        open_ = [s for s in self._slots if not s.signed and (addr is None or s.addr == addr)]
        return min(open_, key=lambda s: s.opened, default=None)

    def admit(self, addr: str, sock: Any, now: float) -> tuple[Slot | None, list[Slot]]:
        """A slot for a new connection (None: refused) and the connections to close."""
        with self._lock:
            victims: list[Slot] = []
            for scope, limit in ((addr, self.per_address), (None, self.total)):
                while sum(1 for s in self._slots if scope is None or s.addr == scope) >= limit:
                    victim = self._victim(scope)
                    if victim is None:
                        return None, victims
                    self._slots.remove(victim)
                    victims.append(victim)
            slot = Slot(addr, now, sock)
            self._slots.append(slot)
            return slot, victims

    def release(self, slot: Slot) -> None:
        with self._lock, contextlib.suppress(ValueError):
            self._slots.remove(slot)

    def kick_all(self) -> None:
        with self._lock:
            slots = list(self._slots)
        for slot in slots:
            slot.kick()


# -- the rules -------------------------------------------------------------------------------
@dataclass
class Guard:
    """What a daemon's transport enforces."""

    tls: ssl.SSLContext | None
    handshake_timeout: float = 2.0
    idle_timeout: float = 10.0
    per_address: int = 128
    total: int = 256
    token_ok: Callable[[str], bool] = field(default=lambda _token: False)


class GuardedConnection(socketutil.SocketConnection):  # type: ignore[misc]
    """A client connection whose messages are checked before Pyro reads them.

    Pyro reads a message as ``recv(6)``, ``recv(34)`` (the header), then
    ``recv(annotations + data)``; this class answers those three reads and
    checks each part before the next is read.
    """

    def __init__(self, sock: Any, guard: Guard, slot: Slot, deadline: float | None) -> None:
        super().__init__(sock)
        self.guard, self.slot = guard, slot
        self.deadline = deadline  # the handshake's, while it lasts
        self.connected = False
        self._part = 0
        self._head = b""
        self._msg_deadline = 0.0
        self._header: tuple[Any, ...] = ()

    def _read(self, size: int, deadline: float, into: bytearray | None = None) -> bytearray:
        """``size`` bytes, before ``deadline``, read straight into ``into``'s last
        ``size`` bytes (a new buffer without it): no copy of a large body (a TLS
        record, 16 KiB, is the most one read gives)."""
        data = bytearray(size) if into is None else into
        view = memoryview(data)[len(data) - size:]
        got = 0
        while got < size:
            left = deadline - time.monotonic()
            if left <= 0 or self.slot.kicked:
                raise Refused("too slow" if not self.slot.kicked else "gave way to another")
            self.sock.settimeout(left)
            try:
                n = self.sock.recv_into(view[got:])
            except TimeoutError:
                raise Refused("too slow") from None
            except OSError as exc:
                raise errors.ConnectionClosedError(f"receiving: {exc}") from None
            if not n:
                raise errors.ConnectionClosedError("receiving: connection closed")
            got += n
        return data

    def recv(self, size: int) -> bytes | bytearray:
        part, self._part = self._part, (self._part + 1) % 3
        if part == 0:  # a new message begins: wait for it as long as a client may idle
            wait = self.deadline or time.monotonic() + self.guard.idle_timeout
            try:
                self._head = bytes(self._read(size, wait))
            except Refused:
                if self.deadline or self.slot.kicked:
                    raise
                raise errors.TimeoutError("idle connection closed") from None
            self._msg_deadline = self.deadline or time.monotonic() + self.guard.idle_timeout
            return self._head
        if part == 1:
            rest = bytes(self._read(size, self._msg_deadline))
            self._check_header(self._head + rest)
            return rest
        return self._body(size)

    def _check_header(self, header: bytes) -> None:
        if len(header) != _HEADER.size or header[:4] != b"PYRO":
            raise Refused("not a Pyro message")
        fields = _HEADER.unpack(header)
        msgtype, ser, flags, data_size, ann_size = fields[2], fields[3], fields[4], \
            fields[6], fields[7]
        expected = (protocol.MSG_INVOKE, protocol.MSG_PING) if self.connected \
            else (protocol.MSG_CONNECT,)
        if msgtype not in expected:
            raise Refused(f"message type {msgtype} not expected here")
        if flags & ~ALLOWED_FLAGS:
            raise Refused(f"message flags 0x{flags:x} are not accepted")
        if msgtype == protocol.MSG_PING:
            if data_size + ann_size > 64:
                raise Refused("oversized ping")
        elif ser != MSGPACK_ID:
            raise Refused(f"serializer {ser} is not accepted (msgpack only)")
        if ann_size > ANNOTATIONS_MAX:
            raise Refused(f"{ann_size} bytes of annotations")
        if data_size > SIGNED_MAX:
            raise Refused(f"message of {data_size} bytes (at most {SIGNED_MAX})")
        self._header = (msgtype, data_size, ann_size)

    def _body(self, size: int) -> bytearray:
        """The annotations, then (once the token is judged) the data after them in the
        same buffer, which Pyro reads through a memoryview."""
        msgtype, data_size, ann_size = self._header
        if size != data_size + ann_size:
            raise Refused("unexpected read")
        annotations = bytes(self._read(ann_size, self._msg_deadline))
        token = _token(annotations)
        signed = False
        if token and (data_size > ANON_MAX or not self.slot.signed):
            signed = self.guard.token_ok(token)
            self.slot.signed = self.slot.signed or signed
        if data_size > ANON_MAX and not signed:
            raise Refused(f"message of {data_size} bytes without a valid token "
                          f"(at most {ANON_MAX})")
        payload = bytearray(ann_size + data_size)
        payload[:ann_size] = annotations
        self._read(data_size, self._msg_deadline, into=payload)
        if msgtype != protocol.MSG_PING:
            check_msgpack(memoryview(payload)[ann_size:],
                          SIGNED_ITEMS if self.slot.signed else ANON_ITEMS)
        if msgtype == protocol.MSG_CONNECT:
            self.connected = True
        self.sock.settimeout(self.guard.idle_timeout)  # for the reply: a full allowance
        return payload


_TOKEN_NAME = TOKEN_ANNOTATION.encode()


def _token(annotations: bytes) -> str:
    i = 0
    while i + 8 <= len(annotations):
        name, length = annotations[i:i + 4], int.from_bytes(annotations[i + 4:i + 8], "big")
        if name == _TOKEN_NAME:
            try:
                return annotations[i + 8:i + 8 + length].decode("ascii")
            except UnicodeDecodeError:
                return ""
        i += 8 + length
    return ""


# -- the server ------------------------------------------------------------------------------
class GuardedJob(ClientConnectionJob):  # type: ignore[misc]
    """One client connection: TLS and CONNECT within the deadline, then its calls."""

    def __init__(self, sock: socket.socket, addr: Any, daemon: Any, guard: Guard,
                 slots: Slots, slot: Slot) -> None:
        self.raw, self.caddr, self.daemon = sock, addr, daemon
        self.guard, self.slots, self.slot = guard, slots, slot
        self.csock: GuardedConnection | None = None

    def __call__(self) -> None:
        try:
            conn = self._connect()
            if conn is not None:
                self._serve(conn)
        finally:
            self.slots.release(self.slot)

    def _tls(self, deadline: float) -> Any:
        assert self.guard.tls is not None
        tls = self.guard.tls.wrap_socket(self.raw, server_side=True,
                                         do_handshake_on_connect=False)
        self.slot.sock = tls
        tls.setblocking(False)
        poll = select.poll()
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or self.slot.kicked:
                log.info("TLS handshake of %s not done in time: closed", self.caddr[0])
                tls.close()
                return None
            try:
                tls.do_handshake()
                tls.setblocking(True)
                return tls
            except ssl.SSLWantReadError:
                poll.register(tls, select.POLLIN)
            except ssl.SSLWantWriteError:
                poll.register(tls, select.POLLOUT)
            except (ssl.SSLError, OSError) as exc:
                log.info("TLS handshake with %s failed: %s", self.caddr[0], exc)
                tls.close()
                return None
            poll.poll(left * 1000)
            poll.unregister(tls)

    def _connect(self) -> GuardedConnection | None:
        deadline = time.monotonic() + self.guard.handshake_timeout
        sock = self._tls(deadline) if self.guard.tls is not None else self.raw
        if sock is None:
            return None
        conn = GuardedConnection(sock, self.guard, self.slot, deadline)
        self.csock = conn
        try:
            ok = self.daemon._handshake(conn)
        except Exception as exc:  # noqa: BLE001 - any failure closes this one connection
            log.info("handshake with %s failed: %s", self.caddr[0], exc)
            ok = False
        if not ok:
            conn.close()
            return None
        conn.deadline = None
        return conn

    def _serve(self, conn: GuardedConnection) -> None:
        try:
            while not self.slot.kicked:
                try:
                    self.daemon.handleRequest(conn)
                except Refused as exc:
                    log.warning("closed the connection of %s: %s", self.caddr[0], exc)
                    break
                except (OSError, errors.CommunicationError, errors.SecurityError):
                    break
                except Exception as exc:  # noqa: BLE001 - one connection ends, the server goes on
                    log.warning("error in a request of %s: %s", self.caddr[0], exc)
                    break
        finally:
            with contextlib.suppress(Exception):
                self.daemon._clientDisconnect(conn)
            conn.close()


class GuardedTransport(SocketServer_Threadpool):  # type: ignore[misc]
    """Pyro5's thread-pool server with DoPQ's rules (see the module docstring)."""

    def __init__(self, guard: Guard) -> None:
        super().__init__()
        self.guard = guard
        self.slots = Slots(guard.per_address, guard.total)

    def init(self, daemon: Any, host: str, port: int, unixsocket: str | None = None) -> None:
        if unixsocket:
            raise ValueError("DoPQ serves TCP only")
        self.daemon = daemon
        self.sock = socketutil.create_socket(bind=(host, port), reuseaddr=config.SOCK_REUSE,
                                             timeout=1.0, noinherit=True,
                                             nodelay=config.SOCK_NODELAY)
        self._socketaddr = self.sock.getsockname()
        bound_host, bound_port = host or self._socketaddr[0], port or self._socketaddr[1]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        self.locationStr = f"{shown}:{bound_port}"
        self.pool = Pool()
        self.housekeeper = Housekeeper(daemon)
        self.housekeeper.start()
        self._selector.register(self.sock, 1, self)  # 1: selectors.EVENT_READ

    def events(self, eventsockets: Any) -> None:
        """Accept one connection and hand it to a worker; never wait on a client."""
        if not self._selector.select(config.POLLTIMEOUT):
            return
        try:
            csock, caddr = self.sock.accept()
        except (TimeoutError, BlockingIOError):
            return
        if self.shutting_down:
            csock.close()
            return
        with contextlib.suppress(OSError):  # replies go out whole (see tls.connect_pinned)
            csock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        slot, victims = self.slots.admit(str(caddr[0]), csock, time.monotonic())
        for victim in victims:
            victim.kick()
        if slot is None:
            log.warning("refused a connection from %s: all its slots are signed in", caddr[0])
            csock.close()
            return
        job = GuardedJob(csock, caddr, self.daemon, self.guard, self.slots, slot)
        try:
            self.pool.process(job)
        except (NoFreeWorkersError, PoolError):
            self.slots.release(slot)
            csock.close()

    def close(self) -> None:
        self.slots.kick_all()  # workers serving clients end now, not at their timeouts
        super().close()


class _GuardedDaemon:
    """Swaps Pyro5's thread-pool transport for ``GuardedTransport`` as it is made."""

    _dopq_guard: Guard

    @property
    def transportServer(self) -> Any:  # noqa: N802 - Pyro5's name
        return self.__dict__.get("_dopq_transport")

    @transportServer.setter
    def transportServer(self, value: Any) -> None:  # noqa: N802
        if type(value) is SocketServer_Threadpool:
            value = GuardedTransport(self._dopq_guard)
        self.__dict__["_dopq_transport"] = value


class GuardedDaemon(_GuardedDaemon, Daemon):  # type: ignore[misc]
    def __init__(self, *args: Any, guard: Guard, **kwargs: Any) -> None:
        if config.SERVERTYPE != "thread":
            raise ValueError("DoPQ's daemons use the thread-pool server")
        self._dopq_guard = guard
        super().__init__(*args, **kwargs)


class GuardedNameServerDaemon(_GuardedDaemon, NameServerDaemon):  # type: ignore[misc]
    def __init__(self, host: str, port: int, guard: Guard) -> None:
        self._dopq_guard = guard
        super().__init__(host, port)
