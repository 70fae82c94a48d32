"""The drop folder: ``inbox/<user>/*.zip`` turned into jobs (the Provider's first door).

The Provider process scans it (``InboxWatcher.scan``). A file is taken only
when it is complete and its owner's: it is moved into ``incoming/`` first and
everything is checked on what was moved (owner, a regular file, one link), so
a file swapped in after the scan gains nothing. A file that cannot be taken
becomes a failed job with the reason, since nobody is there to answer.
"""

from __future__ import annotations

import logging
import os
import pwd
import stat as stat_mod
import time
import uuid
import zipfile
from pathlib import Path

from dopq.core.errors import DopqError, LimitExceeded
from dopq.core.jobs import JobState
from dopq.core.settings import Settings
from dopq.core.text import safe_name
from dopq.server import hostfs
from dopq.server import limits as limits_mod
from dopq.server.store import Store

log = logging.getLogger("dopq.server.inbox")

INCOMING = "incoming"  # archives owned by a job (or about to be)


class InboxWatcher:
    """Finds complete archives in ``inbox/<user>/`` and turns them into jobs.

    A file (not ``*.part``) is complete when it reads as a whole zip (the
    end-of-archive record is written last, so a zip being copied does not), or
    when it has not changed for ``settle_seconds`` (then it is taken, and a
    file that is no zip is refused with that reason).
    """

    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self.inbox = settings.inbox_path
        self.incoming = settings.state_path / INCOMING
        self._seen: dict[Path, tuple[int, float, float]] = {}
        self._next_folders = 0.0
        self._no_account: set[str] = set()  # users told about once: no Unix account
        self._misplaced: set[tuple[str, int, float]] = set()  # files in inbox/ itself, reported

    def scan(self, now: float) -> list[int]:
        new_jobs: list[int] = []
        if now >= self._next_folders:
            self._next_folders = now + 10.0
            self.make_folders()
        try:
            user_dirs = [d for d in self.inbox.iterdir() if d.is_dir() and not d.is_symlink()]
            self._report_misplaced()
        except OSError:
            return new_jobs
        alive: set[Path] = set()
        for udir in user_dirs:
            user = udir.name.lower()
            try:
                self._own_folder(udir, user)
                with os.scandir(udir) as it:
                    entries = list(it)
            except (OSError, DopqError):
                continue
            for entry in entries:
                f = Path(entry.path)
                if f.name.startswith(".") or f.name.endswith(".part"):
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if stat_mod.S_ISDIR(st.st_mode):
                    continue  # a folder (even one named x.zip) is not an upload
                if not stat_mod.S_ISREG(st.st_mode):
                    # A symlink, FIFO, socket or device: never read, never waited on.
                    self._take(f, user)
                    continue
                alive.add(f)
                key = (st.st_size, st.st_mtime)
                prev = self._seen.get(f)
                if prev is None or prev[:2] != key:
                    self._seen[f] = (key[0], key[1], now)
                    # A zip's end record is written last: a file that already
                    # reads as a whole zip is complete (a renamed .part, a cp).
                    if not _complete_zip(f):
                        continue
                elif now - prev[2] < self.settings.intake.settle_seconds:
                    continue
                job_id = self._take(f, user)
                self._seen.pop(f, None)
                if job_id is not None:
                    new_jobs.append(job_id)
        for gone in set(self._seen) - alive:
            self._seen.pop(gone, None)
        return new_jobs

    def make_folders(self) -> None:
        """``inbox/<user>/`` for every allowed user (``users.allowed``; empty: every
        DoPQ user and every user of ``users.uid_map``), owned by their Unix account,
        0700; a user without one is logged."""
        if not self.settings.users.check_owner:
            return
        allowed = set(self.settings.users.allowed)
        names = allowed or ({r["name"] for r in self.store.read("SELECT name FROM users")}
                            | set(self.settings.users.uid_map))
        for user in sorted(names):
            if user != user.lower() or "/" in user or user.startswith("."):
                continue
            ids = hostfs.unix_ids(self.settings, user)
            if ids is None:
                if user not in self._no_account:
                    self._no_account.add(user)
                    log.info("inbox/%s not made: no Unix account %r (set users.uid_map)",
                             user, user)
                continue
            try:
                hostfs.ensure_dir(self.inbox / user, 0o700, ids)
            except (OSError, DopqError) as exc:
                log.warning("inbox/%s: %s", user, exc)

    def _report_misplaced(self) -> None:
        """A zip dropped in ``inbox/`` itself is not taken: tell its owner, once."""
        for entry in os.scandir(self.inbox):
            if entry.name.startswith(".") or not entry.name.endswith(".zip"):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            key = (entry.name, st.st_ino, st.st_mtime)
            if stat_mod.S_ISDIR(st.st_mode) or key in self._misplaced:
                continue
            self._misplaced.add(key)
            shown = "".join(c if c.isprintable() else "?" for c in entry.name)[:128]
            user = self._user_of_uid(st.st_uid)
            reason = (f"rejected: inbox/{shown} is in inbox/ itself, not taken; "
                      f"drop it in inbox/{user or '<user>'}/")
            log.warning("%s (file owner uid %s)", reason, st.st_uid)
            if user is not None:
                self.store.add_job(name=shown if len(shown) >= 3 else "inbox file", user=user,
                                   origin="inbox", source=None, state=JobState.FAILED,
                                   error=reason, finished_at=time.time())

    def _user_of_uid(self, uid: int) -> str | None:
        """The DoPQ user whose Unix account has ``uid`` (``users.uid_map`` first)."""
        known = {r["name"] for r in self.store.read("SELECT name FROM users")}
        mapped = [u for u, m in self.settings.users.uid_map.items() if m == uid and u in known]
        if mapped:  # several DoPQ users on one account: whose it is cannot be told
            return str(mapped[0]) if len(mapped) == 1 else None
        try:
            name = pwd.getpwuid(uid).pw_name.lower()
        except KeyError:
            return None
        mapped_elsewhere = name in self.settings.users.uid_map
        return name if name in known and not mapped_elsewhere else None

    def _own_folder(self, udir: Path, user: str) -> None:
        """Keep ``inbox/<user>/`` the user's and 0700, so nobody else drops or swaps files."""
        ids = hostfs.unix_ids(self.settings, user) if self.settings.users.check_owner else None
        if ids is None:
            return
        st = os.lstat(udir)
        if (st.st_uid, st.st_gid, stat_mod.S_IMODE(st.st_mode)) != (*ids, 0o700):
            hostfs.ensure_dir(udir, 0o700, ids)

    def _take(self, path: Path, user: str) -> int | None:
        """Move the file into ``incoming/`` and create its job (or a refusal).

        Whatever the name holds at the move is what is checked, on the open
        descriptor (owner, a regular file, one link), and a symlink is never
        followed: a file swapped in after the scan gains nothing.
        """
        self.incoming.mkdir(parents=True, exist_ok=True)
        target = self.incoming / f"inbox-{user}-{uuid.uuid4().hex}.zip"
        try:
            uid, problem = hostfs.take_file(path, target)
        except OSError as exc:
            log.warning("cannot take %s: %s", path, exc)
            return None
        if problem is not None:
            self._refuse(path, user, problem)
            return None
        return self.adopt(target, user, uid, path.stem[:128] or "job")

    def _refuse(self, path: Path, user: str, problem: str) -> None:
        shown = "".join(c if c.isprintable() else "?" for c in path.name)[:128]
        reason = (f"rejected: inbox/{user}/{shown} {problem}; "
                  "only a regular file of your own is taken")
        log.warning("%s", reason)
        self.store.add_job(name=shown if len(shown) >= 3 else "inbox file", user=user,
                           origin="inbox", source=None, state=JobState.FAILED, error=reason,
                           finished_at=time.time())

    def adopt(self, target: Path, user: str, uid: int, name: str) -> int | None:
        """Create the job of an archive in ``incoming/`` (or its refusal)."""
        name = safe_name(name)  # from a file name: no control characters reach a terminal
        reason = self._owner_problem(user, uid)
        if reason is None:
            try:  # the per-user queue limit, counted in the transaction that inserts
                return limits_mod.add_job_within(
                    self.store, self.settings.policy.max_queued_per_user,
                    dict(name=name, user=user, origin="inbox", source=str(target)))
            except LimitExceeded as exc:
                reason = str(exc)
        if reason is not None:
            job_id = self.store.add_job(
                name=name, user=user, origin="inbox", source=None,
                state=JobState.FAILED, error=f"rejected: {reason}", finished_at=time.time(),
            )
            rejected = self.settings.state_path / "rejected"
            rejected.mkdir(parents=True, exist_ok=True)
            os.replace(target, rejected / f"{job_id}.zip")
        return None

    def _owner_problem(self, user: str, uid: int) -> str | None:
        allowed = self.settings.users.allowed
        if allowed and user not in allowed:
            return f"unknown user {user!r}"
        accounts = self.store.read("SELECT name FROM users")
        if accounts and user not in {r["name"] for r in accounts}:
            return f"no DoPQ user {user!r} (ask an admin: dopq user add {user})"
        if not self.settings.users.check_owner:
            return None
        expected = self.settings.users.uid_map.get(user)
        if expected is None:
            try:
                expected = pwd.getpwnam(user).pw_uid
            except KeyError:
                return f"no Unix user {user!r} owns inbox/{user} (set users.uid_map)"
        if uid != expected:
            return f"file owner uid {uid} is not user {user!r} (uid {expected})"
        return None


def _complete_zip(path: Path) -> bool:
    """Whether the file reads as a whole zip: an end record whose central
    directory is really there (an inner zip's end record near the end of a
    half-copied archive does not pass)."""
    try:
        fd = os.open(path, hostfs.FILE_FLAGS)  # no symlink followed, a FIFO never waited on
    except OSError:
        return False
    try:
        with os.fdopen(fd, "rb") as fh:
            if not stat_mod.S_ISREG(os.fstat(fh.fileno()).st_mode) or not zipfile.is_zipfile(fh):
                return False
            with zipfile.ZipFile(fh) as zf:
                zf.infolist()
        return True
    except (OSError, zipfile.BadZipFile, ValueError, EOFError, RuntimeError):
        return False
