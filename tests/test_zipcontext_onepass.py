"""The Provider's one pass over a zip (``ZipContext.tar`` with ``decide`` set).

The hash pass and the tar are one read: every byte is checked, counted and
hashed on its way to the engine, and ``decide`` (the image cache) runs before
the tar's end marker. Nothing unchecked may be built: the engine uses a
context only once its tar has ended, and a stream cut before the marker is
thrown away (``unexpected EOF``), as the engine tests here show.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import hostile
import pytest
from hostile import RawEntry, raw_zip
from test_zipcontext import (
    ARCHIVES,
    IGNORES,
    LIMITS,
    MIB,
    _crc_broken,
    _engine_build,
    _members,
    _peak,
    _remove,
)

from dopq.core.errors import JobRejected
from dopq.core.zipcontext import ZipContext

MARKER = bytes(2 * tarfile.BLOCKSIZE)


class Stop(Exception):
    """What ``decide`` raises for a known context (the Provider's ``_Reuse``)."""


def _with_ignore(zipped: Path, text: str | None) -> Path:
    if text is not None:
        with zipfile.ZipFile(zipped, "a") as zf:
            top = {n.split("/")[0] for n in zf.namelist()}
            prefix = "job/" if top == {"job"} else ""
            zf.writestr(prefix + ".dockerignore", text)
    return zipped


@pytest.mark.parametrize("ignore", sorted(IGNORES))
@pytest.mark.parametrize("case", sorted(ARCHIVES))
def test_one_pass_sends_the_same_tar_and_finds_the_same_hash(
        case: str, ignore: str, tmp_path: Path) -> None:
    zipped = _with_ignore(ARCHIVES[case](tmp_path), IGNORES[ignore])
    with ZipContext.open(zipped, LIMITS, mtime=7) as zc:
        two = b"".join(zc.tar({"Dockerfile"}, chunk=64 * 1024))
        hashed = zc.context_hash
    seen: list[str] = []
    with ZipContext.open(zipped, LIMITS, mtime=7) as zc:
        zc.decide = seen.append
        one = b"".join(zc.tar({"Dockerfile"}, chunk=64 * 1024))
        assert zc.context_hash == hashed
    assert seen == [hashed]
    assert one == two and _members(one) == _members(two)


def _lying(tmp: Path) -> Path:
    return raw_zip(tmp / "lie.zip", [RawEntry("Dockerfile", b"FROM x\n"),
                                     RawEntry("big", b"x" * 100, declared_size=10)])


@pytest.mark.parametrize("build, words", [
    (_crc_broken, "corrupt zip: entry 'data.bin'"),
    (_lying, "corrupt zip"),
    (lambda tmp: raw_zip(tmp / "hidden.zip", [  # bad bytes in a file .dockerignore leaves out
        RawEntry("Dockerfile", b"FROM x\n"), RawEntry(".dockerignore", b"big\n"),
        RawEntry("big", b"x" * 100, declared_size=10)]), "corrupt zip"),
    (lambda tmp: raw_zip(tmp / "bomb.zip", [  # a deflated file far beyond its header
        RawEntry("Dockerfile", b"FROM x\n"),
        RawEntry("zeros.bin", zeros=20 * MIB, declared_size=100)]), "corrupt zip"),
])
def test_bad_data_stops_the_stream_before_its_end(build: Callable[[Path], Path], words: str,
                                                  tmp_path: Path) -> None:
    limits = LIMITS.__class__(16 * MIB, 16 * MIB, 20)
    decided: list[str] = []
    pieces: list[bytes] = []
    with ZipContext.open(build(tmp_path), limits) as zc:
        zc.decide = decided.append
        with pytest.raises(JobRejected) as info:
            for piece in zc.tar():
                pieces.append(piece)
    assert words in str(info.value) and "\n" not in str(info.value)
    assert not decided and (not pieces or pieces[-1] != MARKER)


def test_a_known_context_ends_the_stream_before_the_marker(tmp_path: Path) -> None:
    zipped = ARCHIVES["files_on_top"](tmp_path)
    pieces: list[bytes] = []

    def decide(_chash: str) -> None:
        raise Stop

    with ZipContext.open(zipped, LIMITS) as zc:
        zc.decide = decide
        with pytest.raises(Stop):
            for piece in zc.tar():
                pieces.append(piece)
    assert pieces and pieces[-1] != MARKER


def test_the_dockerfile_sent_is_the_one_read_for_its_check(tmp_path: Path) -> None:
    zipped = raw_zip(tmp_path / "j.zip", [
        RawEntry("Dockerfile", b"FROM dopq/busybox:latest\n", method=zipfile.ZIP_STORED),
        RawEntry("big.bin", b"x" * (2 * MIB), method=zipfile.ZIP_STORED)])
    with ZipContext.open(zipped, LIMITS) as zc:
        assert zc.read("Dockerfile", MIB, JobRejected("big")) == b"FROM dopq/busybox:latest\n"
        zc.read("big.bin", 4 * MIB, JobRejected("big"))  # no stale buffer of the Dockerfile left
        st = zipped.stat()  # rewritten in place, size and mtime kept
        raw = zipped.read_bytes().replace(b"FROM dopq/busybox:latest", b"FROM evil/busybox:latest")
        with open(zipped, "r+b") as fh:
            fh.write(raw)
        os.utime(zipped, ns=(st.st_atime_ns, st.st_mtime_ns))
        zc.decide = lambda _chash: None
        # zipfile's CRC from the directory read at open, or else the digest kept by read()
        with pytest.raises(JobRejected, match="Bad CRC|changed while it was read"):
            b"".join(zc.tar())


def test_memory_stays_flat_in_one_pass(tmp_path: Path) -> None:
    zipped = tmp_path / "big.zip"
    with zipfile.ZipFile(zipped, "w") as zf:
        zf.writestr("Dockerfile", "FROM scratch\n")
        info = zipfile.ZipInfo("model.bin")
        with zf.open(info, "w") as out:
            block = os.urandom(MIB)
            for _ in range(48):
                out.write(block)
    with ZipContext.open(zipped, LIMITS) as zc:
        zc.decide = lambda _chash: None
        sent, peak = _peak(lambda: sum(len(p) for p in zc.tar()))
    assert isinstance(sent, int) and sent > 48 * MIB and peak < 8 * MIB, peak / MIB


def _resident(path: Path) -> float:
    """The part of ``path``'s pages in the page cache now (``mincore``)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    size = path.stat().st_size
    pages = -(-size // mmap.PAGESIZE)
    with path.open("rb") as fh:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fh.fileno(), 0)
        assert addr not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
        try:
            vec = ctypes.create_string_buffer(pages)
            assert libc.mincore(addr, size, vec) == 0, os.strerror(ctypes.get_errno())
            return sum(b & 1 for b in vec.raw) / pages
        finally:
            libc.munmap(addr, size)


def _cached(path: Path) -> None:
    """``path`` written to disk and read back whole into the page cache."""
    with path.open("rb") as fh:
        os.fsync(fh.fileno())
        while fh.read(MIB):
            pass


@pytest.mark.parametrize("passes", ["one", "two"])
def test_the_last_read_gives_the_zips_pages_back(passes: str, tmp_path: Path) -> None:
    """The zip is deleted after its build: the pass that reads it last leaves none of
    its pages in the page cache, beside the engine's copy (issue 17, item 5)."""
    zipped = raw_zip(tmp_path / "ckpt.zip", [
        RawEntry("Dockerfile", b"FROM scratch\n"),
        RawEntry("model.ckpt", os.urandom(40 * MIB), method=zipfile.ZIP_STORED),
        RawEntry("notes.txt", b"a deflated file after the big one\n" * 20000)])
    _cached(zipped)
    fd = os.open(zipped, os.O_RDONLY)
    try:  # a file system that keeps its pages whatever the advice (tmpfs) has nothing to test
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    if _resident(zipped) > 0.5:
        pytest.skip("this file system ignores POSIX_FADV_DONTNEED")
    _cached(zipped)
    assert _resident(zipped) > 0.9
    with ZipContext.open(zipped, LIMITS) as zc:
        if passes == "one":
            zc.decide = lambda _chash: None
        else:
            zc.verify()
            assert _resident(zipped) > 0.9  # the first of two reads keeps them for the second
        pieces = zc.tar()
        first = next(pieces)
        assert first and _resident(zipped) > 0.9
        sent = len(first) + sum(len(p) for p in pieces)
    assert sent > 40 * MIB and _resident(zipped) < 0.05


@pytest.mark.docker
@pytest.mark.parametrize("how", ["bad_crc", "known"])
def test_the_engine_builds_nothing_from_a_stream_cut_before_its_end(
        how: str, tmp_path: Path, engine: None) -> None:
    """A bad CRC found at the end of a 3 MiB file, after its bytes went out, and a
    context found known at the very end: the engine is left with no image."""
    zipped = raw_zip(tmp_path / "job.zip", [
        RawEntry("Dockerfile", f"FROM {hostile.BASE_IMAGE}\nCOPY . /job\n".encode()),
        RawEntry("data.bin", b"A" * (3 * MIB), method=zipfile.ZIP_STORED)])
    if how == "bad_crc":
        raw = bytearray(zipped.read_bytes())
        raw[raw.index(b"A" * 4096) + 3 * MIB - 100] = ord("B")  # near the file's end
        zipped.write_bytes(bytes(raw))
    tag = f"dopqt-onepass/{os.urandom(6).hex()}:1"

    def decide(_chash: str) -> None:
        if how == "known":
            raise Stop

    try:
        with ZipContext.open(zipped, LIMITS) as zc:
            zc.decide = decide
            with pytest.raises(JobRejected if how == "bad_crc" else Stop):
                _engine_build(zc, tag)
        import docker

        with docker.APIClient(version="auto", timeout=60) as api:
            assert not api.images(name=tag)
    finally:
        _remove(tag)
