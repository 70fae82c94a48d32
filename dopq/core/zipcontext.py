"""A build context read straight from an uploaded zip, never unpacked to disk.

``ZipContext.open`` checks the archive exactly as ``dopq.core.archive.unpack``
does (``_open_zip``, ``_plan``: the same refusals, word for word) and finds the
same root folder. Then, with nothing written anywhere:

- ``read`` gives a file at the root (``container_config.json``, the Dockerfile,
  ``.dockerignore``), its bytes counted as they are decoded, up to a cap;
- ``verify`` reads every file once (CRC checked, bytes actually produced
  counted against ``max_unpacked_bytes``, sizes recorded) and computes the
  context hash: the very value ``context_hash(unpack(...))`` gives, since it
  lists what the unpack would create (folders, also those only implied by a
  file's path, files with their executable bit; never a link);
- ``tar`` streams the build context to the engine in pieces of at most
  ``_CHUNK`` bytes, ``.dockerignore`` applied to the relative paths as
  ``dockerignore.context_files`` applies it to a folder. Stored entries are
  read directly from the file, deflated ones decompressed as they go; each
  file must give the very size ``verify`` found, and a small one (the
  Dockerfile, whose base images the server checks) the very bytes.

Two passes over the zip (it is in the page cache by then) replace writing a
checkpoint of gigabytes to disk and reading it back. The file is watched for
changes between them. The Provider makes it one pass: with ``decide`` set,
``tar`` checks and hashes each byte on its way and calls ``decide(hash)``
before the tar's end marker (``_one_pass``), so the hash no longer delays the
build. Every failure is a one-line ``JobRejected``.

The pass that is the zip's last read (the one pass, or the tar after
``verify``) gives its pages back to the page cache behind it (``_DropBehind``):
the zip is deleted after the build, and its pages would otherwise sit beside
the engine's copy of the context and the layer the engine writes from it.
"""

from __future__ import annotations

import hashlib
import os
import struct
import tarfile
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dopq.core import archive
from dopq.core.context import CONFIG_NAME, MAX_CONFIG_BYTES, _header, load_config
from dopq.core.dockerignore import IGNORE_FILE, MAX_IGNORE_BYTES, IgnoreRules
from dopq.core.errors import DopqError, JobRejected

_CHUNK = 1024**2
_RECHECK = MAX_CONFIG_BYTES  # files up to this size are hashed again as they are sent
_LOCAL_HEADER = struct.Struct("<4s5H3L2H")  # a local file header, before its name
_DROP_EVERY = 16 * 1024**2  # bytes read between two drops of the pages behind

Parts = tuple[str, ...]


@dataclass(frozen=True)
class _Item:
    """One path of the context as the unpack would create it (relative to the root)."""

    rel: str
    is_dir: bool
    entry: archive._Entry | None  # None: a folder only implied by the paths below it


