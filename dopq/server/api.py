"""The Controller: DoPQ's public API, served with Pyro5.

``Controller`` is a thin, exposed class: it finds out who calls (the token
sent as the ``TOKN`` message annotation), forwards to the ``DataPlatform``
and returns only dicts, lists, strings and numbers. Unexpected errors are
logged and reach the client as a one-line ``DopqError``; DoPQ's own errors
reach it as their own classes (registered with Pyro5 by ``dopq.wire.protocol``).

``serve()`` runs a server: Pyro5 daemon, name-server registration (embedded
name server when none answers), and a registrar that registers again when the
name server comes back.
"""

from __future__ import annotations

import functools
import logging
import signal
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

import Pyro5.api
import Pyro5.errors

from dopq import __version__
from dopq.core.errors import DopqError, ServerUnavailable
from dopq.core.settings import Settings
from dopq.server import authz
from dopq.server.auth import Principal, SignInGuard, SignInLimits, check_username
from dopq.server.authz import Action
from dopq.server.localupload import LocalUploads
from dopq.server.platform import DataPlatform
from dopq.server.registrar import Registrar
from dopq.wire import tls
from dopq.wire.protocol import TOKEN_ANNOTATION  # importing it registers the errors
from dopq.wire.transport import Guard, GuardedDaemon, GuardedNameServerDaemon

log = logging.getLogger("dopq.server.api")

MAX_REPLY_SIZE = 256 * 2**20  # replies; what a client may send is dopq.wire.transport's to cap
F = TypeVar("F", bound=Callable[..., Any])


def configure_pyro(settings: Settings) -> None:
    c = Pyro5.api.config
    c.SERVERTYPE = "thread"
    # DoPQ's daemons take msgpack only: its name-server lookups speak it too.
    c.SERIALIZER = "msgpack"
    # Workers: one per connection slot (server.max_connections), and room for
    # the connections that are being closed to make way for new ones.
    c.THREADPOOL_SIZE = settings.server.max_connections + 16
    c.THREADPOOL_SIZE_MIN = min(8, settings.server.max_connections)
    c.MAX_MESSAGE_SIZE = MAX_REPLY_SIZE
    c.COMMTIMEOUT = settings.server.idle_timeout
    c.DETAILED_TRACEBACK = False


def guard_for(settings: Settings, context: Any, token_ok: Callable[[str], bool]) -> Guard:
    s = settings.server
    return Guard(tls=context, handshake_timeout=s.handshake_timeout,
                 idle_timeout=s.idle_timeout, per_address=s.max_connections_per_address,
                 total=s.max_connections, token_ok=token_ok)


def to_bytes(data: Any) -> bytes:
    if isinstance(data, bytes | bytearray):
        return bytes(data)
    raise DopqError("upload data must be bytes")


