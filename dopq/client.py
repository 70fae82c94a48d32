"""The client the CLI and the GUI share: finds a server, signs calls, uploads.

One Pyro5 proxy per thread (proxies are not thread-safe). The token travels
as the ``TOKN`` annotation of every call. Network trouble becomes a one-line
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
from typing import Any

import Pyro5.api
import Pyro5.errors

from dopq import api as _api  # noqa: F401 - registers DoPQ's error classes
from dopq.archive import zip_folder
from dopq.errors import DopqError, NotFound, ServerUnavailable

CHUNK = 1 << 20
# Calls that change nothing: tried again once when a connection drops.
IDEMPOTENT = frozenset({
    "ping", "whoami", "job", "queue", "running", "history", "status", "users", "priority",
    "snapshot", "logs", "user_list", "audit",
})
STALE_AFTER = 5.0  # seconds; the server closes connections idle for server.idle_timeout
SERIALIZER = "msgpack"
NS_PREFIX = "dopq."


def config_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "dopq"


def token_file() -> Path:
    return config_dir() / "tokens.json"


def load_tokens() -> dict[str, str]:
    try:
        data = json.loads(token_file().read_text())
        return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def save_token(server: str, token: str | None) -> None:
    tokens = load_tokens()
    if token is None:
        tokens.pop(server, None)
    else:
        tokens[server] = token
    path = token_file()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path.with_suffix(".tmp"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(tokens, fh)
    os.chmod(path.with_suffix(".tmp"), 0o600)
    os.replace(path.with_suffix(".tmp"), path)


class Client:
    """A connection to one DoPQ server, found in the name server."""

    def __init__(
        self,
        ns_host: str | None = None,
        ns_port: int | None = None,
        server: str | None = None,
        token: str | None = None,
        timeout: float = 30.0,
        tls_ca: str | None = None,
    ) -> None:
        self.ns_host = ns_host or os.environ.get("DOPQ_NS_HOST") or "127.0.0.1"
        self.ns_port = int(ns_port or os.environ.get("DOPQ_NS_PORT") or 9090)
        self.server = server or os.environ.get("DOPQ_SERVER") or None
        tls_ca = tls_ca or os.environ.get("DOPQ_TLS_CA") or None
        if tls_ca:
            if not Path(tls_ca).is_file():
                raise DopqError(f"TLS CA file not found: {tls_ca}")
            # Pyro5 keeps SSL settings per process.
            Pyro5.api.config.SSL = True
            Pyro5.api.config.SSL_CACERTS = tls_ca
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
            proxy = Pyro5.api.Proxy(uri)
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
        safe = method in IDEMPOTENT
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
                Pyro5.api.current_context.annotations = {"TOKN": token.encode()}
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
    ) -> dict[str, Any]:
        """Upload a zip (or a folder, zipped on the fly) and return the new job."""
        p = Path(path)
        tmp: Path | None = None
        if p.is_dir():
            fd, name = tempfile.mkstemp(suffix=".zip", prefix="dopq-")
            os.close(fd)
            tmp = Path(name)
            zip_folder(p, tmp)
            p = tmp
        elif not p.is_file():
            raise NotFound(f"{path}: no such file or folder")
        try:
            size = p.stat().st_size
            upload = self.call("submit_begin", size, dict(options or {}))
            sent = 0
            try:
                with p.open("rb") as fh:
                    while chunk := fh.read(CHUNK):
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

    def wait(self, job_id: int, timeout: float | None = None, poll: float = 0.5) -> dict[str, Any]:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job: dict[str, Any] = self.call("job", job_id)
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

    def update(self) -> dict[str, Any]:
        try:
            snap: dict[str, Any] = self.client.call("snapshot", self.history_limit, self.version)
        except DopqError:
            self.reset()  # a new server may number its versions anew
            raise
        delta = snap.pop("queued_delta", None)
        if delta is None:  # a server (or a stand-in) without deltas
            return snap
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
        return snap
