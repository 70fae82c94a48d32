"""Large build contexts: zipped, unpacked, hashed and tarred in pieces, never whole.

A checkpoint of hundreds of MB goes from the client's folder to the engine
through ``zip_folder`` (stored, not deflated: it does not compress),
``unpack`` (its SHA-256 taken on the way to disk), ``context_hash`` (those
digests, no second read) and ``tar_stream`` (read as the engine asks). Each
step's Python allocations stay at a few MB whatever the file's size
(tracemalloc peak; not a timing). The Provider itself no longer unpacks a
context it builds: it hashes and tars it straight from the zip
(``dopq.core.zipcontext``, ``tests/test_zipcontext.py``); the folder steps
here remain the client's, and the unpack is an ``image.tar``'s.
"""

from __future__ import annotations

import io
import os
import tarfile
import tracemalloc
import uuid
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hostile import BASE_IMAGE

from dopq.core.archive import ArchiveLimits, context_hash, unpack, zip_folder
from dopq.core.context import tar_stream, tree
from dopq.core.dockerignore import context_files

MIB = 2**20
LIMITS = ArchiveLimits(max_archive_bytes=2 * 1024 * MIB, max_unpacked_bytes=2 * 1024 * MIB)


def _random_file(path: Path, size: int) -> None:
    with path.open("wb") as fh:
        left = size
        while left:
            n = min(left, 8 * MIB)
            fh.write(os.urandom(n))
            left -= n


