"""The client the CLI and the GUI share: finds a server, signs calls, uploads.

One Pyro5 proxy per thread (proxies are not thread-safe). The token travels
as an annotation of every call (``dopq.wire.protocol``), and only to a server that proved,
in the TLS handshake, that it holds the pinned certificate (``dopq.wire.tls``):
pins live per server in ``~/.config/dopq/known_servers.json``. Network trouble becomes a one-line
``ServerUnavailable``; the next call looks the server up again, so a client
outlives a restart of the server or of the name server.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import Pyro5.api
import Pyro5.core
import Pyro5.errors
from Pyro5 import protocol, serializers, socketutil

from dopq.client import localsend
from dopq.core import submitcheck
from dopq.core.context import IMAGE_TAR_NAME, zip_folder
from dopq.core.dockerignore import ALWAYS_SENT, context_files
from dopq.core.errors import (
    DopqError,
    LimitExceeded,
    NotFound,
    ServerIdentityChanged,
    ServerUnavailable,
    UnknownServer,
)
from dopq.wire import protocol as wire_protocol
from dopq.wire import tls
from dopq.wire.protocol import IDEMPOTENT_CALLS, NS_PREFIX, SERIALIZER, TOKEN_ANNOTATION
from dopq.wire.transport import SIGNED_MAX
from dopq.wire.views import JobDetail, Snapshot

CHUNK = 2 << 20  # bytes per submit_chunk call (a call may carry up to SIGNED_MAX)
STALE_AFTER = 5.0  # seconds; the server closes connections idle for server.idle_timeout
# DoPQ's name server, like its API, takes msgpack only (dopq.wire.transport).
Pyro5.api.config.SERIALIZER = SERIALIZER


def config_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "dopq"


def token_file() -> Path:
    return config_dir() / "tokens.json"


def pin_file() -> Path:
    return config_dir() / "known_servers.json"


def _load(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text())
        return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _store(path: Path, key: str, value: str | None) -> None:
    data = _load(path)
    if value is None:
        data.pop(key, None)
    else:
        data[key] = value
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def load_tokens() -> dict[str, str]:
    return _load(token_file())


def save_token(server: str, token: str | None) -> None:
    _store(token_file(), server, token)


def load_pins() -> dict[str, str]:
    """Server name -> the SHA-256 fingerprint of the certificate it must present."""
    return _load(pin_file())


def save_pin(server: str, fingerprint: str | None) -> None:
    _store(pin_file(), server, fingerprint)


def _approx_size(value: Any, depth: int = 0) -> int:
    """Bytes a call's arguments take at least (strings and bytes, a few levels deep)."""
    if isinstance(value, str | bytes | bytearray):
        return len(value)
    if depth > 4:
        return 0
    if isinstance(value, dict):
        return sum(_approx_size(k, depth + 1) + _approx_size(v, depth + 1)
                   for k, v in value.items())
    if isinstance(value, list | tuple):
        return sum(_approx_size(v, depth + 1) for v in value)
    return 8


class PinnedProxy(Pyro5.api.Proxy):  # type: ignore[misc]
    """A Pyro5 proxy that connects only over TLS to the holder of a pinned certificate.

    Pyro5 sends the call context's annotations (the token) with its CONNECT
    message, so the certificate is checked in the TLS handshake, before that.
    """

    def __init__(self, uri: str, pin: str, server: str) -> None:
        super().__init__(uri)
        object.__setattr__(self, "_dopq_pin", pin)
        object.__setattr__(self, "_dopq_server", server)

    def _Proxy__pyroCreateConnection(  # noqa: N802 - replaces Pyro5's private method
        self, replaceUri: bool = False, connected_socket: Any = None  # noqa: N803
    ) -> bool:
        me: Any = self  # Pyro5's proxy attributes are not typed
        me._Proxy__check_owner()
        if me._pyroConnection is not None:
            return False
        uri = Pyro5.core.resolve(me._pyroUri)
        timeout = self._pyroTimeout or 30.0
        try:
            sock = tls.connect_pinned(uri.host, uri.port, self._dopq_pin, timeout,
                                      server=self._dopq_server)
        except ServerIdentityChanged:
            raise
        except ServerUnavailable as exc:  # the caller looks the server up again
            raise Pyro5.errors.CommunicationError(str(exc)) from None
        conn = socketutil.SocketConnection(sock, uri.object)
        try:
            serializer = serializers.serializers[SERIALIZER]
            data = serializer.dumps({"handshake": self._pyroHandshake, "object": uri.object})
            hello = protocol.SendingMessage(
                protocol.MSG_CONNECT, 0, self._pyroSeq, serializer.serializer_id, data,
                annotations=Pyro5.api.current_context.annotations)
            conn.send(hello.data)
            reply = protocol.recv_stub(conn, [protocol.MSG_CONNECTOK, protocol.MSG_CONNECTFAIL])
            answer = serializers.serializers_by_id[reply.serializer_id].loads(reply.data)
        except Exception as exc:
            conn.close()
            if isinstance(exc, Pyro5.errors.CommunicationError):
                raise
            raise Pyro5.errors.CommunicationError(f"cannot connect: {exc}") from None
        if reply.type != protocol.MSG_CONNECTOK:
            conn.close()
            raise Pyro5.errors.CommunicationError(f"connection rejected: {answer}")
        self._Proxy__processMetadata(answer["meta"])
        self._pyroConnection = conn
        self._pyroLocalSocket = sock.getsockname()
        if replaceUri:
            self._pyroUri = uri
        self._pyroValidateHandshake(answer["handshake"])
        return True


