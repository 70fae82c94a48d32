"""Job output folders: made before a job, measured while it runs, sealed after.

``outputs/<user>/<id>/`` is the user's (0700) under root's ``outputs/<user>/``
(0711), on the ``nosuid,nodev`` mount of ``dopq.server.hostfs``. Sealing a finished
job's folder gives everything in it to the user's Unix uid, clears setuid and
setgid bits, removes devices, FIFOs and sockets and unlinks a hard link to a
file outside the folder; nothing is followed through a symlink (fd-relative
calls, ``O_NOFOLLOW``). ``OutputWatcher`` stops a job that wrote more than
``limits.max_output``.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dopq.core.settings import Settings
from dopq.server.hostfs import DIR_FLAGS, FILE_FLAGS, ensure_dir, lstat_at, outputs_root, unix_ids

log = logging.getLogger("dopq.server.outputs")

OUTPUT_LIMIT = "wrote more than limits.max_output"
MAX_DEPTH = 256  # a sealed folder deeper than this is left as it is below that depth
SETID = stat.S_ISUID | stat.S_ISGID


@dataclass
class SealReport:
    files: int = 0
    cleared: list[str] = field(default_factory=list)  # setuid/setgid bits taken away
    removed: list[str] = field(default_factory=list)  # devices, fifos, sockets, foreign links
    skipped: list[str] = field(default_factory=list)


def _open_dir(name: str | Path, dir_fd: int | None = None) -> int:
    return os.open(name, DIR_FLAGS, dir_fd=dir_fd)


class OutputFolders:
    """``outputs/<user>/<id>``: made before a job starts, sealed after it ends."""

    def __init__(self, settings: Settings, owner: str = "") -> None:
        self.settings = settings
        self.root = outputs_root(settings)
        if settings.runtime.backend == "slurm":  # a shared folder: one server's part of it
            self.root = self.root / (owner or "unknown")

    def path(self, user: str, job_id: int) -> Path:
        return self.root / user / str(job_id)

    def prepare(self, user: str, job_id: int) -> Path:
        """Make the job's folder: root's parents, the user's folder, 0700."""
        ensure_dir(self.root, 0o711)
        ensure_dir(self.root / user, 0o711, (0, 0))
        ids = unix_ids(self.settings, user) or (0, 0)
        outdir = self.path(user, job_id)
        ensure_dir(outdir, 0o700, ids)
        return outdir

    def _open_job(self, user: str, job_id: int) -> int | None:
        fds: list[int] = []
        try:
            fds.append(_open_dir(self.root))
            fds.append(_open_dir(user, fds[-1]))
            return _open_dir(str(job_id), fds[-1])
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("job %s: output folder not sealed (%s)", job_id, exc.strerror)
            return None
        finally:
            for fd in fds:
                os.close(fd)

    def seal(self, user: str, job_id: int) -> SealReport | None:
        """Give the job's outputs to the user and make them inert (idempotent)."""
        fd = self._open_job(user, job_id)
        if fd is None:
            return None
        ids = unix_ids(self.settings, user) or (0, 0)
        report = SealReport()
        linked: dict[int, list[tuple[str, ...]]] = {}
        try:
            os.fchown(fd, *ids)
            os.fchmod(fd, 0o700)
            _seal_dir(fd, (), ids, report, linked, 0)
            for paths in linked.values():
                _seal_links(fd, paths, ids, report)
        finally:
            os.close(fd)
        if report.cleared or report.removed or report.skipped:
            log.warning("job %s: sealed outputs: cleared setuid/setgid on %s; removed %s; "
                        "skipped %s", job_id, report.cleared[:10], report.removed[:10],
                        report.skipped[:10])
        return report

    def usage(self, user: str, job_id: int) -> int:
        """Bytes the job's folder takes on disk; clears setuid/setgid bits met on the way."""
        fd = self._open_job(user, job_id)
        if fd is None:
            return 0
        seen: set[int] = set()
        try:
            return _usage(fd, seen, 0)
        finally:
            os.close(fd)


def _names(dir_fd: int) -> list[str]:
    try:
        with os.scandir(dir_fd) as it:
            return [e.name for e in it]
    except OSError:
        return []


