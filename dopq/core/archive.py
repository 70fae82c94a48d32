"""Untrusted job archives: unpack a zip safely, hash and inspect a build context.

An uploaded zip is hostile until proven otherwise. ``unpack`` checks every entry
*before* writing anything (names, types, flags, declared sizes), then streams the
data out while counting the bytes actually produced, so a lying header cannot
push it past the limits. It never creates links, never keeps modes beyond the
executable bit, and on any rejection leaves nothing behind under ``dest``.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import re
import shutil
import stat
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from dopq.core.errors import JobRejected

GiB = 1024**3
CONFIG_NAME = "container_config.json"
DOCKERFILE_NAME = "Dockerfile"
IMAGE_TAR_NAME = "image.tar"
MAX_CONFIG_BYTES = 1024**2

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
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)

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


@dataclass
class Context:
    """A build context as unpacked: its root and the files DoPQ looks for."""

    root: Path
    dockerfile: Path | None
    config: dict[str, Any] = field(default_factory=dict)
    image_tar: Path | None = None


@dataclass(frozen=True)
class _Entry:
    info: zipfile.ZipInfo
    parts: tuple[str, ...]
    is_dir: bool
    mode: int  # the mode the file or folder is written with


def unpack(zip_path: Path, dest: Path, limits: ArchiveLimits) -> Path:
    """Unpack ``zip_path`` into ``dest`` and return the build context root.

    ``dest`` must not exist or be an empty folder (a caller bug otherwise:
    ``ValueError``). The root is the single top-level folder when the archive
    holds only that (users zip the folder itself), else ``dest``. Every refusal
    is a ``JobRejected``; after one, ``dest`` is gone (if this call created it)
    or empty again.
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
            _extract(zf, entries, real_dest, limits.max_unpacked_bytes)
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


def load_config(data: bytes) -> dict[str, Any]:
    """``container_config.json``'s bytes as a dict (``JobRejected`` says what is wrong)."""
    return _load_config(data)


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


def _extract(zf: zipfile.ZipFile, entries: list[_Entry], dest: Path, limit: int) -> None:
    made: set[tuple[str, ...]] = set()
    written = 0
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


def tree(
    root: Path, choose: Callable[[str, bool], tuple[bool, bool]] | None = None,
) -> Iterator[tuple[str, Path, os.stat_result]]:
    """Yield (relative posix path, path, lstat) below ``root``, sorted, links not followed.

    ``choose(rel, is_dir)`` says whether an entry is listed and whether a folder
    is walked into (``.dockerignore`` can leave a folder out yet keep files below
    it); without it, everything is listed and walked.
    """
    items: list[tuple[str, Path, os.stat_result]] = []
    stack = [root]
    while stack:
        folder = stack.pop()
        with os.scandir(folder) as it:
            for item in it:
                path = Path(item.path)
                st = item.stat(follow_symlinks=False)
                rel = path.relative_to(root).as_posix()
                is_dir = stat.S_ISDIR(st.st_mode)
                listed, walked = (True, is_dir) if choose is None else choose(rel, is_dir)
                if listed:
                    items.append((rel, path, st))
                if is_dir and walked:
                    stack.append(path)
    items.sort(key=lambda item: os.fsencode(item[0]))
    yield from items


def context_hash(root: Path) -> str:
    """SHA-256 of a build context: sorted paths, the executable bit and the contents.

    Independent of mtimes, owners and the order the files arrived in, so an
    identical folder maps to the same hash and its image can be reused.
    """
    digest = hashlib.sha256(b"dopq-context-v1\0")
    for rel, path, st in tree(Path(root)):
        name = os.fsencode(rel)
        if stat.S_ISDIR(st.st_mode):
            digest.update(b"d\0" + name + b"\0")
        elif stat.S_ISREG(st.st_mode):
            exe = b"x" if st.st_mode & 0o100 else b"-"
            digest.update(b"f\0" + name + b"\0" + exe + b"\0" + _file_digest(path))
        elif stat.S_ISLNK(st.st_mode):
            digest.update(b"l\0" + name + b"\0" + os.fsencode(os.readlink(path)) + b"\0")
    return digest.hexdigest()