class Client:
    """A connection to one DoPQ server, found in the name server."""

    def __init__(
        self,
        ns_host: str | None = None,
        ns_port: int | None = None,
        server: str | None = None,
        token: str | None = None,
        timeout: float = 30.0,
        fingerprint: str | None = None,
    ) -> None:
        self.ns_host = ns_host or os.environ.get("DOPQ_NS_HOST") or "127.0.0.1"
        self.ns_port = int(ns_port or os.environ.get("DOPQ_NS_PORT") or 9090)
        self.server = server or os.environ.get("DOPQ_SERVER") or None
        fingerprint = fingerprint or os.environ.get("DOPQ_FINGERPRINT") or None
        self.fingerprint = tls.parse_fingerprint(fingerprint) if fingerprint else None
        self._token = token
        self.timeout = timeout
        self._local = threading.local()
        self._uri_lock = threading.Lock()
        self._uri: str | None = None

    # -- finding the server --------------------------------------------------------
    def _ns(self) -> Any:
        try:
            ns = Pyro5.api.locate_ns(self.ns_host, self.ns_port)
            ns._pyroTimeout = min(self.timeout, 5.0)
            return ns
        except Pyro5.errors.PyroError:
            raise ServerUnavailable(
                f"no name server at {self.ns_host}:{self.ns_port} (is the DoPQ server running?)"
            ) from None

    def servers(self) -> dict[str, str]:
        """Registered DoPQ servers: short name -> URI."""
        try:
            with self._ns() as ns:
                found = ns.list(prefix=NS_PREFIX)
        except Pyro5.errors.PyroError as exc:
            raise ServerUnavailable(f"name server error: {exc}") from None
        return {k[len(NS_PREFIX):]: v for k, v in found.items()}

    def server_name(self) -> str:
        if self.server:
            return self.server
        found = self.servers()
        if len(found) == 1:
            self.server = next(iter(found))
        elif socket.gethostname().split(".")[0] in found:
            self.server = socket.gethostname().split(".")[0]
        elif not found:
            raise ServerUnavailable(
                f"no DoPQ server registered at {self.ns_host}:{self.ns_port}"
            )
        else:
            raise DopqError(f"several servers ({', '.join(sorted(found))}): pick one with --server")
        return self.server

    def _lookup(self) -> str:
        with self._uri_lock:
            if self._uri is None:
                name = self.server_name()
                found = self.servers()
                if name not in found:
                    raise ServerUnavailable(f"server {name!r} is not registered in the name server")
                self._uri = found[name]
            return self._uri

    def pin(self) -> str:
        """The fingerprint this server must present: given, or pinned at sign-in."""
        if self.fingerprint:
            return self.fingerprint
        name = self.server_name()
        pinned = load_pins().get(name)
        if not pinned:
            raise UnknownServer(
                f"server {name} is not known here: run `dopq login` on a terminal to check "
                "its certificate, or pass --fingerprint SHA256:... (env DOPQ_FINGERPRINT; "
                "`dopq server fingerprint` prints it on the server host)")
        return pinned

    def has_pin(self) -> bool:
        return bool(self.fingerprint) or self.server_name() in load_pins()

    def probe_fingerprint(self) -> str:
        """The fingerprint of the certificate the registered server presents (not trusted)."""
        uri = Pyro5.core.URI(self._lookup())
        return tls.fingerprint(tls.probe_certificate(uri.host, uri.port, min(self.timeout, 10)))

    @property
    def token(self) -> str:
        if self._token is not None:
            return self._token
        env = os.environ.get("DOPQ_TOKEN")
        if env:
            return env
        try:
            return load_tokens().get(self.server_name(), "")
        except DopqError:
            return ""

    @token.setter
    def token(self, value: str | None) -> None:
        self._token = value

    def _proxy(self) -> Any:
        proxy = getattr(self._local, "proxy", None)
        uri = self._lookup()
        if proxy is None or str(proxy._pyroUri) != uri:
            proxy = PinnedProxy(uri, self.pin(), self.server_name())
            proxy._pyroTimeout = self.timeout
            # msgpack: ~30x faster than serpent for big listings, bytes native.
            proxy._pyroSerializer = SERIALIZER
            self._local.proxy = proxy
        return proxy

    def _forget(self) -> None:
        proxy = getattr(self._local, "proxy", None)
        if proxy is not None:
            try:
                proxy._pyroRelease()
            except Exception:  # noqa: BLE001
                pass
        self._local.proxy = None
        with self._uri_lock:
            self._uri = None

    def close(self) -> None:
        self._forget()

    # -- calling --------------------------------------------------------------------
    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Call an API method.

        A read is tried again once on a fresh connection if the connection
        dropped. A call that changes something is never sent twice: it goes
        over a fresh connection when this one sat idle (the server closes idle
        ones), and a failure is reported, not retried.
        """
        safe = method in IDEMPOTENT_CALLS  # tried again once when a connection drops
        size = _approx_size(args) + _approx_size(kwargs)
        if size > SIGNED_MAX - 4096:
            raise LimitExceeded(f"the call {method} is too large ({size} bytes; "
                                f"the server takes at most {SIGNED_MAX - 4096})")
        for attempt in (1, 2):
            token = self.token
            sent = False
            try:
                proxy = self._proxy()
                idle = time.monotonic() - getattr(self._local, "last_used", 0.0)
                if not safe and idle > STALE_AFTER and proxy._pyroConnection is not None:
                    proxy._pyroRelease()
                if proxy._pyroConnection is None:
                    proxy._pyroBind()  # a failure here sent nothing: safe to retry
                Pyro5.api.current_context.annotations = {TOKEN_ANNOTATION: token.encode()}
                sent = True
                result = getattr(proxy, method)(*args, **kwargs)
                self._local.last_used = time.monotonic()
                return result
            except DopqError:
                raise
            except (Pyro5.errors.CommunicationError, Pyro5.errors.NamingError,
                    ConnectionError, OSError) as exc:
                self._forget()
                if attempt == 2 or (sent and not safe):
                    raise ServerUnavailable(f"server unreachable: {exc}") from None
            except Pyro5.errors.PyroError as exc:
                raise DopqError(f"call failed: {str(exc).splitlines()[0][:200]}") from None
            except AttributeError:
                raise DopqError(f"the server has no API call {method!r}") from None
            finally:
                Pyro5.api.current_context.annotations = {}
        raise AssertionError("unreachable")

    # -- conveniences -----------------------------------------------------------------
    def login(self, user: str, password: str, remember: bool = True) -> dict[str, Any]:
        result: dict[str, Any] = self.call("login", user, password)
        self._token = result["token"]
        if remember:
            save_token(self.server_name(), result["token"])
            save_pin(self.server_name(), self.pin())
        return result

    def logout(self) -> None:
        try:
            self.call("logout")
        finally:
            save_token(self.server_name(), None)
            self._token = None

    def submit(
        self,
        path: str | Path,
        options: dict[str, Any] | None = None,
        progress: Callable[[int, int], None] | None = None,
        precheck: bool = True,
    ) -> dict[str, Any]:
        """Upload a zip (or a folder, zipped on the fly as ``.dockerignore`` says) and
        return the new job. ``precheck``: check the job here first and send its config
        and Dockerfile with ``submit_begin`` for the server's verdict
        (``dopq.core.submitcheck``); without, the server judges the archive at the end."""
        p = Path(path)
        tmp: Path | None = None
        prepared = submitcheck.prepare(p, options) if precheck else None
        # the job's name until its config is read (or if it cannot be read)
        opts = {**(options or {}), "source_name": p.name if p.is_dir() else p.stem}
        check = prepared.check() if prepared else None

        def host() -> str:  # asked only when the local socket may be tried
            return str(Pyro5.core.URI(self._lookup()).host)

        if p.is_dir():
            files = list(prepared.files if prepared and prepared.files is not None
                         else context_files(p, ALWAYS_SENT | {IMAGE_TAR_NAME}))
            streamed = localsend.submit_folder(self.call, host, p, files, opts, check, progress)
            if streamed is not None:  # zipped straight into the server's local socket
                return streamed
            fd, name = tempfile.mkstemp(suffix=".zip", prefix="dopq-")
            os.close(fd)
            tmp = Path(name)
            zip_folder(p, tmp, files)
            p = tmp
        elif not p.is_file():
            raise NotFound(f"{path}: no such file or folder")
        try:
            size = p.stat().st_size
            upload = self.call("submit_begin", size, opts, check)
            sent = 0
            try:
                with p.open("rb") as fh:  # through the local socket, or else in chunks
                    local = localsend.try_send(self.call, host, upload, fh, size, progress)
                    while not local and (chunk := fh.read(CHUNK)):
                        sent = self.call("submit_chunk", upload, chunk)
                        if progress:
                            progress(sent, size)
                job: dict[str, Any] = self.call("submit_finish", upload)
            except BaseException:
                try:
                    self.call("submit_abort", upload)
                except DopqError:
                    pass
                raise
            return job
        finally:
            if tmp is not None:
                tmp.unlink(missing_ok=True)

    def wait(self, job_id: int, timeout: float | None = None, poll: float = 0.5) -> JobDetail:
        """The job once it ended, or as it is when ``timeout`` seconds have passed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job: JobDetail = self.call("job", job_id)
            if job["state"] in ("succeeded", "failed", "cancelled"):
                return job
            if deadline is not None and time.monotonic() >= deadline:
                return job
            left = poll if deadline is None else deadline - time.monotonic()
            time.sleep(max(0.0, min(poll, left)))


