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
import time
from collections import deque
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from dopq.errors import Conflict, DopqError, NotAuthenticated, NotFound, RateLimited
from dopq.store import Store

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

    def check(self, key: str, now: float) -> None:
        q = self._recent(key, now)
        if len(q) >= self.attempts:
            wait = int(q[0] + self.window - now) + 1
            raise RateLimited(f"too many failed sign-ins; try again in {wait} s")

    def fail(self, key: str, now: float) -> None:
        self._recent(key, now).append(now)

    def reset(self, key: str) -> None:
        self._fails.pop(key, None)


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
