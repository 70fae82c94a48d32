"""What DoPQ writes on the host: the state folder, job outputs, the drop folder.

The server runs as root and jobs run as root in their containers, so every
path here is handled as if a job or a local user had planted something in it:

- The state folder is the server's alone: ``state_dir`` 0711 (users only pass
  through it to ``outputs/`` and ``inbox/``), every other child 0700, the
  database and its ``-wal``/``-shm`` files 0600, logs 0600.
- ``outputs/`` and ``outputs/<user>/`` are root's, 0711: a user cannot rename
  or swap a job folder (Docker follows a swapped-in symlink when it creates
  the bind mount). ``outputs/<user>/<id>/`` belongs to the user's Unix uid,
  0700. ``outputs/`` is a ``nosuid,nodev`` bind mount of itself, so nothing a
  job writes there raises rights on the host even while the job runs; when a
  job ends its folder is *sealed*: everything in it is given to the user,
  setuid/setgid bits are cleared, devices, FIFOs and sockets are removed, and
  a hard link to a file outside the folder is unlinked. Symlinks are never
  followed (fd-relative calls with ``O_NOFOLLOW``).
- ``inbox/`` is root's, 0711; ``inbox/<user>/`` is the user's, 0700.

The output folders themselves (made, measured, sealed) are ``dopq.server.outputs``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import pwd
import shutil
import stat
from pathlib import Path

from dopq.core.errors import DopqError
from dopq.core.settings import Settings

log = logging.getLogger("dopq.server.hostfs")

PRIVATE_DIRS = ("jobs", "uploads", "incoming", "rejected")
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND = 2, 4, 32, 4096
MARKER = "outputs.mount"  # the mount id of the outputs mount this server made


def unix_ids(settings: Settings, user: str) -> tuple[int, int] | None:
    """The Unix (uid, gid) of a DoPQ user (``users.uid_map``, else passwd), or None."""
    uid = settings.users.uid_map.get(user)
    if uid is None:
        try:
            pw = pwd.getpwnam(user)
        except KeyError:
            return None
        return pw.pw_uid, pw.pw_gid
    try:
        return uid, pwd.getpwuid(uid).pw_gid
    except KeyError:
        return uid, uid


def ensure_dir(path: Path, mode: int, owner: tuple[int, int] | None = None) -> None:
    """Make ``path`` a real folder with exactly ``mode`` (and owner); never via a symlink."""
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        pass
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        ensure_dir(path, mode, owner)
        return
    try:
        fd = os.open(path, DIR_FLAGS)
    except OSError as exc:
        raise DopqError(f"{path} is not a folder (or is a symbolic link): {exc.strerror}") from None
    try:
        if owner is not None:
            os.fchown(fd, *owner)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def outputs_root(settings: Settings) -> Path:
    """``<state_dir>/outputs``; on a cluster ``<slurm.shared_dir>/outputs``, which the
    nodes see (mount it ``nosuid,nodev`` there too), one folder per server in it
    (by the store's owner id: ``dopq.server.outputs.OutputFolders``)."""
    if settings.runtime.backend == "slurm":
        return Path(settings.slurm.shared_dir) / "outputs"
    return settings.state_path / "outputs"


def secure_state(settings: Settings) -> None:
    """Lay out the state folder with its modes; older installs are corrected."""
    state = settings.state_path
    ensure_dir(state, 0o711)
    for sub in PRIVATE_DIRS:
        ensure_dir(state / sub, 0o700)
    ensure_dir(outputs_root(settings), 0o711)
    ensure_dir(settings.inbox_path, 0o711)
    for suffix in ("", "-wal", "-shm", "-journal"):
        _chmod_db(Path(str(settings.db_path) + suffix))


def _chmod_db(path: Path) -> None:
    """0600 by path, never through a descriptor: closing any descriptor of a
    database file drops the process's SQLite (POSIX) locks on it. The state
    folder is root's alone, so nobody can swap a symlink in here."""
    try:
        if stat.S_ISREG(os.lstat(path).st_mode):
            os.chmod(path, 0o600)
    except OSError:
        pass


def private_file(path: Path) -> None:
    """Make an existing regular file 0600 (a symlink or a missing file is left alone)."""
    try:
        fd = os.open(path, FILE_FLAGS)
    except OSError:
        return
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


def lstat_at(name: str, dir_fd: int) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        return None


# -- the drop folder ------------------------------------------------------------------
def _file_problem(st: os.stat_result) -> str | None:
    mode = st.st_mode
    if stat.S_ISREG(mode):
        if st.st_nlink != 1:
            return f"has {st.st_nlink} hard links"
        return None
    for test, what in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return f"is {what}"
    return "is a device"


def _discard(path: Path) -> None:
    """Remove a refused name (never what a link points to)."""
    try:
        if stat.S_ISDIR(os.lstat(path).st_mode):
            shutil.rmtree(path, ignore_errors=True)  # fd-based: follows no symlink
        else:
            os.unlink(path)
    except OSError:
        pass


def check_taken(path: Path) -> tuple[int, str | None]:
    """(owner uid, problem) of a file in a private folder, judged on its open descriptor.

    A refused name is removed; a symlink is never followed, a FIFO never waited on.
    """
    try:
        fd = os.open(path, FILE_FLAGS)
    except OSError as exc:
        st = lstat_at(str(path), -100)  # AT_FDCWD
        problem = _file_problem(st) if st is not None else None
        _discard(path)
        return -1, problem or f"cannot be opened ({exc.strerror})"
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    problem = _file_problem(st)
    if problem is not None:
        _discard(path)
    return st.st_uid, problem


def take_file(src: Path, dst: Path) -> tuple[int, str | None]:
    """Move an inbox file into the private ``dst`` and judge it there (``check_taken``).

    The rename moves whatever the name holds at that instant out of the user's
    reach; only then is it opened. Across file systems the file is opened
    first and copied through that descriptor.
    """
    try:
        os.rename(src, dst)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    else:
        return check_taken(dst)
    fd = os.open(src, FILE_FLAGS)  # raises for a symlink: judged again at the next scan
    try:
        st = os.fstat(fd)
        problem = _file_problem(st)
        if problem is not None:
            _discard(src)
            return st.st_uid, problem
        out = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                      0o600)
        try:
            while chunk := os.read(fd, 1 << 20):
                os.write(out, chunk)
        finally:
            os.close(out)
    finally:
        os.close(fd)
    now = lstat_at(str(src), -100)
    if now is not None and (now.st_ino, now.st_dev) == (st.st_ino, st.st_dev):
        os.unlink(src)
    return st.st_uid, None