def api_call(fn: F) -> F:
    """Turn unexpected exceptions into a one-line DopqError; log the traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        began = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        except DopqError:
            raise
        except (TypeError, ValueError) as exc:
            raise DopqError(f"bad arguments to {fn.__name__}: {exc}") from None
        except Exception as exc:  # noqa: BLE001
            log.error("API %s failed\n%s", fn.__name__, traceback.format_exc())
            raise DopqError(f"internal error in {fn.__name__}: {exc.__class__.__name__}") from None
        finally:
            metrics = getattr(getattr(args[0] if args else None, "_p", None), "metrics", None)
            if metrics is not None:  # the method's name: a fixed set, no caller-made labels
                metrics.api_call(fn.__name__, time.perf_counter() - began)

    return wrapper  # type: ignore[return-value]


@Pyro5.api.expose
@Pyro5.api.behavior(instance_mode="single")
class Controller:
    """The remote API. Every method but ``ping`` and ``login`` needs a token."""

    def __init__(self, platform: DataPlatform, local: LocalUploads | None = None) -> None:
        self._p = platform
        self._local = local
        s = platform.settings
        u = s.users
        self._guard = SignInGuard(SignInLimits(
            pair_attempts=u.login_attempts, user_attempts=u.login_user_attempts,
            window=u.login_window, max_delay=u.login_max_delay,
            concurrency=u.login_concurrency, busy_wait=u.login_busy_wait,
        ))

    # -- who is calling ---------------------------------------------------------------
    def _token(self) -> str:
        ann = getattr(Pyro5.api.current_context, "annotations", None) or {}
        raw = ann.get(TOKEN_ANNOTATION, b"")
        try:
            return bytes(raw).decode("ascii")
        except (UnicodeDecodeError, TypeError):
            return ""

    def _who(self) -> Principal:
        if self._p.closing:
            raise ServerUnavailable(f"server {self._p.settings.server_name} is shutting down")
        return self._p.users.principal_for(self._token())

    def _client_addr(self) -> str:
        addr = getattr(Pyro5.api.current_context, "client_sock_addr", None)
        return str(addr[0]) if addr else "?"

    # -- session ---------------------------------------------------------------------
    @api_call
    def ping(self) -> dict[str, Any]:
        return {"name": self._p.settings.server_name, "version": __version__}

    @api_call
    def login(self, user: str, password: str) -> dict[str, Any]:
        name = check_username(str(user))
        who = self._guard.sign_in(
            name, self._client_addr(), lambda: self._p.users.authenticate(name, str(password))
        )
        token, expires = self._p.users.issue_token(who.name, self._p.settings.users.token_ttl)
        return {"token": token, "user": who.name, "role": who.role.value, "expires_at": expires}

    @api_call
    def logout(self) -> dict[str, Any]:
        self._who()
        self._p.users.revoke(self._token())
        return {"logged_out": True}

    @api_call
    def whoami(self) -> dict[str, Any]:
        who = self._who()
        return {"user": who.name, "role": who.role.value}

    # -- submission -------------------------------------------------------------------
    @api_call
    def submit_begin(self, size: int, options: dict[str, Any] | None = None,
                     check: dict[str, Any] | None = None) -> str:
        """Begin an upload. ``check``: the ``container_config.json`` (``config``) and
        ``dockerfile`` text the client read, judged now (``dopq.server.intake``)."""
        who = self._who()
        if options is not None and not isinstance(options, dict):
            raise DopqError("options must be a dict")
        if check is not None and not isinstance(check, dict):
            raise DopqError("check must be a dict")
        return self._p.begin_upload(who, int(size), dict(options or {}), check)

    @api_call
    def upload_socket(self) -> str:
        """The path of the local upload socket (``dopq.server.localupload``), or ''."""
        self._who()
        return self._local.address if self._local is not None else ""

    @api_call
    def submit_chunk(self, upload_id: str, data: Any) -> int:
        return self._p.upload_chunk(self._who(), str(upload_id), to_bytes(data))

    @api_call
    def submit_finish(self, upload_id: str) -> dict[str, Any]:
        return self._p.finish_upload(self._who(), str(upload_id))

    @api_call
    def submit_abort(self, upload_id: str) -> dict[str, Any]:
        self._p.abort_upload(self._who(), str(upload_id))
        return {"aborted": upload_id}

    # -- views --------------------------------------------------------------------------
    @api_call
    def job(self, job_id: int) -> dict[str, Any]:
        return self._p.job(self._who(), int(job_id))

    @api_call
    def queue(self) -> list[dict[str, Any]]:
        return self._p.queued(self._who())

    @api_call
    def running(self) -> list[dict[str, Any]]:
        return self._p.running(self._who())

    @api_call
    def history(self, limit: int = 200, user: str | None = None) -> list[dict[str, Any]]:
        who = self._who()
        return self._p.history(int(limit), check_username(user) if user else None, who)

    @api_call
    def status(self) -> dict[str, Any]:
        return self._p.status(self._who())

    @api_call
    def users(self) -> list[dict[str, Any]]:
        return self._p.user_stats(self._who())

    @api_call
    def images(self) -> dict[str, Any]:
        """The allowed base images and the caller's own job images (``dopq images``)."""
        return self._p.images(self._who())

    @api_call
    def priority(self, job_id: int | None = None) -> list[dict[str, Any]]:
        self._who()
        return self._p.priorities(None if job_id is None else int(job_id))

    @api_call
    def snapshot(self, history_limit: int = 200, since: int | None = None) -> dict[str, Any]:
        """The five views the GUI shows, in one call.

        With ``since`` (the ``version`` of an earlier snapshot, or 0) the queue
        comes as ``queued_delta``: changed rows, removed ids and the new order
        when it moved (``dopq.client.remote.SnapshotFollower`` merges them).
        """
        who = self._who()
        out = self._p.snapshot(int(history_limit), None if since is None else int(since), who)
        out["whoami"] = {"user": who.name, "role": who.role.value}
        return out

    @api_call
    def logs(
        self, job_id: int, kind: str = "run", offset: int = 0, limit: int = 1 << 20
    ) -> dict[str, Any]:
        return self._p.logs(self._who(), int(job_id), str(kind), int(offset), int(limit))

    @api_call
    def array(self, job_id: int) -> list[dict[str, Any]]:
        """The elements of the array whose first job is ``job_id`` (empty: not an array)."""
        self._who()
        return self._p.array(int(job_id))

    # -- outputs: zipped on the server, fetched in chunks (dopq.server.fetch) ------------------
    @api_call
    def outputs_begin(self, job_id: int) -> dict[str, Any]:
        return self._p.commands.outputs_begin(self._who(), int(job_id))

    @api_call
    def outputs_chunk(self, fetch_id: str, offset: int) -> bytes:
        return self._p.fetches.chunk(self._who(), str(fetch_id), int(offset))

    @api_call
    def outputs_end(self, fetch_id: str) -> dict[str, Any]:
        self._p.fetches.end(self._who(), str(fetch_id))
        return {"ended": str(fetch_id)}

    # -- commands ---------------------------------------------------------------------------
    @api_call
    def cancel(self, job_id: int) -> dict[str, Any]:
        return self._p.cancel(self._who(), int(job_id))

    @api_call
    def edit(self, ids: list[int], action: str, value: Any = None) -> dict[str, Any]:
        who = self._who()
        if not isinstance(ids, list | tuple):
            raise DopqError("ids must be a list of job ids")
        return self._p.edit_queued(who, ids, str(action), value)

    @api_call
    def clear_history(self, user: str | None = None) -> dict[str, Any]:
        return self._p.clear_history(self._who(), user)

    @api_call
    def clear_status(self, user: str | None = None) -> dict[str, Any]:
        return self._p.clear_status(self._who(), user)

    @api_call
    def shutdown(self, stop_running: bool = False) -> dict[str, Any]:
        return self._p.request_shutdown(self._who(), bool(stop_running))

    @api_call
    def set_share(self, user: str, weight: float) -> dict[str, Any]:
        return self._p.set_share(self._who(), check_username(user), float(weight))

    @api_call
    def audit(self, limit: int = 100) -> list[dict[str, Any]]:
        return self._p.commands.audit_log(self._who(), int(limit))

    @api_call
    def report(self, since: str | None = None, until: str | None = None,
               by: str | None = None) -> dict[str, Any]:
        """Usage of finished jobs (``dopq report``): one's own lines, an admin's all."""
        who = self._who()
        return self._p.commands.report(who, *(None if v is None else str(v)[:64]
                                              for v in (since, until, by)))

    @api_call
    def restart_job(self, job_id: int, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
        """Queue a copy of a finished job with its image and changed options."""
        return self._p.commands.restart(self._who(), int(job_id), overrides)

    # -- users (admins) ---------------------------------------------------------------------
    @api_call
    def user_list(self) -> list[dict[str, Any]]:
        self._who()
        return self._p.users.list()

    @api_call
    def user_add(self, name: str, password: str, admin: bool = False) -> dict[str, Any]:
        return self._p.commands.user_add(self._who(), name, str(password), bool(admin))

    @api_call
    def user_remove(self, name: str) -> dict[str, Any]:
        return self._p.commands.user_remove(self._who(), name)

    @api_call
    def user_passwd(self, name: str, password: str) -> dict[str, Any]:
        return self._p.commands.user_passwd(self._who(), name, str(password))

    @api_call
    def revoke_tokens(self, name: str) -> dict[str, Any]:
        return self._p.commands.revoke_tokens(self._who(), name)

    # -- notifications (dopq notify) ---------------------------------------------------------
    @api_call
    def notify_add(self, url: str, events: Any = None) -> dict[str, Any]:
        return self._p.workers.notifier.targets.add(self._who(), str(url), events)

    @api_call
    def notify_list(self) -> list[dict[str, Any]]:
        return self._p.workers.notifier.targets.visible(self._who())

    @api_call
    def notify_remove(self, target_id: int) -> dict[str, Any]:
        return self._p.workers.notifier.targets.remove(self._who(), int(target_id))


# Which rules of ``dopq.server.authz`` guard each API method (tests/test_authz.py
# checks that every public method has an entry, and what each rule allows).
RULES: dict[str, tuple[Action, ...]] = {
    "ping": (Action.PING,), "login": (Action.LOGIN,),
    **{m: (Action.READ,) for m in (
        "logout", "whoami", "upload_socket", "queue", "running", "history", "status",
        "users", "images", "priority", "snapshot", "array", "user_list")},
    "job": (Action.READ, Action.SEE_PRIVATE),  # the spec and image: the owner's and admins'
    "submit_begin": (Action.SUBMIT, Action.DEPEND),
    "submit_finish": (Action.UPLOAD, Action.SUBMIT),  # the archive's config: its priority
    **{m: (Action.UPLOAD,) for m in ("submit_chunk", "submit_abort")},
    "logs": (Action.READ_LOGS,), "cancel": (Action.CANCEL,),
    "edit": tuple(authz.EDITS.values()),
    "outputs_begin": (Action.FETCH_OUTPUTS,),
    "outputs_chunk": (Action.READ_FETCH,), "outputs_end": (Action.READ_FETCH,),
    "clear_history": (Action.CLEAR_HISTORY,), "clear_status": (Action.CLEAR_STATUS,),
    "shutdown": (Action.SHUTDOWN,), "set_share": (Action.SET_SHARE,), "audit": (Action.AUDIT,),
    "user_add": (Action.USER_ADD,), "user_remove": (Action.USER_REMOVE,),
    "user_passwd": (Action.USER_PASSWD,), "revoke_tokens": (Action.REVOKE_TOKENS,),
    **{m: (Action.NOTIFY,) for m in ("notify_add", "notify_list", "notify_remove")},
    "report": (Action.REPORT,), "restart_job": (Action.RESTART, Action.SUBMIT),
}


# -- serving -----------------------------------------------------------------------------------
def _name_server_answers(settings: Settings) -> bool:
    try:
        ns = Pyro5.api.locate_ns(settings.nameserver.host, settings.nameserver.port)
        ns._pyroTimeout = 2.0
        ns.ping()
        ns._pyroRelease()
        return True
    except Pyro5.errors.PyroError:
        return False


def start_embedded_ns(settings: Settings, stop: threading.Event) -> Any:
    # Plain TCP: the name server holds nothing secret (clients verify the
    # server they reach through it), but it is guarded like the API.
    ns_daemon = GuardedNameServerDaemon(
        settings.nameserver.host, settings.nameserver.port,
        guard=guard_for(settings, None, lambda _token: False),
    )
    t = threading.Thread(target=ns_daemon.requestLoop, name="dopq-nameserver", daemon=True)
    t.start()
    log.info("embedded name server on %s:%s", settings.nameserver.host, settings.nameserver.port)
    return ns_daemon


class Server:
    """A running DoPQ server: platform, Pyro5 daemon, name server, registrar."""

    def __init__(self, settings: Settings) -> None:
        configure_pyro(settings)
        self.settings = settings
        self.stop_event = threading.Event()
        self.platform = DataPlatform(settings)
        self.ns_daemon: Any = None
        self.daemon: Any = None
        self.registrar: Registrar | None = None
        self._loop: threading.Thread | None = None
        self.local: LocalUploads | None = None
        self.fingerprint = ""

    def start(self) -> None:
        s = self.settings
        # TLS always, with our own context: Pyro5's SSL settings are per process
        # and would put the name server (and every client here) on TLS too.
        cert, key = tls.ensure_certificate(s.server.tls_cert, s.server.tls_key,
                                           s.state_path, s.server_name)
        self.fingerprint = tls.file_fingerprint(cert)
        context = tls.server_context(cert, key)
        embedded = s.nameserver.embedded
        if embedded == "yes" or (embedded == "auto" and not _name_server_answers(s)):
            self.ns_daemon = start_embedded_ns(s, self.stop_event)
        self.platform.start()
        if s.intake.local_uploads:
            self.local = LocalUploads(s, self.platform.uploads)
            self.local.start()
        self.daemon = GuardedDaemon(
            host=s.server.host, port=s.server.port,
            guard=guard_for(s, context, self._token_ok),
        )
        uri = self.daemon.register(Controller(self.platform, self.local),
                                   objectId=s.object_name)
        self.uri = uri
        self._loop = threading.Thread(
            target=self.daemon.requestLoop, name="dopq-daemon", daemon=True
        )
        self._loop.start()
        self.registrar = Registrar(s, uri, self.stop_event)
        self.registrar.start()
        self.registrar.registered.wait(10)
        log.info("DoPQ %s serving %s as %s (TLS, certificate %s)", __version__, uri,
                 s.object_name, self.fingerprint)

    def _token_ok(self, token: str) -> bool:
        try:
            self.platform.users.principal_for(token)
            return True
        except DopqError:
            return False

    def wait(self) -> None:
        """Block until a signal or a shutdown call."""
        while not self.stop_event.is_set():
            if self.platform.shutdown_requested.wait(0.5):
                break

    def stop(self) -> None:
        """Refuse new calls, leave the name server, close the API, then stop the work."""
        self.platform.closing = True
        self.stop_event.set()
        if self.registrar is not None:
            self.registrar.unregister()
        if self.daemon is not None:
            self.daemon.shutdown()
            self.daemon.close()
        if self.local is not None:
            self.local.stop()
        self.platform.stop(stop_running=self.platform.stop_running_on_shutdown)
        if self.ns_daemon is not None:
            self.ns_daemon.shutdown()
            self.ns_daemon.close()


def serve(settings: Settings) -> int:
    server = Server(settings)

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("signal %s: stopping", signum)
        server.stop_event.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.start()
    print(f"dopq: server {settings.object_name} ready at {server.uri}", flush=True)
    print(f"dopq: certificate fingerprint {server.fingerprint}", flush=True)
    server.wait()
    server.stop()
    print("dopq: server stopped", flush=True)
    return 0