class ZipContext:
    """A checked zip read as the build context below its root folder."""

    def __init__(self, zf: zipfile.ZipFile, entries: list[archive._Entry],
                 limits: archive.ArchiveLimits, mtime: int) -> None:
        self._zf = zf
        self._limit = limits.max_unpacked_bytes
        self._mtime = mtime
        top = archive._root_folder(entries)
        skip = 1 if top else 0
        items: dict[Parts, _Item] = {}
        self._files: list[_Item] = []  # in the archive's order, as the unpack reads them
        for entry in entries:
            parts = entry.parts[skip:]
            if not parts:
                continue  # the root folder's own entry
            for i in range(1, len(parts)):  # the folders the unpack makes on the way
                items.setdefault(parts[:i], _Item("/".join(parts[:i]), True, None))
            items[parts] = _Item("/".join(parts), entry.is_dir, entry)
            if not entry.is_dir:
                self._files.append(items[parts])
        # The order of ``context.tree``: by the file system's bytes of the path.
        self._items = sorted(items.values(), key=lambda item: os.fsencode(item.rel))
        self._by_rel = {item.rel: item for item in self._items}
        self._sizes: dict[str, int] = {}  # rel -> the size verify found
        self._digests: dict[Path, bytes] = {}  # Path(rel) -> the SHA-256 verify found
        self._offsets: dict[str, int] = {}  # rel -> where a stored entry's data starts
        self._hash: str | None = None
        self._stamp = self._file_stamp()
        self._seen: dict[str, bytes] = {}  # rel -> SHA-256 of what ``read`` gave
        # Set by the Provider: ``tar`` then checks and hashes in its one pass and calls
        # this with the context hash before the end marker (``_one_pass``).
        self.decide: Callable[[str], None] | None = None

    @classmethod
    def open(cls, zip_path: Path, limits: archive.ArchiveLimits, mtime: int = 0) -> ZipContext:
        """Check ``zip_path`` as ``unpack`` does, without writing anything.

        ``mtime``: the time the tar gives every entry (the unpack gave the time
        of unpacking)."""
        zf = archive._open_zip(Path(zip_path), limits)
        try:
            entries = archive._plan(zf.infolist(), limits)
            return cls(zf, entries, limits, mtime)
        except BaseException:
            zf.close()
            raise

    def close(self) -> None:
        self._zf.close()

    def __enter__(self) -> ZipContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the root's own files ---------------------------------------------------
    def kind(self, name: str) -> str | None:
        """'file', 'dir' or None: what ``name`` (a path below the root) would be."""
        item = self._by_rel.get(name)
        return None if item is None else ("dir" if item.is_dir else "file")

    def read(self, name: str, cap: int, too_big: DopqError) -> bytes | None:
        """The bytes of the file ``name`` below the root (None: no such file; a folder
        counts as none), read and counted as they are decoded; more than ``cap``
        bytes: ``too_big`` is raised. After ``verify``, they must be the bytes it hashed."""
        item = self._by_rel.get(name)
        if item is None or item.is_dir or item.entry is None:
            return None
        chunks, size = [], 0
        for chunk in archive._chunks(self._zf, item.entry.info):
            size += len(chunk)
            if size > cap:
                raise too_big
            chunks.append(chunk)
        data = b"".join(chunks)
        self._same_as_hashed(item, data)
        self._seen[name] = hashlib.sha256(data).digest()
        return data

    def config(self) -> dict[str, Any]:
        """``container_config.json`` as ``context.inspect_context`` reads it, same refusals."""
        kind = self.kind(CONFIG_NAME)
        if kind is None:
            raise JobRejected(f"{CONFIG_NAME} is missing at the top of the archive")
        if kind != "file":
            raise JobRejected(f"{CONFIG_NAME} is not a regular file")
        data = self.read(CONFIG_NAME, MAX_CONFIG_BYTES, JobRejected(
            f"{CONFIG_NAME} is larger than {MAX_CONFIG_BYTES} bytes"))
        return load_config(data or b"")

    # -- the hash pass ------------------------------------------------------------
    @property
    def context_hash(self) -> str:
        """The context hash (``verify`` first)."""
        if self._hash is None:
            raise ValueError("ZipContext.verify() has not run")
        return self._hash

    def verify(self) -> str:
        """Read every file once, as the unpack would write it, and return the context
        hash (the value of ``context_hash(unpack(...))``). The refusals are the
        unpack's: a corrupt entry, more bytes than the limit."""
        if self._hash is not None:
            return self._hash
        produced = [0]
        with archive._Hasher(self._digests) as hasher:
            for item in self._files:
                assert item.entry is not None
                size = sum(len(chunk) for chunk in self._hashed(item, hasher, produced))
                self._sizes[item.rel] = size
                if item.entry.info.compress_type == zipfile.ZIP_STORED:
                    start = self._data_offset(item.entry.info, size)
                    if start is not None:
                        self._offsets[item.rel] = start
        self._check_unchanged()
        self._hash = self._final_hash()
        return self._hash

    def _hashed(self, item: _Item, hasher: archive._Hasher, produced: list[int],
                chunk: int = _CHUNK) -> Iterator[bytes]:
        """A file's bytes as decoded (its CRC checked at its end by ``zipfile``), in
        pieces of at most ``chunk``, each hashed and counted in ``produced[0]`` against
        the limit; its digest kept once it is read whole."""
        assert item.entry is not None
        for data in _pieces_of(archive._chunks(self._zf, item.entry.info), chunk):
            produced[0] += len(data)
            if produced[0] > self._limit:  # never trust the declared sizes
                raise JobRejected(f"archive unpacks to more than {self._limit} bytes")
            hasher.update(data)
            yield data
        hasher.done(Path(item.rel))

    def _final_hash(self) -> str:
        """``context.context_hash`` of the unpacked folder, from the files' digests."""
        digest = hashlib.sha256(b"dopq-context-v1\0")
        for item in self._items:
            name = os.fsencode(item.rel)
            if item.is_dir:
                digest.update(b"d\0" + name + b"\0")
            else:
                assert item.entry is not None
                exe = b"x" if item.entry.mode & 0o100 else b"-"
                digest.update(b"f\0" + name + b"\0" + exe + b"\0"
                              + self._digests[Path(item.rel)])
        return digest.hexdigest()

    def _data_offset(self, info: zipfile.ZipInfo, size: int) -> int | None:
        """Where a stored entry's bytes begin (after its local header), for ``tar``
        to read them directly; None (read through ``zipfile`` again) when its
        sizes disagree."""
        fd = self._fd()
        try:
            head = os.pread(fd, _LOCAL_HEADER.size, info.header_offset)
            fields = _LOCAL_HEADER.unpack(head)
        except (OSError, struct.error) as err:
            raise self._corrupt(info, err) from None
        if fields[0] != b"PK\x03\x04":
            raise self._corrupt(info, "bad local header")
        start = info.header_offset + _LOCAL_HEADER.size + fields[-2] + fields[-1]
        if info.compress_size != size or start + size > self._stamp[0]:
            return None
        return start

    # -- the tar pass -------------------------------------------------------------
    def tar(self, always: Iterable[str] = ("Dockerfile",), chunk: int = _CHUNK) -> Iterator[bytes]:
        """The tar ``docker build`` would send of the unpacked folder: ``.dockerignore``
        applied (``always``, names at the root, sent whatever it says). Verifies first,
        or with ``decide`` set checks and hashes in the same pass (``_one_pass``);
        a bad ``.dockerignore`` raises ``DopqError`` here, before any piece."""
        decide = self.decide if self._hash is None else None
        if decide is None:
            self.verify()
        listed = self._listing(self._rules(), frozenset(always))
        return self._pieces(listed, chunk) if decide is None else \
            self._one_pass(listed, chunk, decide)

    def _one_pass(self, items: list[_Item], chunk: int,
                  decide: Callable[[str], None]) -> Iterator[bytes]:
        """The tar and ``verify`` in one read of the zip: each file's bytes are counted
        against the limit, hashed and CRC-checked (at its end, by ``zipfile``) as they
        go out; the files ``.dockerignore`` leaves out are read and hashed after; then
        ``decide(context hash)`` (which may raise: the image exists already) and only
        then the end marker. The engine uses a context only once its tar has ended:
        anything raised before the marker cuts the stream, and the engine throws the
        part it got away (``unexpected EOF``), so nothing unchecked is ever built."""
        produced = [0]

        def read(item: _Item, hasher: archive._Hasher) -> Iterator[bytes]:
            yield from self._hashed(item, hasher, produced, chunk)
            seen = self._seen.get(item.rel)  # the Dockerfile whose bases were checked
            if seen is not None and seen != self._digests[Path(item.rel)]:
                raise self._changed()

        sent = {item.rel for item in items}
        drop = _DropBehind(self._fd())
        with archive._Hasher(self._digests) as hasher:
            for item in items:
                if item.entry is None or item.is_dir:
                    yield self._tar_header(item, 0)
                    continue
                size = item.entry.info.file_size
                yield self._tar_header(item, size)
                got = 0
                for data in read(item, hasher):
                    got += len(data)
                    if got > size:
                        raise self._corrupt(item.entry.info, "more bytes than its header says")
                    yield data
                    drop.reached(self._position())
                if got != size:
                    raise self._corrupt(item.entry.info, "fewer bytes than its header says")
                if size % tarfile.BLOCKSIZE:
                    yield bytes(tarfile.BLOCKSIZE - size % tarfile.BLOCKSIZE)
            for item in self._files:
                if item.rel not in sent:
                    for _ in read(item, hasher):
                        pass
        self._check_unchanged()
        drop.reached(None)
        self._hash = self._final_hash()
        decide(self._hash)
        yield bytes(2 * tarfile.BLOCKSIZE)  # the end-of-archive marker

    def _rules(self) -> IgnoreRules | None:
        """``.dockerignore`` as ``dockerignore.read_rules`` reads it from a folder."""
        data = self.read(IGNORE_FILE, MAX_IGNORE_BYTES,
                         DopqError(f"{IGNORE_FILE}: larger than {MAX_IGNORE_BYTES} bytes"))
        if data is None:
            return None
        try:
            return IgnoreRules.parse(data.decode("utf-8"))
        except UnicodeDecodeError:
            raise DopqError(f"{IGNORE_FILE}: not UTF-8 text") from None

    def _listing(self, rules: IgnoreRules | None, keep: frozenset[str]) -> list[_Item]:
        """What ``context.tree(folder, choose)`` lists: a path is seen only when every
        folder above it is walked into; an excluded folder is walked only when a
        ``!`` line may bring back something below it."""
        walked: dict[str, bool] = {}
        out = []
        for item in sorted(self._items, key=lambda i: i.rel.count("/")):  # parents first
            parent = item.rel.rpartition("/")[0]
            if parent and not walked[parent]:
                if item.is_dir:
                    walked[item.rel] = False
                continue
            if rules is None or item.rel in keep or not rules.excluded(item.rel):
                out.append(item)
                if item.is_dir:
                    walked[item.rel] = True
            elif item.is_dir:
                walked[item.rel] = rules.may_bring_back_below(item.rel)
        out.sort(key=lambda i: os.fsencode(i.rel))
        return out

    def _pieces(self, items: list[_Item], chunk: int) -> Iterator[bytes]:
        sent = 0
        drop = _DropBehind(self._fd())
        for item in items:
            if item.entry is None or item.is_dir:
                yield self._tar_header(item, 0)
                continue
            size = self._sizes[item.rel]
            pieces = self._data(item, size, chunk)
            if size <= _RECHECK:  # the Dockerfile and the like: exactly the bytes checked
                data = b"".join(pieces)
                self._same_as_hashed(item, data)
                pieces = _pieces_of([data], chunk)
            yield self._tar_header(item, size)
            got = 0
            for data in pieces:
                got += len(data)
                sent += len(data)
                if got > size or sent > self._limit:
                    raise self._changed()
                yield data
                start = self._offsets.get(item.rel)
                drop.reached(self._position() if start is None else start + got)
            if got != size:
                raise self._changed()
            if size % tarfile.BLOCKSIZE:
                yield bytes(tarfile.BLOCKSIZE - size % tarfile.BLOCKSIZE)
        self._check_unchanged()
        drop.reached(None)
        yield bytes(2 * tarfile.BLOCKSIZE)  # the end-of-archive marker

    def _tar_header(self, item: _Item, size: int) -> bytes:
        """A member's header: a folder 0755, a file with the unpack's mode; root's."""
        info = tarfile.TarInfo(item.rel)
        info.mtime = self._mtime
        info.uid = info.gid = 0
        if item.is_dir or item.entry is None:
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
        else:
            info.mode = item.entry.mode
            info.size = size
        return _header(info)

    def _data(self, item: _Item, size: int, chunk: int) -> Iterator[bytes]:
        assert item.entry is not None
        start = self._offsets.get(item.rel)
        if start is None:  # deflated (or another method): decoded as it goes, CRC checked
            yield from _pieces_of(archive._chunks(self._zf, item.entry.info), chunk)
            return
        fd, done = self._fd(), 0
        while done < size:
            try:
                data = os.pread(fd, min(chunk, size - done), start + done)
            except OSError as err:
                raise self._corrupt(item.entry.info, err) from None
            if not data:
                raise self._changed()
            done += len(data)
            yield data

    # -- helpers --------------------------------------------------------------------
    def _same_as_hashed(self, item: _Item, data: bytes) -> None:
        """After ``verify``: ``data`` must be what it hashed for ``item`` (the file
        read again could have been rewritten through a descriptor its owner kept)."""
        known = self._digests.get(Path(item.rel))
        if self._hash is not None and known != hashlib.sha256(data).digest():
            raise self._changed()

    def _fd(self) -> int:
        fp = self._zf.fp
        if fp is None:
            raise ValueError("ZipContext is closed")
        return fp.fileno()

    def _position(self) -> int:
        """How far ``zipfile`` has read the file (its reads end where they stop)."""
        fp = self._zf.fp
        if fp is None:
            raise ValueError("ZipContext is closed")
        return fp.tell()

    def _file_stamp(self) -> tuple[int, int, int]:
        st = os.fstat(self._fd())
        return st.st_size, st.st_mtime_ns, st.st_ino

    def _check_unchanged(self) -> None:
        if self._file_stamp() != self._stamp:
            raise self._changed()

    @staticmethod
    def _changed() -> JobRejected:
        return JobRejected("the archive changed while it was read")

    @staticmethod
    def _corrupt(info: zipfile.ZipInfo, err: object) -> JobRejected:
        text = " ".join(str(err).split())[:200] or type(err).__name__
        return JobRejected(f"corrupt zip: entry {archive._show(info.orig_filename)}: {text}")