# -- the nosuid,nodev mount -------------------------------------------------------
def _mounts_at(path: Path) -> list[tuple[int, set[str]]]:
    """(mount id, options) of every mount at ``path``, the top one last."""
    target = os.path.realpath(path)
    found = []
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        parts = line.split()
        if len(parts) < 6:
            continue
        point = parts[4].encode().decode("unicode_escape")  # \040 and friends
        if point == target:
            found.append((int(parts[0]), set(parts[5].split(","))))
    return found


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _mount(source: str, target: str, flags: int) -> None:
    if _libc().mount(source.encode(), target.encode(), None, flags, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class OutputMount:
    """``outputs/`` bind-mounted onto itself ``nosuid,nodev`` (the server is root)."""

    def __init__(self, settings: Settings) -> None:
        self.root = outputs_root(settings)
        self.marker = settings.state_path / MARKER
        self.protected = False
        self.ours: int | None = None

    def _ours(self) -> int | None:
        try:
            return int(self.marker.read_text().strip())
        except (OSError, ValueError):
            return None

    def mount(self) -> bool:
        """Make sure ``outputs/`` is nosuid,nodev; idempotent; False when impossible."""
        mounts = _mounts_at(self.root)
        if mounts and {"nosuid", "nodev"} <= mounts[-1][1]:
            if self._ours() == mounts[-1][0]:
                self.ours = mounts[-1][0]  # left by a server that was killed
            self.protected = True
            return True
        path = str(self.root)
        try:
            _mount(path, path, MS_BIND)
            _mount(path, path, MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV)
        except OSError as exc:
            if _mounts_at(self.root) != mounts:
                self._umount()
            log.warning(
                "outputs: cannot mount %s nosuid,nodev (%s); falling back to clearing "
                "setuid bits and devices while jobs run and when they end", path, exc.strerror)
            return False
        self.ours = _mounts_at(self.root)[-1][0]
        self.marker.write_text(f"{self.ours}\n")
        os.chmod(self.marker, 0o600)
        self.protected = True
        log.info("outputs: %s is mounted nosuid,nodev", path)
        return True

    def unmount(self, force: bool = False) -> None:
        """Undo our mount (only ours); ``force``: the one a stopped server left."""
        mounts = _mounts_at(self.root)
        if force and self.ours is None:
            self.ours = self._ours()
        if self.ours is None or not mounts or mounts[-1][0] != self.ours:
            return
        if self._umount():
            self.marker.unlink(missing_ok=True)
            self.ours = None

    def _umount(self) -> bool:
        if _libc().umount2(str(self.root).encode(), 0) != 0:
            log.warning("outputs: cannot unmount %s: %s", self.root,
                        os.strerror(ctypes.get_errno()))
            return False
        return True


def unmount_all_under(folder: Path) -> list[str]:
    """Unmount every ``.../outputs`` mount a DoPQ server left below ``folder`` (tests)."""
    top = os.path.realpath(folder) + "/"
    done: list[str] = []
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return done
    for line in reversed(lines):
        point = line.split()[4].encode().decode("unicode_escape")
        if point.startswith(top) and point.endswith("/outputs"):
            if _libc().umount2(point.encode(), 0) == 0:
                done.append(point)
    return done
