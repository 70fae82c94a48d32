"""Untrusted job archives: unpack an uploaded zip safely, or peek into it.

An uploaded zip is hostile until proven otherwise. ``unpack`` checks every entry
*before* writing anything (names, types, flags, declared sizes), then streams the
data out while counting the bytes actually produced, so a lying header cannot
push it past the limits. It never creates links, never keeps modes beyond the
executable bit, and on any rejection leaves nothing behind under ``dest``.

What the unpacked folder holds (the build context: its config, hash, listing
and zipping) is ``dopq.core.context``; its names are importable from here too.
A context to build is not unpacked at all: ``dopq.core.zipcontext`` reads it
from the zip after the very checks below (``_open_zip``, ``_plan``).
"""

from __future__ import annotations

import hashlib
import lzma
import os
import re
import shutil
import stat
import struct
import zipfile
import zlib
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from dopq.core.context import (
    CONFIG_NAME,
    DOCKERFILE_NAME,
    IMAGE_TAR_NAME,
    MAX_CONFIG_BYTES,
    Context,
    context_hash,
    inspect_context,
    load_config,
    tree,
    zip_folder,
)
from dopq.core.errors import JobRejected

__all__ = ["CONFIG_NAME", "DOCKERFILE_NAME", "IMAGE_TAR_NAME", "MAX_CONFIG_BYTES",
           "ArchiveLimits", "Context", "context_hash", "inspect_context", "load_config",
           "peek", "tree", "unpack", "zip_folder"]

GiB = 1024**3
_CHUNK = 1024**2
_MAX_NAME_BYTES = 1024  # a whole entry name, in UTF-8
_MAX_PART_BYTES = 255  # one path component (Linux NAME_MAX)
_CD_BYTES_PER_ENTRY = 1024  # generous bound on the central directory per allowed entry
_MACOS_JUNK = "__MACOSX"  # resource forks added by macOS's Archive Utility; never written
_DRIVE = re.compile(r"^[A-Za-z]:")
_METHODS = frozenset(
    {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}
)
_ENCRYPTED_FLAGS = 0x0001 | 0x0040  # traditional and strong encryption

# zipfile parses hostile bytes with a grab-bag of exceptions; all mean "bad zip".
_ZIP_ERRORS: tuple[type[BaseException], ...] = (
    zipfile.BadZipFile,
    zlib.error,
    lzma.LZMAError,
    struct.error,
    EOFError,
    OSError,
    ValueError,
    ArithmeticError,
    LookupError,
    NotImplementedError,
    RuntimeError,
)


@dataclass
class ArchiveLimits:
    """What one uploaded archive may cost; sizes in bytes."""

    max_archive_bytes: int = 2 * GiB
    max_unpacked_bytes: int = 8 * GiB
    max_entries: int = 20000


@dataclass(frozen=True)
class _Entry:
    info: zipfile.ZipInfo
    parts: tuple[str, ...]
    is_dir: bool
    mode: int  # the mode the file or folder is written with


def unpack(zip_path: Path, dest: Path, limits: ArchiveLimits,
           digests: dict[Path, bytes] | None = None) -> Path:
    """Unpack ``zip_path`` into ``dest`` and return the build context root.

    ``dest`` must not exist or be an empty folder (a caller bug otherwise:
    ``ValueError``). The root is the single top-level folder when the archive
    holds only that (users zip the folder itself), else ``dest``. Every refusal
    is a ``JobRejected``; after one, ``dest`` is gone (if this call created it)
    or empty again. ``digests``, when given, receives the SHA-256 of every file
    written (by its path), taken from the bytes on their way to disk, so
    ``context_hash(root, digests)`` need not read a large context again.
    """
    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ValueError(f"unpack destination is not an empty folder: {dest}")
    created = not dest.exists()
    dest.mkdir(mode=0o755, parents=True, exist_ok=True)
    real_dest = dest.resolve()
    try:
        with _open_zip(Path(zip_path), limits) as zf:
            entries = _plan(zf.infolist(), limits)
            _extract(zf, entries, real_dest, limits.max_unpacked_bytes, digests)
    except BaseException:
        _wipe(real_dest, remove_self=created)
        raise
    return real_dest / _root_folder(entries)