def _file_digest(path: Path) -> bytes:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").digest()


def zip_folder(folder: Path, out: Path,
               files: Iterable[tuple[str, Path, os.stat_result]] | None = None) -> Path:
    """Zip the contents of ``folder`` (or just ``files``, as ``tree`` yields them:
    what ``.dockerignore`` leaves, ``dopq.core.dockerignore``) into ``out``; return ``out``.

    Deterministic: sorted entries, a fixed timestamp, modes reduced to 0o644/0o755.
    Symlinks and special files are skipped, as the server would refuse them.
    """
    folder = Path(folder)
    out = Path(out)
    if not folder.is_dir():
        raise JobRejected(f"not a folder: {folder}")
    out_real = out.resolve()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for rel, path, st in tree(folder) if files is None else files:
            if path.resolve() == out_real:
                continue
            if stat.S_ISDIR(st.st_mode):
                info = zipfile.ZipInfo(rel + "/", date_time=_ZIP_EPOCH)
                info.external_attr = ((stat.S_IFDIR | 0o755) << 16) | 0x10
                info.create_system = 3
                zf.writestr(info, b"")
            elif stat.S_ISREG(st.st_mode):
                info = zipfile.ZipInfo(rel, date_time=_ZIP_EPOCH)
                perm = 0o755 if st.st_mode & 0o100 else 0o644
                info.external_attr = (stat.S_IFREG | perm) << 16
                info.create_system = 3
                info.compress_type = zipfile.ZIP_DEFLATED
                info.file_size = st.st_size  # lets zipfile pick zip64 for big files
                with open(path, "rb") as src, zf.open(info, "w") as dst:
                    shutil.copyfileobj(src, dst, _CHUNK)
    return out


def inspect_context(root: Path) -> Context:
    """Read ``container_config.json`` and note the Dockerfile and image tar at ``root``.

    Whether a Dockerfile is *required* depends on ``build_flag``; that check is
    left to the spec and build steps.
    """
    root = Path(root)
    config_path = root / CONFIG_NAME
    try:
        st = os.lstat(config_path)
    except FileNotFoundError:
        raise JobRejected(f"{CONFIG_NAME} is missing at the top of the archive") from None
    if not stat.S_ISREG(st.st_mode):
        raise JobRejected(f"{CONFIG_NAME} is not a regular file")
    if st.st_size > MAX_CONFIG_BYTES:
        raise JobRejected(f"{CONFIG_NAME} is larger than {MAX_CONFIG_BYTES} bytes")
    config = _load_config(config_path.read_bytes())
    return Context(
        root=root,
        dockerfile=_regular_file(root / DOCKERFILE_NAME),
        config=config,
        image_tar=_regular_file(root / IMAGE_TAR_NAME),
    )


def _load_config(data: bytes) -> dict[str, Any]:
    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj: dict[str, Any] = {}
        for key, value in pairs:
            if key in obj:
                raise JobRejected(f"{CONFIG_NAME}: duplicate key {_show(key)}")
            obj[key] = value
        return obj

    def no_constant(name: str) -> Any:
        raise JobRejected(f"{CONFIG_NAME}: {name} is not valid JSON")

    try:
        text = data.decode("utf-8-sig")  # tolerate the BOM that Windows editors write
        config = json.loads(text, object_pairs_hook=no_duplicates, parse_constant=no_constant)
    except UnicodeDecodeError:
        raise JobRejected(f"{CONFIG_NAME} is not UTF-8 text") from None
    except json.JSONDecodeError as err:
        raise JobRejected(
            f"{CONFIG_NAME} is not valid JSON: line {err.lineno} column {err.colno}: {err.msg}"
        ) from None
    except RecursionError:
        raise JobRejected(f"{CONFIG_NAME} is nested too deeply") from None
    if not isinstance(config, dict):
        raise JobRejected(f"{CONFIG_NAME} must hold a JSON object, not {type(config).__name__}")
    return config


def _regular_file(path: Path) -> Path | None:
    try:
        return path if stat.S_ISREG(os.lstat(path).st_mode) else None
    except OSError:
        return None