def _folder(tmp: Path, big: int = 3 * MIB) -> Path:
    job = tmp / "job"
    (job / "sub" / "deeper").mkdir(parents=True)
    (job / "Dockerfile").write_text("FROM busybox\nCOPY . /job\n")
    (job / "container_config.json").write_text('{"name": "ckpt"}')
    (job / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (job / "run.sh").chmod(0o755)
    (job / "notes.txt").write_text("words " * 400_000)  # 2.4 MB that deflates well
    (job / "sub" / "deeper" / "empty").write_bytes(b"")
    _random_file(job / "sub" / "model.ckpt", big)
    return job


def _peak(step: Callable[[], Any]) -> tuple[Any, int]:
    """What ``step`` returns and the peak of Python allocations while it ran."""
    tracemalloc.start()
    try:
        result = step()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _drain(pieces: Any) -> int:
    return sum(len(piece) for piece in pieces)


def test_incompressible_files_are_stored_others_deflated(tmp_path: Path) -> None:
    job = _folder(tmp_path)
    out = zip_folder(job, tmp_path / "job.zip")
    with zipfile.ZipFile(out) as zf:
        methods = {i.filename: i.compress_type for i in zf.infolist()}
        assert zf.read("sub/model.ckpt") == (job / "sub" / "model.ckpt").read_bytes()
    assert methods["sub/model.ckpt"] == zipfile.ZIP_STORED
    assert methods["notes.txt"] == zipfile.ZIP_DEFLATED
    assert methods["run.sh"] == zipfile.ZIP_DEFLATED  # small: always deflated
    again = zip_folder(job, tmp_path / "again.zip")
    assert again.read_bytes() == out.read_bytes()  # still deterministic


def test_digests_taken_while_unpacking_give_the_same_hash(tmp_path: Path) -> None:
    job = _folder(tmp_path)
    digests: dict[Path, bytes] = {}
    root = unpack(zip_folder(job, tmp_path / "job.zip"), tmp_path / "out", LIMITS, digests)
    files = {path for _rel, path, st in tree(root) if not (st.st_mode & 0o40000)}
    assert set(digests) == files
    assert context_hash(root, digests) == context_hash(root) == context_hash(job)


def test_a_stale_digest_is_not_used_for_a_file_it_does_not_name(tmp_path: Path) -> None:
    job = _folder(tmp_path)
    wrong = {job / "run.sh": b"\0" * 32}
    assert context_hash(job, wrong) != context_hash(job)  # the digest is what counts
    assert context_hash(job, {tmp_path / "elsewhere": b"\0" * 32}) == context_hash(job)


def test_tar_stream_is_a_tar_of_the_folder(tmp_path: Path) -> None:
    job = _folder(tmp_path)
    (job / "link").symlink_to("run.sh")
    (job / ".dockerignore").write_text("notes.txt\n")
    files = list(context_files(job, {"Dockerfile"}))
    data = b"".join(tar_stream(files, chunk=MIB))
    assert len(data) % tarfile.BLOCKSIZE == 0
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        members = {m.name: m for m in tf.getmembers()}
        assert set(members) == {rel for rel, _p, _s in files}
        assert "notes.txt" not in members  # .dockerignore applied
        ckpt = tf.extractfile("sub/model.ckpt")
        assert ckpt is not None
        assert ckpt.read() == (job / "sub" / "model.ckpt").read_bytes()
        assert members["run.sh"].mode == 0o755
        assert members["sub"].isdir() and members["link"].issym()
        assert members["link"].linkname == "run.sh"


def test_a_file_that_shrank_after_listing_is_an_error(tmp_path: Path) -> None:
    job = _folder(tmp_path)
    files = list(tree(job))
    (job / "sub" / "model.ckpt").write_bytes(b"short")
    with pytest.raises(OSError, match="changed while it was sent"):
        _drain(tar_stream(files))


@pytest.mark.slow
def test_memory_stays_flat_through_zip_unpack_hash_and_tar(tmp_path: Path) -> None:
    """200 MB through every step; each step's allocations peak at a few MB."""
    size = 200 * MIB
    job = _folder(tmp_path, big=size)
    zipped, zip_peak = _peak(lambda: zip_folder(job, tmp_path / "job.zip"))
    assert zipped.stat().st_size > size
    digests: dict[Path, bytes] = {}
    root, unpack_peak = _peak(lambda: unpack(zipped, tmp_path / "out", LIMITS, digests))
    chash, hash_peak = _peak(lambda: context_hash(root, digests))
    assert chash == context_hash(job)
    sent, tar_peak = _peak(lambda: _drain(tar_stream(list(context_files(root)))))
    assert sent > size
    peaks = {"zip": zip_peak, "unpack": unpack_peak, "hash": hash_peak, "tar": tar_peak}
    assert max(peaks.values()) < 8 * MIB, {k: f"{v / MIB:.1f} MiB" for k, v in peaks.items()}


@pytest.mark.docker
def test_the_engine_builds_from_the_stream_as_dockerignore_says(tmp_path: Path,
                                                                  engine: None) -> None:
    """The streamed tar reaches the engine whole, without what .dockerignore leaves out."""
    import docker

    from dopq.server import builds
    from dopq.server.builds import BuildLimits
    from dopq.server.runtime import API_VERSION

    job = tmp_path / "job"
    (job / "data").mkdir(parents=True)
    _random_file(job / "data" / "weights.bin", 5 * MIB + 7)  # not a whole number of blocks
    (job / "secret.txt").write_text("left out")
    (job / ".dockerignore").write_text("secret.txt\n")
    (job / "Dockerfile").write_text(
        f"FROM {BASE_IMAGE}\nCOPY . /job\n"
        "RUN test ! -e /job/secret.txt && test $(wc -c < /job/data/weights.bin) = 5242887\n"
    )
    tag = f"dopqt-context/{uuid.uuid4().hex[:12]}:1"
    log: list[str] = []
    try:
        image = builds.build("unix:///var/run/docker.sock", API_VERSION, job, tag, {}, log.append,
                             BuildLimits(network=False), lambda c: str(c.get("stream", "")))
        assert image
    finally:
        with docker.APIClient(version="auto", timeout=60) as api:
            try:
                api.remove_image(tag, force=True)
            except docker.errors.NotFound:
                pass


def test_the_server_caps_glibcs_memory_pools() -> None:
    """``dopq server`` caps glibc's per-thread pools (each upload connection kept ~16 MiB)."""
    from dopq.server.host_commands import cap_malloc_arenas

    assert cap_malloc_arenas() is True
