"""The one exception root of DoPQ and its subclasses.

    DopqError                   every error DoPQ raises on purpose
    ├── ConfigError             a bad settings key or value (names the key)
    ├── JobRejected             an archive or job spec refused at intake
    ├── BuildFailed             an image build failed (carries the log tail)
    ├── NotFound                no such job, user, upload or server
    ├── Conflict                the state changed under the caller
    ├── LimitExceeded           a size, count or per-user limit was hit
    ├── AuthError               authentication or authorisation failed
    │   ├── NotAuthenticated    no, a bad or an expired token
    │   ├── Forbidden           signed in, but not allowed to do this
    │   └── RateLimited         too many failed sign-ins
    ├── EngineUnavailable       the Docker engine does not answer
    └── ServerUnavailable       the client cannot reach a DoPQ server
        ├── UnknownServer       no certificate pinned for this server yet
        └── ServerIdentityChanged   the server's TLS certificate is not the pinned one

Every message is one line that a user can act on. The classes are registered
with Pyro5 (``dopq.wire.protocol``) so that clients receive the same class.
"""

from __future__ import annotations


class DopqError(Exception):
    """Root of all DoPQ errors; ``str(err)`` is a one-line message."""

    def __init__(self, message: str = "") -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message or self.__class__.__name__


class ConfigError(DopqError):
    """A configuration key is unknown or has a bad value."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"config: {key}: {problem}")
        self.key = key
        self.problem = problem


class JobRejected(DopqError):
    """A submission was refused; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"rejected: {reason}")
        self.reason = reason


class BuildFailed(DopqError):
    """An image build failed; ``log_tail`` holds the last lines of its log."""

    def __init__(self, reason: str, log_tail: str = "") -> None:
        super().__init__(f"build failed: {reason}")
        self.reason = reason
        self.log_tail = log_tail


class NotFound(DopqError):
    """The named job, user, upload or server does not exist."""


class Conflict(DopqError):
    """The object is no longer in a state where the call applies."""


class LimitExceeded(DopqError):
    """A size, count or per-user limit was exceeded."""


class AuthError(DopqError):
    """Authentication or authorisation failed."""


class NotAuthenticated(AuthError):
    """No valid token was presented."""


class Forbidden(AuthError):
    """The caller is signed in but may not do this."""


class RateLimited(AuthError):
    """Too many failed sign-in attempts; try again later."""


class EngineUnavailable(DopqError):
    """The Docker engine does not answer."""


class ServerUnavailable(DopqError):
    """The client cannot reach the DoPQ server or the name server."""


class UnknownServer(ServerUnavailable):
    """No certificate is pinned for this server: the client does not talk to it yet."""


class ServerIdentityChanged(ServerUnavailable):
    """The server presents a certificate other than the pinned one: nothing was sent."""


ALL_ERRORS: tuple[type[DopqError], ...] = (
    DopqError,
    ConfigError,
    JobRejected,
    BuildFailed,
    NotFound,
    Conflict,
    LimitExceeded,
    AuthError,
    NotAuthenticated,
    Forbidden,
    RateLimited,
    EngineUnavailable,
    ServerUnavailable,
    UnknownServer,
    ServerIdentityChanged,
)