def _seal_dir(
    dir_fd: int, where: tuple[str, ...], ids: tuple[int, int], report: SealReport,
    linked: dict[int, list[tuple[str, ...]]], depth: int,
) -> None:
    for name in _names(dir_fd):
        st = lstat_at(name, dir_fd)
        if st is None:
            continue
        rel = (*where, name)
        mode = st.st_mode
        report.files += 1
        if stat.S_ISLNK(mode):
            os.chown(name, *ids, dir_fd=dir_fd, follow_symlinks=False)  # the link, not its target
        elif stat.S_ISDIR(mode):
            if depth >= MAX_DEPTH:
                report.skipped.append("/".join(rel))
                continue
            try:
                sub = _open_dir(name, dir_fd)
            except OSError:
                continue
            try:
                _fix(sub, ids, rel, report)
                _seal_dir(sub, rel, ids, report, linked, depth + 1)
            finally:
                os.close(sub)
        elif stat.S_ISREG(mode) and st.st_nlink > 1:
            linked.setdefault(st.st_ino, []).append(rel)  # decided once all links are counted
        elif stat.S_ISREG(mode):
            _fix_file(name, dir_fd, ids, rel, report)
        else:  # device, fifo, socket: removing the name never touches anything else
            try:
                os.unlink(name, dir_fd=dir_fd)
                report.removed.append("/".join(rel))
            except OSError:
                report.skipped.append("/".join(rel))


def _fix(fd: int, ids: tuple[int, int], rel: tuple[str, ...], report: SealReport) -> None:
    st = os.fstat(fd)
    os.fchown(fd, *ids)
    if st.st_mode & SETID:
        report.cleared.append("/".join(rel))
    os.fchmod(fd, stat.S_IMODE(st.st_mode) & ~SETID)


def _fix_file(
    name: str, dir_fd: int, ids: tuple[int, int], rel: tuple[str, ...], report: SealReport,
    nlink: int = 1,
) -> None:
    try:
        fd = os.open(name, FILE_FLAGS, dir_fd=dir_fd)
    except OSError:
        report.skipped.append("/".join(rel))
        return
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != nlink:
            report.skipped.append("/".join(rel))  # changed under us
            return
        _fix(fd, ids, rel, report)
    finally:
        os.close(fd)


def _seal_links(
    job_fd: int, paths: list[tuple[str, ...]], ids: tuple[int, int], report: SealReport
) -> None:
    """Hard links: all inside the folder are fixed; one to a file outside is unlinked."""
    for rel in paths:
        parent = _open_beneath(job_fd, rel[:-1])
        if parent is None:
            continue
        try:
            st = lstat_at(rel[-1], parent)
            if st is None or not stat.S_ISREG(st.st_mode):
                continue
            if st.st_nlink == len(paths):
                _fix_file(rel[-1], parent, ids, rel, report, nlink=len(paths))
            else:
                os.unlink(rel[-1], dir_fd=parent)
                report.removed.append("/".join(rel) + " (hard link to a file elsewhere)")
        finally:
            os.close(parent)


def _open_beneath(job_fd: int, parts: tuple[str, ...]) -> int | None:
    fd = os.dup(job_fd)
    for part in parts:
        try:
            nxt = _open_dir(part, fd)
        except OSError:
            os.close(fd)
            return None
        os.close(fd)
        fd = nxt
    return fd


def _usage(dir_fd: int, seen: set[int], depth: int) -> int:
    total = 0
    for name in _names(dir_fd):
        st = lstat_at(name, dir_fd)
        if st is None or st.st_ino in seen:
            continue
        if st.st_nlink > 1:
            seen.add(st.st_ino)
        total += st.st_blocks * 512
        if stat.S_ISDIR(st.st_mode) and depth < MAX_DEPTH:
            try:
                sub = _open_dir(name, dir_fd)
            except OSError:
                continue
            try:
                total += _usage(sub, seen, depth + 1)
            finally:
                os.close(sub)
        elif stat.S_ISREG(st.st_mode) and st.st_mode & SETID:
            try:
                fd = os.open(name, FILE_FLAGS, dir_fd=dir_fd)
            except OSError:
                continue
            try:
                now = os.fstat(fd)
                if stat.S_ISREG(now.st_mode):
                    os.fchmod(fd, stat.S_IMODE(now.st_mode) & ~SETID)
            finally:
                os.close(fd)
    return total