class _DropBehind:
    """Advise the kernel that the zip's bytes before ``pos`` are not needed again
    (``POSIX_FADV_DONTNEED``), every ``_DROP_EVERY`` bytes and once at the end.

    Clean pages are dropped at once. Dirty ones (an upload written a moment ago)
    are not: the advice starts their writeback, and a later call drops them. On a
    virtual machine whose host backs memory on first use, this is most of what a
    large context cost above ``docker build``: with the zip's pages kept, the
    engine's copy of the context and its new layer went to memory the guest had
    never touched (issue 17, item 5). Where the advice is not supported (tmpfs
    ignores it, some file systems refuse it) nothing changes."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.done = 0

    def reached(self, pos: int | None) -> None:
        """``pos``: how far the file has been read; None: all of it."""
        if self.done < 0 or (pos is not None and pos - self.done < _DROP_EVERY):
            return
        try:
            os.posix_fadvise(self.fd, 0, pos or 0, os.POSIX_FADV_DONTNEED)  # 0: to the end
        except OSError:
            self.done = -1  # refused here: never again for this file
            return
        self.done = pos or 0


def _pieces_of(chunks: Iterable[bytes], size: int) -> Iterator[bytes]:
    """``chunks`` again, none longer than ``size``."""
    for data in chunks:
        for at in range(0, len(data), size):
            yield data[at:at + size] if len(data) > size else data