class SnapshotFollower:
    """Keeps a whole snapshot up to date from the server's delta snapshots.

    The first call fetches everything; later calls send the version they
    hold and get only the queued jobs that changed. ``update()`` returns the
    snapshot in the plain form (``queued`` a list in queue order with
    ``position`` and ``wait_s``), as ``snapshot()`` without ``since`` would.
    """

    def __init__(self, client: Any, history_limit: int = 200) -> None:
        self.client = client
        self.history_limit = history_limit
        self.version = 0
        self._rows: dict[int, dict[str, Any]] = {}
        self._order: list[int] = []
        self._done: dict[int, dict[str, Any]] = {}
        self._done_order: list[int] = []

    def reset(self) -> None:
        self.version = 0
        self._rows, self._order = {}, []
        self._done, self._done_order = {}, []

    @staticmethod
    def _merge(rows: dict[int, dict[str, Any]], order: list[int], delta: dict[str, Any]
               ) -> list[int]:
        if delta["full"]:
            rows.clear()
        for jid in delta["removed"]:
            rows.pop(jid, None)
        for r in delta["rows"]:
            rows[r["id"]] = r
        return order if delta["order"] is None else list(delta["order"])

    def update(self) -> Snapshot:
        try:
            snap: dict[str, Any] = self.client.call("snapshot", self.history_limit, self.version)
        except DopqError:
            self.reset()  # a new server may number its versions anew
            raise
        encoded = snap.pop(wire_protocol.ENCODED, None)
        if encoded is not None:  # the shared part, encoded once on the server for all
            snap.update(wire_protocol.decode_reply(encoded))
        delta = snap.pop("queued_delta", None)
        if delta is None:  # a server (or a stand-in) without deltas
            return cast(Snapshot, snap)
        self._order = self._merge(self._rows, self._order, delta)
        done = snap.pop("finished_delta", None)
        if done is not None:
            self._done_order = self._merge(self._done, self._done_order, done)
            limit = int(snap.pop("history_limit", self.history_limit))
            snap["finished"] = [self._done[j] for j in self._done_order[:limit] if j in self._done]
        now = snap.get("now", time.time())
        queued = []
        for pos, jid in enumerate(self._order, 1):
            row = self._rows.get(jid)
            if row is None:
                continue
            q = dict(row)
            q["position"] = pos if row["state"] == "queued" else None
            q["wait_s"] = round(now - row["submitted_ts"], 3)
            queued.append(q)
        snap["queued"] = queued
        self.version = int(snap["version"])
        return cast(Snapshot, snap)
