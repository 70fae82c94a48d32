"""Users, roles, passwords, API tokens and the sign-in rate limit.

Passwords are kept only as salted scrypt hashes and compared in constant time.
Tokens are random; the store keeps only their SHA-256, with an expiry, and a
token can be revoked. All of this acts on the store directly, so
``dopq user add`` works on the server host whether the server runs or not.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import re
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from dopq.core.errors import Conflict, DopqError, NotAuthenticated, NotFound, RateLimited
from dopq.server.store import Store

USER_RE = re.compile(r"^[a-z_][a-z0-9_.-]{0,31}$")
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1


class Role(StrEnum):
    USER = "user"
    ADMIN = "admin"


@dataclass(frozen=True)
class Principal:
    """Who is calling: a signed-in user and their role."""

    name: str
    role: Role

    @property
    def is_admin(self) -> bool:
        return self.role == Role.ADMIN


def check_username(name: str) -> str:
    name = str(name).strip().lower()
    if not USER_RE.match(name):
        raise DopqError(f"bad user name {name!r}: use a-z, 0-9, '_', '.', '-' (max 32)")
    return name


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(
        password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=32
    )
    b64 = base64.b64encode
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password(password: str, stored: str) -> bool:
    try:
        kind, n, r, p, salt, digest = stored.split("$")
        if kind != "scrypt":
            return False
        got = hashlib.scrypt(
            password.encode(), salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p),
            dklen=len(base64.b64decode(digest)),
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, base64.b64decode(digest))


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@functools.cache
def _dummy_hash() -> str:
    return hash_password(secrets.token_urlsafe(16))


class RateLimiter:
    """At most ``attempts`` failures per key within ``window`` seconds."""

    def __init__(self, attempts: int, window: float) -> None:
        self.attempts = attempts
        self.window = window
        self._fails: dict[str, deque[float]] = {}

    def _recent(self, key: str, now: float) -> deque[float]:
        q = self._fails.setdefault(key, deque())
        while q and q[0] <= now - self.window:
            q.popleft()
        return q

    def count(self, key: str, now: float) -> int:
        """Failures of ``key`` within the window (an idle key is forgotten)."""
        q = self._recent(key, now)
        if not q:
            self._fails.pop(key, None)
        return len(q)

    def check(self, key: str, now: float, pending: int = 0) -> None:
        q = self._recent(key, now)
        if len(q) + pending >= self.attempts:
            first = q[0] if q else now
            wait = int(first + self.window - now) + 1
            raise RateLimited(f"too many failed sign-ins; try again in {wait} s")

    def fail(self, key: str, now: float) -> None:
        self._recent(key, now).append(now)

    def reset(self, key: str) -> None:
        self._fails.pop(key, None)

    def sweep(self, now: float) -> None:
        """Forget keys with no failure left in the window (bounded memory)."""
        for key in list(self._fails):
            self.count(key, now)

    def __len__(self) -> int:
        return len(self._fails)


@dataclass(frozen=True)
class SignInLimits:
    """How failed sign-ins are counted (``users.login_*`` in the settings)."""

    pair_attempts: int = 5  # failures of one user from one address: that pair locks
    user_attempts: int = 30  # failures of one user from all addresses: the user locks
    window: float = 300.0
    max_delay: float = 2.0  # an address with many failures waits up to this, never locks
    concurrency: int = 2  # password hashes (scrypt) at once
    busy_wait: float = 5.0  # how long a sign-in waits for a hashing slot


SWEEP_KEYS = 10_000  # sweep the counters when they hold this many keys...
SWEEP_EVERY = 10.0  # ...at most this often (seconds)


class SignInGuard:
    """Sign-in rate limits that cannot be turned against other users.

    Failures are counted three ways, each in a sliding window:

    - per (user, address): ``pair_attempts`` failures lock that user *from
      that address*. All local users share 127.0.0.1, so a lock per address
      alone would let one user lock out everyone; per pair, an attacker
      locks only the name they guess at, from where they guess.
    - per user, from any address: ``user_attempts`` (higher) failures lock
      the user everywhere, against guessing spread over many addresses.
    - per address: no lock; past ``pair_attempts`` failures (under any
      names) each answer to that address waits longer, doubling up to
      ``max_delay``. This slows spraying one password over many names
      without refusing anybody: another user at that address still signs
      in, at most ``max_delay`` later.

    The trade-off: a user under attack *from their own address* (a local
    attacker guessing alice's password on 127.0.0.1) is locked from that
    address for up to ``window``; tokens already issued keep working, and an
    admin can reset the password (``dopq user passwd``) which is the right
    response to a guessed-at account anyway.

    A locked attempt is refused before any hashing. Hashing itself runs at
    most ``concurrency`` at a time; a caller beyond that waits up to
    ``busy_wait`` seconds, then gets "server busy". Attempts in flight count
    as pending failures, so parallel guesses cannot overshoot a limit. The
    bookkeeping lock is held only for counting, never while hashing or
    waiting.
    """

    def __init__(
        self, limits: SignInLimits, *, clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.limits = limits
        self._clock = clock
        self._sleep = sleep
        self._pairs = RateLimiter(limits.pair_attempts, limits.window)
        self._users = RateLimiter(limits.user_attempts, limits.window)
        self._addrs = RateLimiter(2**31, limits.window)  # never locks; sets the delay
        self._pending: dict[str, int] = {}
        self._lock = threading.Lock()
        self._hashing = threading.BoundedSemaphore(limits.concurrency)
        self._swept = float("-inf")

    def delay_for(self, failures: int) -> float:
        """Seconds an address with ``failures`` recent failures waits before its answer."""
        over = failures - self.limits.pair_attempts
        if over < 0 or self.limits.max_delay <= 0:
            return 0.0
        return min(self.limits.max_delay, 0.125 * 2.0 ** min(over, 30))

    def sign_in(self, name: str, addr: str, check: Callable[[], Principal]) -> Principal:
        """Run ``check`` (which hashes the password) under the limits above."""
        pair, user = f"{name}@{addr}", name
        with self._lock:
            now = self._clock()
            if len(self._pairs) + len(self._addrs) > SWEEP_KEYS and now - self._swept > SWEEP_EVERY:
                self._swept = now
                for limiter in (self._pairs, self._users, self._addrs):
                    limiter.sweep(now)
            self._pairs.check(pair, now, self._pending.get(pair, 0))
            self._users.check(user, now, self._pending.get(user, 0))
            delay = self.delay_for(self._addrs.count(addr, now))
            for key in (pair, user):
                self._pending[key] = self._pending.get(key, 0) + 1
        ok = False
        try:
            if delay:
                self._sleep(delay)  # only this caller waits; no lock is held
            if not self._hashing.acquire(timeout=self.limits.busy_wait):
                raise RateLimited("server busy with other sign-ins; try again in a moment")
            try:
                who = check()
            finally:
                self._hashing.release()
            ok = True
            return who
        except NotAuthenticated:
            with self._lock:
                now = self._clock()
                for limiter, key in ((self._pairs, pair), (self._users, user),
                                     (self._addrs, addr)):
                    limiter.fail(key, now)
            raise
        finally:
            with self._lock:
                for key in (pair, user):
                    left = self._pending.get(key, 1) - 1
                    if left > 0:
                        self._pending[key] = left
                    else:
                        self._pending.pop(key, None)
                if ok:
                    self._pairs.reset(pair)
                    self._users.reset(user)


class Users:
    """User and token records in the store."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def add(self, name: str, password: str, role: Role = Role.USER, share: float = 1.0) -> None:
        name = check_username(name)
        if len(password) < 8:
            raise DopqError("password too short (at least 8 characters)")
        with self.store.transaction() as db:
            if db.execute("SELECT 1 FROM users WHERE name = ?", (name,)).fetchone():
                raise Conflict(f"user {name} already exists")
            db.execute(
                "INSERT INTO users (name, role, pw_hash, share, created_at) VALUES (?,?,?,?,?)",
                (name, Role(role).value, hash_password(password), float(share), time.time()),
            )

    def set_password(self, name: str, password: str) -> None:
        name = check_username(name)
        if len(password) < 8:
            raise DopqError("password too short (at least 8 characters)")
        self._update(name, pw_hash=hash_password(password))
        self.revoke_all(name)

    def set_role(self, name: str, role: Role) -> None:
        self._update(name, role=Role(role).value)

    def set_share(self, name: str, share: float) -> None:
        if not 0 < float(share) <= 1e6:
            raise DopqError("share must be a positive number")
        self._update(name, share=float(share))

    def _update(self, name: str, **fields: Any) -> None:
        name = check_username(name)
        sets = ", ".join(f"{k} = ?" for k in fields)
        with self.store.transaction() as db:
            cur = db.execute(f"UPDATE users SET {sets} WHERE name = ?", [*fields.values(), name])
            if cur.rowcount == 0:
                raise NotFound(f"no user {name}")

    def remove(self, name: str) -> None:
        name = check_username(name)
        with self.store.transaction() as db:
            cur = db.execute("DELETE FROM users WHERE name = ?", (name,))
            if cur.rowcount == 0:
                raise NotFound(f"no user {name}")
            db.execute("DELETE FROM tokens WHERE user = ?", (name,))

    def list(self) -> list[dict[str, Any]]:
        rows = self.store.read("SELECT name, role, share, created_at FROM users ORDER BY name")
        return [dict(r) for r in rows]

    def get(self, name: str) -> dict[str, Any] | None:
        rows = self.store.read("SELECT * FROM users WHERE name = ?", (str(name).lower(),))
        return dict(rows[0]) if rows else None

    def shares(self) -> dict[str, float]:
        return {r["name"]: float(r["share"]) for r in self.list()}

    # -- sign-in and tokens -----------------------------------------------------------
    def authenticate(self, name: str, password: str) -> Principal:
        user = self.get(name)
        # Check against a dummy hash for unknown users: one scrypt either way,
        # so timing does not tell who exists.
        stored = user["pw_hash"] if user else _dummy_hash()
        if not verify_password(password, stored) or user is None:
            raise NotAuthenticated("wrong user name or password")
        return Principal(user["name"], Role(user["role"]))

    def issue_token(self, name: str, ttl: float, now: float | None = None) -> tuple[str, float]:
        now = time.time() if now is None else now
        token = secrets.token_urlsafe(32)
        expires = now + ttl
        with self.store.transaction() as db:
            db.execute(
                "INSERT INTO tokens (hash, user, created_at, expires_at) VALUES (?, ?, ?, ?)",
                (token_hash(token), name, now, expires),
            )
        return token, expires

    def principal_for(self, token: str, now: float | None = None) -> Principal:
        now = time.time() if now is None else now
        if not token:
            raise NotAuthenticated("not signed in: run 'dopq login' (or set DOPQ_TOKEN)")
        rows = self.store.read(
            "SELECT t.expires_at, t.revoked, u.name, u.role FROM tokens t"
            " JOIN users u ON u.name = t.user WHERE t.hash = ?",
            (token_hash(token),),
        )
        if not rows or rows[0]["revoked"]:
            raise NotAuthenticated("invalid token: sign in again with 'dopq login'")
        if rows[0]["expires_at"] <= now:
            raise NotAuthenticated("token expired: sign in again with 'dopq login'")
        return Principal(rows[0]["name"], Role(rows[0]["role"]))

    def revoke(self, token: str) -> None:
        with self.store.transaction() as db:
            db.execute("UPDATE tokens SET revoked = 1 WHERE hash = ?", (token_hash(token),))

    def revoke_all(self, name: str) -> int:
        name = check_username(name)
        with self.store.transaction() as db:
            return db.execute(
                "UPDATE tokens SET revoked = 1 WHERE user = ? AND revoked = 0", (name,)
            ).rowcount
