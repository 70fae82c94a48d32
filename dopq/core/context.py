"""The build context: a job's folder as DoPQ reads it, on either side.

The client lists it (``tree``, with ``.dockerignore``: ``dopq.core.dockerignore``)
and zips it (``zip_folder``, deterministic). For a folder, ``context_hash``
gives the hash under which an image built from the same files is reused,
``inspect_context`` and ``load_config`` read its ``container_config.json``
(strict JSON, no duplicate keys) and ``tar_stream`` sends it to the engine.
The Provider builds from the uploaded zip in place (``dopq.core.zipcontext``:
the same hash and tar, nothing unpacked); unpacking a zip, for an
``image.tar`` to load, is ``dopq.core.archive``'s.

A context may hold a checkpoint of gigabytes: every step works in pieces of
``_CHUNK`` bytes, so memory does not grow with it, and does it in one pass
(``tests/test_large_context.py``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from dopq.core.errors import JobRejected

CONFIG_NAME = "container_config.json"
DOCKERFILE_NAME = "Dockerfile"
IMAGE_TAR_NAME = "image.tar"
MAX_CONFIG_BYTES = 1024**2

_CHUNK = 1024**2
_SAMPLE = 64 * 1024  # bytes of each sample that decides whether a file is deflated
_SAMPLE_FROM = 1024**2  # smaller files are always deflated: it costs little
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


@dataclass
class Context:
    """A build context as unpacked: its root and the files DoPQ looks for."""

    root: Path
    dockerfile: Path | None
    config: dict[str, Any] = field(default_factory=dict)
    image_tar: Path | None = None


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


def context_hash(root: Path, known: Mapping[Path, bytes] | None = None) -> str:
    """SHA-256 of a build context: sorted paths, the executable bit and the contents.

    Independent of mtimes, owners and the order the files arrived in, so an
    identical folder maps to the same hash and its image can be reused.
    ``known``: SHA-256 digests of files by path, taken as they were written
    (``dopq.core.archive.unpack``); those files are not read again.
    """
    known = known or {}
    digest = hashlib.sha256(b"dopq-context-v1\0")
    for rel, path, st in tree(Path(root)):
        name = os.fsencode(rel)
        if stat.S_ISDIR(st.st_mode):
            digest.update(b"d\0" + name + b"\0")
        elif stat.S_ISREG(st.st_mode):
            exe = b"x" if st.st_mode & 0o100 else b"-"
            content = known.get(path) or _file_digest(path)
            digest.update(b"f\0" + name + b"\0" + exe + b"\0" + content)
        elif stat.S_ISLNK(st.st_mode):
            digest.update(b"l\0" + name + b"\0" + os.fsencode(os.readlink(path)) + b"\0")
    return digest.hexdigest()


def _file_digest(path: Path) -> bytes:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").digest()


def zip_folder(folder: Path, out: Path | BinaryIO,
               files: Iterable[tuple[str, Path, os.stat_result]] | None = None,
               ) -> Path | BinaryIO:
    """Zip the contents of ``folder`` (or just ``files``, as ``tree`` yields them:
    what ``.dockerignore`` leaves, ``dopq.core.dockerignore``) into ``out``, a path
    or a stream it may not seek in (a socket: sizes then follow each entry's data);
    return ``out``.

    Deterministic: sorted entries, a fixed timestamp, modes reduced to 0o644/0o755.
    Symlinks and special files are skipped, as the server would refuse them.
    A file whose samples deflate by less than a tenth (a checkpoint, an archive,
    media) is stored as it is (``_method``): deflate runs at some 40 MB/s and
    would gain nothing on it.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise JobRejected(f"not a folder: {folder}")
    out_real = Path(out).resolve() if isinstance(out, str | Path) else None
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for rel, path, st in tree(folder) if files is None else files:
            if out_real is not None and path.resolve() == out_real:
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
                info.file_size = st.st_size  # lets zipfile pick zip64 for big files
                with open(path, "rb") as src:
                    info.compress_type = _method(src, st.st_size)
                    with zf.open(info, "w") as dst:
                        shutil.copyfileobj(src, dst, _CHUNK)
    return out


def zip_bound(files: Iterable[tuple[str, Path, os.stat_result]]) -> int:
    """At most the bytes ``zip_folder`` makes of ``files``, whichever way it stores
    each (deflate's worst case, headers, descriptors, zip64 records)."""
    total = 1024
    for rel, _path, st in files:
        size = st.st_size if stat.S_ISREG(st.st_mode) else 0
        total += 2 * len(os.fsencode(rel)) + 256 + size + (size >> 10)
    return total


def _method(src: BinaryIO, size: int) -> int:
    """ZIP_STORED for a file that does not compress, judged by three samples (start,
    middle, end); ZIP_DEFLATED otherwise. Leaves ``src`` at its start."""
    if size < _SAMPLE_FROM:
        return zipfile.ZIP_DEFLATED
    raw = 0
    packed = 0
    for at in (0, size // 2, size - _SAMPLE):
        src.seek(max(at, 0))
        sample = src.read(_SAMPLE)
        raw += len(sample)
        packed += len(zlib.compress(sample, 1))
    src.seek(0)
    return zipfile.ZIP_STORED if packed > raw * 0.9 else zipfile.ZIP_DEFLATED


def tar_stream(files: Iterable[tuple[str, Path, os.stat_result]],
               chunk: int = _CHUNK) -> Iterator[bytes]:
    """The tar of ``files`` (as ``tree`` yields them) in pieces of at most ``chunk``
    bytes, each file read as its piece is asked for: what ``docker build`` sends the
    engine, with no copy of the context on disk or in memory (docker-py's own
    ``build(path=...)`` writes the whole tar to a temporary file first).

    Folders, regular files and symlinks (as links), with the mode, owner and
    mtime of their ``lstat``; other kinds are skipped. A file that shrank
    since it was listed raises ``OSError``; one that grew is cut at its listed size.
    """
    for rel, path, st in files:
        info = tarfile.TarInfo(rel)
        info.mode = stat.S_IMODE(st.st_mode)
        info.uid, info.gid = st.st_uid, st.st_gid
        info.mtime = int(st.st_mtime)
        if stat.S_ISDIR(st.st_mode):
            info.type = tarfile.DIRTYPE
            yield _header(info)
        elif stat.S_ISLNK(st.st_mode):
            info.type = tarfile.SYMTYPE
            info.linkname = os.readlink(path)
            yield _header(info)
        elif stat.S_ISREG(st.st_mode):
            info.size = st.st_size
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)  # as listed: no link
            with os.fdopen(fd, "rb") as src:
                yield _header(info)
                left = st.st_size
                while left:
                    data = src.read(min(chunk, left))
                    if not data:
                        raise OSError(f"{rel}: changed while it was sent")
                    left -= len(data)
                    yield data
            if st.st_size % tarfile.BLOCKSIZE:
                yield bytes(tarfile.BLOCKSIZE - st.st_size % tarfile.BLOCKSIZE)
    yield bytes(2 * tarfile.BLOCKSIZE)  # the end-of-archive marker


def _header(info: tarfile.TarInfo) -> bytes:
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


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
    config = load_config(config_path.read_bytes())
    return Context(
        root=root,
        dockerfile=_regular_file(root / DOCKERFILE_NAME),
        config=config,
        image_tar=_regular_file(root / IMAGE_TAR_NAME),
    )


def load_config(data: bytes) -> dict[str, Any]:
    """``container_config.json``'s bytes as a dict (``JobRejected`` says what is wrong)."""

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj: dict[str, Any] = {}
        for key, value in pairs:
            if key in obj:
                raise JobRejected(f"{CONFIG_NAME}: duplicate key {_quoted(key)}")
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


def _quoted(name: str, limit: int = 80) -> str:
    """Quote an untrusted name for a one-line message, escaped and shortened."""
    text = repr(name)
    return text if len(text) <= limit else text[: limit - 4] + "...'"