class OutputWatcher(threading.Thread):
    """Measures running jobs' outputs; stops (kills) one that wrote over the limit.

    A job is first measured within ``tick`` of its start, then every ``tick``
    until its writing rate is known, then at most every ``interval`` and
    sooner as it nears the limit at that rate (half the time left, at least
    50 ms), but never more often than every three measuring times (a huge
    folder costs at most a quarter of a core). The disk gets at most about
    ``rate x (50 ms + one measurement + the kill)`` beyond the limit; a job
    that writes at full speed from its first second, up to ``rate x 2 tick``;
    one that bursts after a quiet spell, up to ``rate x interval``.
    """

    def __init__(
        self,
        folders: OutputFolders,
        limit: int,
        limit_text: str,
        running: Callable[[], list[tuple[int, str]]],
        exceeded: Callable[[int, str], None],
        job_pid: Callable[[int], int | None] = lambda job_id: None,
        interval: float = 1.0,
        halt: threading.Event | None = None,
        tick: float = 0.25,
    ) -> None:
        super().__init__(name="dopq-outputs", daemon=True)
        self.folders = folders
        self.limit = limit
        self.limit_text = limit_text
        self.running = running
        self.exceeded = exceeded
        self.job_pid = job_pid
        self._pids: dict[int, int | None] = {}  # job -> its container's first process
        self.interval = interval
        self.tick = tick
        self.halt = halt or threading.Event()
        self._last: dict[int, tuple[float, int, float]] = {}  # job -> (when, bytes, rate)
        self._due: dict[int, float] = {}

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                wait = self.check(time.monotonic())
            except Exception:  # noqa: BLE001 - the watcher must not die
                log.exception("measuring outputs failed")
                wait = self.interval
            self.halt.wait(wait)

    def _unlinked(self, job_id: int) -> int:
        """Bytes of files the job deleted from the host's file system but keeps open."""
        pid = self._pids.get(job_id)
        if pid is None or not os.path.exists(f"/proc/{pid}"):
            pid = self._pids[job_id] = self.job_pid(job_id)
        if pid is None:
            return 0
        try:
            dev = os.stat(self.folders.root).st_dev
        except OSError:
            return 0
        return unlinked_bytes(_cgroup_procs(pid), dev)

    def check(self, now: float) -> float:
        """Measure the jobs that are due; return seconds until the next is due."""
        jobs = dict(self.running())
        for gone in set(self._due) - set(jobs):
            self._due.pop(gone, None)
            self._last.pop(gone, None)
            self._pids.pop(gone, None)
        for job_id, user in jobs.items():
            if self._due.get(job_id, 0.0) > now:
                continue
            began = time.monotonic()
            size = self.folders.usage(user, job_id) + self._unlinked(job_id)
            t = time.monotonic()
            if self.limit and size > self.limit:
                self.exceeded(job_id, f"{OUTPUT_LIMIT}={self.limit_text} "
                                      f"({size / 2**20:.1f} MiB in /outdir)")
                self._due[job_id] = t + 5.0
                continue
            prev = self._last.get(job_id)
            rate = 0.0
            if prev is not None:
                # A writer in bursts may show no growth between two close looks:
                # the rate seen before fades by half per look instead of vanishing.
                rate = max((size - prev[1]) / max(t - prev[0], 1e-3), prev[2] / 2)
            self._last[job_id] = (t, size, rate)
            step = self.tick if prev is None else self.interval
            if rate > 0 and self.limit:
                step = min(step, max(0.05, (self.limit - size) / rate / 2))
            step = max(step, 3 * (t - began))  # a huge folder: at most a quarter of a core
            self._due[job_id] = t + step
        due = min(self._due.values(), default=now + self.tick)
        return max(0.02, min(due - time.monotonic(), self.tick))  # new jobs: within a tick


def _cgroup_procs(pid: int) -> list[int]:
    """The processes in ``pid``'s cgroup (a container's, v1 ``pids`` or v2)."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        hid, controllers, path = line.split(":", 2)
        if hid == "0" and not controllers:
            procs = Path(f"/sys/fs/cgroup{path}/cgroup.procs")
        elif "pids" in controllers.split(","):
            procs = Path(f"/sys/fs/cgroup/pids{path}/cgroup.procs")
        else:
            continue
        try:
            return [int(p) for p in procs.read_text().split()]
        except (OSError, ValueError):
            continue
    return [pid]


def unlinked_bytes(pids: list[int], dev: int) -> int:
    """Disk held by deleted files on device ``dev`` that ``pids`` still have open
    (write, delete, keep writing: invisible to a walk of the folder)."""
    seen: set[int] = set()
    total = 0
    for pid in pids:
        try:
            with os.scandir(f"/proc/{pid}/fd") as it:
                fds = [e.path for e in it]
        except OSError:
            continue
        for fd in fds:
            try:
                st = os.stat(fd)  # the open file itself, through /proc's link
            except OSError:
                continue
            if (stat.S_ISREG(st.st_mode) and st.st_nlink == 0 and st.st_dev == dev
                    and st.st_ino not in seen):
                seen.add(st.st_ino)
                total += st.st_blocks * 512
    return total
