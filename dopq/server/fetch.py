"""``dopq outputs``: a finished job's output folder, fetched through the API.

The server zips ``outputs/<user>/<id>/`` into a private temporary file and
hands it out in chunks (``begin`` -> ``chunk(offset)`` ... -> ``end``), each
within the transport's reply size. Only the job's owner and admins may fetch.

The folder was written by the job, so nothing in it is trusted: it is walked
with fd-relative calls and ``O_NOFOLLOW`` (a symlink the job planted, to
``/etc/passwd`` or anywhere, is skipped, never followed), only regular files
are read (devices, FIFOs and sockets are skipped), and the zip stops at
``MAX_FETCH`` bytes read. A user has at most one fetch open; an idle one is
removed after ``FETCH_IDLE`` seconds.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
import uuid
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from dopq.core.errors import Conflict, DopqError, LimitExceeded, NotFound
from dopq.core.settings import Settings
from dopq.server import authz
from dopq.server.auth import Principal
from dopq.server.hostfs import DIR_FLAGS, FILE_FLAGS, lstat_at
from dopq.server.outputs import OutputFolders

log = logging.getLogger("dopq.server.fetch")

CHUNK = 1 << 20  # bytes per chunk: well within the transport's size per message
MAX_FETCH = 4 << 30  # bytes of files one fetch may read
MAX_DEPTH = 64
FETCH_IDLE = 600.0


@dataclass
class Fetch:
    id: str
    user: str  # who asked (the owner or an admin)
    job_id: int
    path: Path
    size: int
    files: int
    skipped: list[str] = field(default_factory=list)
    last: float = field(default_factory=time.time)


@dataclass
class _Walk:
    zf: zipfile.ZipFile
    read: int = 0
    files: int = 0
    skipped: list[str] = field(default_factory=list)

    def skip(self, rel: str, why: str) -> None:
        if len(self.skipped) < 100:
            self.skipped.append(f"{rel} ({why})")


def zip_folder(dir_fd: int, target: Path, limit: int = MAX_FETCH) -> _Walk:
    """Zip the tree below ``dir_fd`` into ``target``: regular files and folders only."""
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as raw, zipfile.ZipFile(raw, "w", zipfile.ZIP_DEFLATED) as zf:
        walk = _Walk(zf)
        _add_dir(dir_fd, "", walk, limit, 0)
    return walk


def _add_dir(dir_fd: int, prefix: str, walk: _Walk, limit: int, depth: int) -> None:
    if depth > MAX_DEPTH:
        walk.skip(prefix or ".", "too deep")
        return
    for name in sorted(os.listdir(dir_fd)):
        rel = f"{prefix}{name}"
        problem = _name_problem(name)
        if problem is not None:  # a name no safe unpacker takes: said, not sent
            walk.skip(ascii(rel)[1:-1], problem)
            continue
        st = lstat_at(name, dir_fd)
        if st is None:
            continue
        if stat.S_ISDIR(st.st_mode):
            try:
                sub = os.open(name, DIR_FLAGS, dir_fd=dir_fd)
            except OSError as exc:  # swapped for a symlink meanwhile: O_NOFOLLOW refuses
                walk.skip(rel, exc.strerror or "unreadable")
                continue
            try:
                walk.zf.writestr(zipfile.ZipInfo(rel + "/"), b"")
                _add_dir(sub, rel + "/", walk, limit, depth + 1)
            finally:
                os.close(sub)
        elif stat.S_ISREG(st.st_mode):
            _add_file(dir_fd, name, rel, walk, limit)
        else:
            walk.skip(rel, "symlink" if stat.S_ISLNK(st.st_mode) else "not a regular file")


def _name_problem(name: str) -> str | None:
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        return "name is not UTF-8"
    if not name.isprintable() or "\\" in name:
        return "control character or backslash in the name"
    return "name too long" if size > 255 else None


def _add_file(dir_fd: int, name: str, rel: str, walk: _Walk, limit: int) -> None:
    try:
        fd = os.open(name, FILE_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        walk.skip(rel, exc.strerror or "unreadable")
        return
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode):  # swapped between lstat and open
            walk.skip(rel, "not a regular file")
            return
        if walk.read + st.st_size > limit:
            raise LimitExceeded(f"the outputs are over {limit >> 20} MiB: "
                                "fetch them on the server host")
        info = zipfile.ZipInfo(rel, time.localtime(st.st_mtime)[:6])
        info.compress_type = zipfile.ZIP_DEFLATED
        info.external_attr = (stat.S_IMODE(st.st_mode) & 0o755) << 16
        with walk.zf.open(info, "w", force_zip64=True) as out:
            while block := fh.read(CHUNK):
                walk.read += len(block)
                if walk.read > limit:
                    raise LimitExceeded(f"the outputs are over {limit >> 20} MiB: "
                                        "fetch them on the server host")
                out.write(block)
    walk.files += 1


class OutputFetches:
    """The fetches in progress: one per user, in ``<state_dir>/fetch/``."""

    def __init__(self, settings: Settings, owner: str = "") -> None:
        self.folders = OutputFolders(settings, owner)
        self.dir = settings.state_path / "fetch"
        self._lock = threading.Lock()
        self._open: dict[str, Fetch] = {}

    def begin(self, asker: str, owner: str, job_id: int) -> Fetch:
        """Zip job ``job_id``'s outputs for ``asker`` (authorised by the caller)."""
        self.expire()
        with self._lock:
            old = [f for f in self._open.values() if f.user == asker]
        for f in old:
            self._drop(f)
        self.dir.mkdir(mode=0o700, exist_ok=True)
        fd = self.folders._open_job(owner, job_id)
        if fd is None:
            raise NotFound(f"job {job_id} has no outputs on the server")
        fid = uuid.uuid4().hex
        target = self.dir / f"{fid}.zip"
        try:
            walk = zip_folder(fd, target)
        except DopqError:
            target.unlink(missing_ok=True)
            raise
        except OSError as exc:
            target.unlink(missing_ok=True)
            raise DopqError(f"cannot read the outputs of job {job_id}: {exc.strerror}") from None
        finally:
            os.close(fd)
        if walk.skipped:
            log.info("job %s: outputs fetched by %s without %s", job_id, asker, walk.skipped[:10])
        fetch = Fetch(fid, asker, job_id, target, target.stat().st_size, walk.files,
                      walk.skipped)
        with self._lock:
            self._open[fid] = fetch
        return fetch

    def _get(self, who: Principal, fetch_id: str) -> Fetch:
        with self._lock:
            f = self._open.get(str(fetch_id))
        if f is None:
            raise NotFound(f"no fetch {fetch_id} (finished or expired)")
        authz.require(who, authz.Action.READ_FETCH, owner=f.user)
        f.last = time.time()
        return f

    def chunk(self, who: Principal, fetch_id: str, offset: int, length: int = CHUNK) -> bytes:
        f = self._get(who, fetch_id)
        offset, length = int(offset), max(1, min(int(length), CHUNK))
        if not 0 <= offset <= f.size:
            raise Conflict(f"offset {offset} is outside the {f.size} bytes of the zip")
        with f.path.open("rb") as fh:
            fh.seek(offset)
            return fh.read(length)

    def end(self, who: Principal, fetch_id: str) -> None:
        self._drop(self._get(who, fetch_id))

    def _drop(self, f: Fetch) -> None:
        with self._lock:
            self._open.pop(f.id, None)
        f.path.unlink(missing_ok=True)

    def expire(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self._lock:
            idle = [f for f in self._open.values() if now - f.last > FETCH_IDLE]
        for f in idle:
            self._drop(f)

    def clear(self) -> None:
        """At start and stop: no fetch outlives the server."""
        with self._lock:
            self._open.clear()
        if self.dir.is_dir():
            for p in self.dir.glob("*.zip"):
                p.unlink(missing_ok=True)