def peek(zip_path: Path, limits: ArchiveLimits, names: tuple[str, ...] = (
        CONFIG_NAME, DOCKERFILE_NAME)) -> tuple[set[str], dict[str, bytes]]:
    """Without unpacking: (the file names at the context root, the bytes of ``names``
    found there). Every entry is checked as ``unpack`` checks it; each file read
    is at most ``MAX_CONFIG_BYTES``. For the verdict at submit time."""
    with _open_zip(Path(zip_path), limits) as zf:
        entries = _plan(zf.infolist(), limits)
        top = tuple(p for p in [_root_folder(entries)] if p)
        files = {e.parts[-1]: e for e in entries
                 if not e.is_dir and e.parts[:-1] == top}
        data: dict[str, bytes] = {}
        for name in names:
            if name in files:
                chunks, size = [], 0
                for chunk in _chunks(zf, files[name].info):
                    size += len(chunk)
                    if size > MAX_CONFIG_BYTES:
                        raise JobRejected(f"{name} is larger than {MAX_CONFIG_BYTES} bytes")
                    chunks.append(chunk)
                data[name] = b"".join(chunks)
    return set(files), data


def _open_zip(zip_path: Path, limits: ArchiveLimits) -> zipfile.ZipFile:
    try:
        st = zip_path.stat()
    except OSError as err:
        raise JobRejected(f"archive cannot be read: {err.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise JobRejected("archive is not a regular file")
    if st.st_size > limits.max_archive_bytes:
        raise JobRejected(
            f"archive is {st.st_size} bytes, over the limit of {limits.max_archive_bytes}"
        )
    try:
        with open(zip_path, "rb") as fp:
            entries, cd_size = _end_record(fp, st.st_size)
        if entries > limits.max_entries:
            raise JobRejected(
                f"archive has {entries} entries, over the limit of {limits.max_entries}"
            )
        if cd_size > max(limits.max_entries * _CD_BYTES_PER_ENTRY, MAX_CONFIG_BYTES):
            raise JobRejected("archive directory is too large")
        return zipfile.ZipFile(zip_path)
    except _ZIP_ERRORS as err:
        raise JobRejected(f"not a valid zip file ({_one_line(err)})") from None


def _end_record(fp: BinaryIO, size: int) -> tuple[int, int]:
    """Read (entry count, central directory size) from the end-of-directory record.

    Done before ``ZipFile`` builds one object per entry, so that a small archive
    declaring millions of entries costs nothing.
    """
    tail_len = min(size, 22 + 0xFFFF)
    tail_start = size - tail_len
    fp.seek(tail_start)
    tail = fp.read(tail_len)
    pos = tail.rfind(b"PK\x05\x06")
    if pos < 0 or len(tail) - pos < 22:
        raise JobRejected("not a zip file")
    _, _, _, _, count, cd_size, _, _ = struct.unpack("<4s4H2LH", tail[pos : pos + 22])
    if count != 0xFFFF and cd_size != 0xFFFFFFFF:
        return count, cd_size
    # Zip64: a locator just before the record points at the 64-bit record.
    loc_at = tail_start + pos - 20
    if loc_at < 0:
        raise JobRejected("not a valid zip file (zip64 locator missing)")
    fp.seek(loc_at)
    loc = fp.read(20)
    if len(loc) != 20 or loc[:4] != b"PK\x06\x07":
        raise JobRejected("not a valid zip file (zip64 locator missing)")
    (rec_at,) = struct.unpack("<Q", loc[8:16])
    fp.seek(rec_at)
    rec = fp.read(56)
    if len(rec) != 56 or rec[:4] != b"PK\x06\x06":
        raise JobRejected("not a valid zip file (zip64 record missing)")
    count64, cd_size64 = struct.unpack("<QQ", rec[32:48])
    return count64, cd_size64


def _plan(infos: list[zipfile.ZipInfo], limits: ArchiveLimits) -> list[_Entry]:
    """Check every entry before anything is written; return what to write."""
    if not infos:
        raise JobRejected("archive is empty")
    if len(infos) > limits.max_entries:
        raise JobRejected(
            f"archive has {len(infos)} entries, over the limit of {limits.max_entries}"
        )
    entries: list[_Entry] = []
    seen: set[tuple[str, ...]] = set()
    files: set[tuple[str, ...]] = set()
    dirs: set[tuple[str, ...]] = set()
    declared = 0
    for info in infos:
        entry = _check_entry(info)
        if entry.parts in seen:
            raise JobRejected(f"entry {_show(info.orig_filename)}: duplicate name")
        seen.add(entry.parts)
        (dirs if entry.is_dir else files).add(entry.parts)
        dirs.update(entry.parts[:i] for i in range(1, len(entry.parts)))
        if not entry.is_dir:
            declared += info.file_size
        if entry.parts[0] != _MACOS_JUNK:
            entries.append(entry)
    clash = files & dirs
    if clash:
        name = "/".join(min(clash))
        raise JobRejected(f"entry {_show(name)} is both a file and a folder")
    if declared > limits.max_unpacked_bytes:
        raise JobRejected(
            f"archive unpacks to {declared} bytes, over the limit of {limits.max_unpacked_bytes}"
        )
    if not entries:
        raise JobRejected("archive is empty")
    return entries


def _check_entry(info: zipfile.ZipInfo) -> _Entry:
    """Refuse a name or type that could escape ``dest`` or is not a plain file/folder."""
    raw = info.orig_filename  # ZipInfo.filename is cut at the first NUL; this is not
    what = f"entry {_show(raw)}"
    if "\x00" in raw:
        raise JobRejected(f"{what}: name contains a NUL byte")
    if not raw.isprintable():
        raise JobRejected(f"{what}: name contains control characters")
    if "\\" in raw:
        raise JobRejected(f"{what}: backslash in name")
    if raw.startswith("/") or _DRIVE.match(raw):
        raise JobRejected(f"{what}: absolute path")
    is_dir = raw.endswith("/")
    parts = tuple((raw[:-1] if is_dir else raw).split("/"))
    if ".." in parts:
        raise JobRejected(f"{what}: '..' in path")
    if any(p in ("", ".") for p in parts):
        raise JobRejected(f"{what}: empty or '.' path component")
    if len(raw.encode()) > _MAX_NAME_BYTES or any(
        len(p.encode()) > _MAX_PART_BYTES for p in parts
    ):
        raise JobRejected(f"{what}: name too long")
    # The upper 16 bits hold a Unix st_mode when the writer set one.
    unix_mode = info.external_attr >> 16
    kind = stat.S_IFMT(unix_mode)
    if kind == stat.S_IFLNK:
        raise JobRejected(f"{what}: symlinks are not allowed")
    if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
        raise JobRejected(f"{what}: special files (devices, fifos, sockets) are not allowed")
    if (kind == stat.S_IFDIR) != is_dir and kind != 0:
        raise JobRejected(f"{what}: entry type does not match its name")
    if info.flag_bits & _ENCRYPTED_FLAGS:
        raise JobRejected(f"{what}: encrypted entries are not allowed")
    if info.compress_type not in _METHODS:
        raise JobRejected(f"{what}: unsupported compression method {info.compress_type}")
    if is_dir:
        mode = 0o755
    else:
        mode = 0o755 if unix_mode & 0o100 else 0o644  # keep only "executable"
    return _Entry(info, parts, is_dir, mode)


def _extract(zf: zipfile.ZipFile, entries: list[_Entry], dest: Path, limit: int,
             digests: dict[Path, bytes] | None) -> None:
    made: set[tuple[str, ...]] = set()
    written = 0
    with _Hasher(digests) as hasher:
        for entry in entries:
            folder = entry.parts if entry.is_dir else entry.parts[:-1]
            _make_dirs(dest, folder, made)
            target = dest.joinpath(*entry.parts)
            if not target.parent.resolve().is_relative_to(dest):
                raise JobRejected(f"entry {_show(entry.info.orig_filename)}: escapes the folder")
            if entry.is_dir:
                continue
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(target, flags, 0o600)
            with os.fdopen(fd, "wb") as out:
                os.fchmod(out.fileno(), entry.mode)  # exact mode, whatever the umask
                for chunk in _chunks(zf, entry.info):
                    written += len(chunk)
                    if written > limit:  # never trust the declared sizes
                        raise JobRejected(f"archive unpacks to more than {limit} bytes")
                    out.write(chunk)
                    hasher.update(chunk)
            hasher.done(target)


class _Hasher:
    """SHA-256 of each file written, taken on a second thread while the next chunk
    is read and written (hashlib, zlib's CRC and file writes all let go of the
    GIL on large buffers, so the two overlap where a second core is free). At
    most ``_IN_FLIGHT`` chunks wait: memory stays a few chunks whatever the size."""

    _IN_FLIGHT = 2
    _OFFLOAD_FROM = 256 * 1024

    def __init__(self, digests: dict[Path, bytes] | None) -> None:
        self.digests = digests
        self.pool = ThreadPoolExecutor(1, "unpack-hash") if digests is not None else None
        self.pending: deque[Future[None]] = deque()
        self.digest = hashlib.sha256()

    def __enter__(self) -> _Hasher:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def update(self, chunk: bytes) -> None:
        if self.pool is None:
            return
        if len(chunk) < self._OFFLOAD_FROM and not self.pending:
            self.digest.update(chunk)  # a small file: a thread's round trip would cost more
            return
        while len(self.pending) >= self._IN_FLIGHT:
            self.pending.popleft().result()
        self.pending.append(self.pool.submit(self.digest.update, chunk))  # one worker: in order

    def done(self, path: Path) -> None:
        """The file at ``path`` is complete: keep its digest, start the next."""
        if self.digests is None:
            return
        while self.pending:
            self.pending.popleft().result()
        self.digests[path] = self.digest.digest()
        self.digest = hashlib.sha256()


def _make_dirs(dest: Path, parts: tuple[str, ...], made: set[tuple[str, ...]]) -> None:
    for i in range(1, len(parts) + 1):
        key = parts[:i]
        if key in made:
            continue
        path = dest.joinpath(*key)
        try:
            os.mkdir(path, 0o755)
        except FileExistsError:
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                name = _show("/".join(key))
                raise JobRejected(f"entry {name} is both a file and a folder") from None
        os.chmod(path, 0o755)
        made.add(key)


def _chunks(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> Iterator[bytes]:
    """Yield an entry's bytes, turning any decoding failure into a rejection."""
    try:
        with zf.open(info) as src:
            while chunk := src.read(_CHUNK):
                yield chunk
    except _ZIP_ERRORS as err:
        raise JobRejected(
            f"corrupt zip: entry {_show(info.orig_filename)}: {_one_line(err)}"
        ) from None


def _root_folder(entries: list[_Entry]) -> str:
    """The single top-level folder, or '' when the archive has several things on top."""
    tops = {e.parts[0] for e in entries}
    if len(tops) != 1:
        return ""
    top = next(iter(tops))
    if any(e.parts == (top,) and not e.is_dir for e in entries):
        return ""  # a single top-level *file*
    return top


def _wipe(dest: Path, *, remove_self: bool) -> None:
    if remove_self:
        shutil.rmtree(dest, ignore_errors=True)
        return
    for child in dest.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


def _show(name: str, limit: int = 80) -> str:
    """Quote an untrusted name for a one-line message, escaped and shortened."""
    text = repr(name)
    return text if len(text) <= limit else text[: limit - 4] + "...'"


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text[:200]
