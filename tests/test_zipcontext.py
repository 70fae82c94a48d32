"""Build contexts read straight from the zip (``dopq.core.zipcontext``).

What the Provider hashes and sends the engine from the zip must be what it
hashed and sent from the unpacked folder before: the same context hash, byte
for byte, and a tar with the same members (``.dockerignore`` applied the same
way). Every archive the unpack refuses is refused with the same words, and the
hash pass and the tar keep memory flat for a large checkpoint.
"""

from __future__ import annotations

import io
import os
import shutil
import stat
import tarfile
import tracemalloc
import zipfile
from collections.abc import Callable
from pathlib import Path

import hostile
import pytest
from hostile import DIR, RawEntry, raw_zip

from dopq.core.archive import ArchiveLimits, context_hash, inspect_context, unpack, zip_folder
from dopq.core.context import tar_stream
from dopq.core.dockerignore import context_files
from dopq.core.errors import DopqError, JobRejected
from dopq.core.zipcontext import ZipContext

MIB = 2**20
LIMITS = ArchiveLimits(max_archive_bytes=64 * MIB, max_unpacked_bytes=64 * MIB, max_entries=50)
EXE = (stat.S_IFREG | 0o755) << 16


def _folder_job(tmp: Path) -> Path:
    job = tmp / "job"
    (job / "sub" / "deeper").mkdir(parents=True)
    (job / "empty").mkdir()
    (job / "Dockerfile").write_text("FROM busybox\nCOPY . /job\n")
    (job / "container_config.json").write_text('{"name": "ckpt"}')
    (job / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (job / "run.sh").chmod(0o755)
    (job / "notes.txt").write_text("words " * 100_000)  # deflates
    (job / "sub" / "deeper" / "zero").write_bytes(b"")
    (job / "sub" / "model.ckpt").write_bytes(os.urandom(2 * MIB + 3))  # stored
    (job / "ünïcode ☃.txt").write_text("snow")
    for name in ("a-b", "a.b", "a0", "z"):
        (job / name).write_text(name)
    (job / "a").mkdir()
    (job / "a" / "b").write_text("a/b")
    return job


def _nested(tmp: Path) -> Path:
    """The folder itself on top, as a user zips it with their file manager."""
    job = _folder_job(tmp / "n")
    out = tmp / "nested.zip"
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(job.rglob("*")):
            method = zipfile.ZIP_STORED if path.name == "model.ckpt" else zipfile.ZIP_DEFLATED
            zf.write(path, f"job/{path.relative_to(job).as_posix()}", compress_type=method)
    return out


ARCHIVES: dict[str, Callable[[Path], Path]] = {
    "files_on_top": lambda tmp: zip_folder(_folder_job(tmp / "f"), tmp / "top.zip"),
    "single_top_folder": _nested,
    "implied_folders_only": lambda tmp: raw_zip(tmp / "implied.zip", [
        RawEntry("Dockerfile", b"FROM scratch\n"),
        RawEntry("a/b/c.txt", b"c" * 5000),
        RawEntry("a/d.sh", b"#!/bin/sh\n", external_attr=EXE, method=zipfile.ZIP_STORED),
        RawEntry("a-b/e", b"e"),
        RawEntry("x/y/z/w/deep", b"deep", method=zipfile.ZIP_STORED),
    ]),
    "implied_top_folder": lambda tmp: raw_zip(tmp / "implied-top.zip", [
        RawEntry("job/Dockerfile", b"FROM scratch\n"),
        RawEntry("job/sub/x", b"x", external_attr=EXE),
        RawEntry("job/sub/", external_attr=DIR),
    ]),
    "explicit_empty_folders": lambda tmp: raw_zip(tmp / "empty-dirs.zip", [
        RawEntry("job/", external_attr=DIR),
        RawEntry("job/Dockerfile", b"FROM scratch\n"),
        RawEntry("job/empty/", external_attr=DIR),
        RawEntry("job/e2/f/", external_attr=DIR),
    ]),
    "one_file_on_top": lambda tmp: raw_zip(tmp / "one.zip", [RawEntry("only.txt", b"one")]),
    "one_file_in_a_folder": lambda tmp: raw_zip(tmp / "one-in.zip", [RawEntry("d/only", b"1")]),
    "macos_junk": lambda tmp: raw_zip(tmp / "mac.zip", [
        RawEntry("job/Dockerfile", b"FROM scratch\n"),
        RawEntry("__MACOSX/job/._Dockerfile", b"junk"),
    ]),
    "dos_and_cp437_names": lambda tmp: raw_zip(tmp / "dos.zip", [
        RawEntry("Dockerfile", b"FROM scratch\n", create_system=0, external_attr=0x20),
        RawEntry("caf\x82.txt".encode("latin-1"), b"cafe", external_attr=0),
        RawEntry("Ärger/ß.txt", b"utf8", external_attr=0),
    ]),
}


@pytest.mark.parametrize("case", sorted(ARCHIVES))
def test_the_hash_from_the_zip_is_the_hash_of_the_unpacked_folder(
        case: str, tmp_path: Path) -> None:
    zipped = ARCHIVES[case](tmp_path)
    root = unpack(zipped, tmp_path / "out", LIMITS)
    with ZipContext.open(zipped, LIMITS) as zc:
        assert zc.verify() == context_hash(root)
        assert zc.context_hash == context_hash(root)


def _members(data: bytes) -> list[tuple[str, bool, int, bytes]]:
    """(name, is folder, mode, contents) of each member, in the tar's order."""
    out = []
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        for m in tf.getmembers():
            f = tf.extractfile(m) if m.isfile() else None
            out.append((m.name, m.isdir(), m.mode, f.read() if f else b""))
            assert m.isdir() or m.isfile()
    return out


IGNORES = {
    "none": None,
    "plain": "notes.txt\n*.log\n",
    "folder_with_exception": "sub\n!sub/deeper/zero\n",
    "double_star": "**/*.ckpt\n# comment\n\n",
    "excludes_everything": "*\n!run.sh\n",
    "names_the_dockerfile": "Dockerfile\n.dockerignore\n",
}


@pytest.mark.parametrize("ignore", sorted(IGNORES))
@pytest.mark.parametrize("case", ["files_on_top", "single_top_folder", "implied_folders_only"])
def test_the_tar_from_the_zip_is_the_tar_of_the_unpacked_folder(
        case: str, ignore: str, tmp_path: Path) -> None:
    zipped = ARCHIVES[case](tmp_path)
    text = IGNORES[ignore]
    if text is not None:  # add .dockerignore at the root
        root = unpack(zipped, tmp_path / "probe", LIMITS)
        prefix = "job/" if root.name == "job" else ""
        with zipfile.ZipFile(zipped, "a") as zf:
            zf.writestr(prefix + ".dockerignore", text)
    root = unpack(zipped, tmp_path / "out", LIMITS)
    old = b"".join(tar_stream(list(context_files(root, {"Dockerfile"}))))
    with ZipContext.open(zipped, LIMITS, mtime=1234) as zc:
        new = b"".join(zc.tar({"Dockerfile"}, chunk=64 * 1024))
    assert len(new) % tarfile.BLOCKSIZE == 0
    assert _members(new) == _members(old)
    if ignore == "names_the_dockerfile":
        assert "Dockerfile" in [m[0] for m in _members(new)]


@pytest.mark.parametrize("case", sorted(hostile.ARCHIVE_CASES))
def test_a_hostile_archive_is_refused_with_the_unpacks_words(case: str, tmp_path: Path) -> None:
    build, words = hostile.ARCHIVE_CASES[case]
    message = _refused_alike(build(tmp_path), tmp_path)
    assert words in message and "\n" not in message


def _refused_alike(zipped: Path, tmp_path: Path) -> str:
    """The refusal of the hash pass, which must be the unpack's, word for word."""
    limits = ArchiveLimits(16 * MIB, 16 * MIB, 20)
    with pytest.raises(JobRejected) as old:
        unpack(zipped, tmp_path / "out", limits)
    with pytest.raises(JobRejected) as new:
        with ZipContext.open(zipped, limits) as zc:
            zc.verify()
    assert str(new.value) == str(old.value)
    return str(new.value)


def _crc_broken(tmp: Path) -> Path:
    path = raw_zip(tmp / "crc.zip", [RawEntry("Dockerfile", b"FROM scratch\n"),
                                     RawEntry("data.bin", b"A" * 4096, method=zipfile.ZIP_STORED)])
    raw = bytearray(path.read_bytes())
    at = raw.index(b"A" * 4096)
    raw[at + 100] = ord("B")  # the data, not the headers
    path.write_bytes(bytes(raw))
    return path


@pytest.mark.parametrize("build, words", [
    (_crc_broken, "corrupt zip: entry 'data.bin'"),
    (lambda tmp: raw_zip(tmp / "size.zip", [RawEntry("big", b"x" * 100, declared_size=10)]),
     "corrupt zip"),
    (lambda tmp: raw_zip(tmp / "over.zip", [RawEntry("big", zeros=17 * MIB,
                                                      declared_size=1000)]), "corrupt zip"),
    (lambda tmp: raw_zip(tmp / "many.zip", [RawEntry(f"f{i}", zeros=6 * MIB) for i in range(3)]),
     "archive unpacks to 18874368 bytes, over the limit of 16777216"),
])
def test_bad_data_is_refused_by_the_hash_pass(build: Callable[[Path], Path], words: str,
                                               tmp_path: Path) -> None:
    assert words in _refused_alike(build(tmp_path), tmp_path)


def test_the_config_and_root_files_are_read_with_the_contexts_refusals(tmp_path: Path) -> None:
    zipped = raw_zip(tmp_path / "c.zip", [
        RawEntry("job/Dockerfile/", external_attr=DIR),
        RawEntry("job/container_config.json", b'{"name": "abc"}'),
        RawEntry("job/.dockerignore", b"\xff\xfe"),
    ])
    with ZipContext.open(zipped, LIMITS) as zc:
        assert zc.config() == {"name": "abc"}
        assert zc.kind("Dockerfile") == "dir" and zc.kind("nope") is None
        assert zc.read("Dockerfile", MIB, JobRejected("big")) is None
        with pytest.raises(JobRejected, match="big"):
            zc.read("container_config.json", 5, JobRejected("big"))
        with pytest.raises(DopqError, match=r"^\.dockerignore: not UTF-8 text$"):
            zc.tar()
    for entries in ([RawEntry("container_config.json/x"), RawEntry("Dockerfile")],
                    [RawEntry("Dockerfile")], [RawEntry("j/container_config.json", b"[1]")]):
        odd = raw_zip(tmp_path / "odd.zip", entries)
        with pytest.raises(JobRejected) as old:
            inspect_context(unpack(odd, tmp_path / "odd", LIMITS))
        with ZipContext.open(odd, LIMITS) as zc, pytest.raises(JobRejected) as new:
            zc.config()
        assert str(new.value) == str(old.value)
        shutil.rmtree(tmp_path / "odd")


def test_an_archive_changed_between_the_passes_is_refused(tmp_path: Path) -> None:
    zipped = ARCHIVES["implied_folders_only"](tmp_path)
    with ZipContext.open(zipped, LIMITS) as zc:
        zc.verify()
        with open(zipped, "ab") as fh:  # one who still holds it open, writing
            fh.write(b"more")
        with pytest.raises(JobRejected, match="changed while it was read"):
            b"".join(zc.tar())


def test_a_small_file_rewritten_unseen_is_not_sent(tmp_path: Path) -> None:
    """The Dockerfile the server checked is the one the engine gets, even when the
    file was rewritten in place with its size and mtime kept (a writer the stamp
    cannot see, such as a shared mapping)."""
    zipped = raw_zip(tmp_path / "j.zip", [
        RawEntry("Dockerfile", b"FROM dopq/busybox:latest\n", method=zipfile.ZIP_STORED),
        RawEntry("big.bin", b"x" * (2 * MIB), method=zipfile.ZIP_STORED)])

    def rewrite() -> None:
        st = zipped.stat()
        raw = zipped.read_bytes().replace(b"FROM dopq/busybox:latest", b"FROM evil/busybox:latest")
        with open(zipped, "r+b") as fh:
            fh.write(raw)
        os.utime(zipped, ns=(st.st_atime_ns, st.st_mtime_ns))

    with ZipContext.open(zipped, LIMITS) as zc:
        zc.verify()
        rewrite()
        with pytest.raises(JobRejected, match="Bad CRC|changed while it was read"):
            zc.read("Dockerfile", MIB, JobRejected("big"))  # through zipfile: its CRC
        with pytest.raises(JobRejected, match="changed while it was read"):
            b"".join(zc.tar())


def _peak(step: Callable[[], object]) -> tuple[object, int]:
    tracemalloc.start()
    try:
        return step(), tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("method", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_memory_stays_flat_through_the_hash_and_the_tar(method: int, tmp_path: Path) -> None:
    size = 48 * MIB
    zipped = tmp_path / "big.zip"
    with zipfile.ZipFile(zipped, "w") as zf:
        zf.writestr("Dockerfile", "FROM scratch\n")
        info = zipfile.ZipInfo("ckpt/model.bin")
        info.compress_type = method
        with zf.open(info, "w") as out:
            block = os.urandom(MIB)
            for _ in range(size // MIB):
                out.write(block)
    with ZipContext.open(zipped, LIMITS) as zc:
        _chash, hash_peak = _peak(zc.verify)
        sent, tar_peak = _peak(lambda: sum(len(p) for p in zc.tar()))
    assert isinstance(sent, int) and sent > size
    assert max(hash_peak, tar_peak) < 8 * MIB, (hash_peak / MIB, tar_peak / MIB)


def _engine_build(context: ZipContext, tag: str) -> str | None:
    from dopq.server import builds
    from dopq.server.builds import BuildLimits
    from dopq.server.runtime import API_VERSION

    return builds.build("unix:///var/run/docker.sock", API_VERSION, context, tag, {},
                        lambda _text: None, BuildLimits(network=False),
                        lambda c: str(c.get("stream", "")))


def _remove(tag: str) -> None:
    import docker

    with docker.APIClient(version="auto", timeout=60) as api:
        try:
            api.remove_image(tag, force=True)
        except docker.errors.NotFound:
            pass


@pytest.mark.docker
def test_the_engine_builds_from_the_zip(tmp_path: Path, engine: None) -> None:
    """The tar streamed from the zip reaches the engine whole, .dockerignore applied."""
    zipped = raw_zip(tmp_path / "job.zip", [
        RawEntry("job/Dockerfile", (
            f"FROM {hostile.BASE_IMAGE}\nCOPY . /job\n"
            "RUN test ! -e /job/secret.txt && test -x /job/run.sh"
            " && test $(wc -c < /job/data/weights.bin) = 5242887"
            " && test $(wc -c < /job/notes.txt) = 600000\n").encode()),
        RawEntry("job/data/weights.bin", os.urandom(5 * MIB + 7), method=zipfile.ZIP_STORED),
        RawEntry("job/notes.txt", b"words " * 100_000),
        RawEntry("job/run.sh", b"#!/bin/sh\n", external_attr=EXE),
        RawEntry("job/secret.txt", b"left out"),
        RawEntry("job/.dockerignore", b"secret.txt\n"),
    ])
    tag = f"dopqt-zipcontext/{os.urandom(6).hex()}:1"
    try:
        with ZipContext.open(zipped, LIMITS, mtime=1) as zc:
            zc.verify()
            assert _engine_build(zc, tag)
    finally:
        _remove(tag)


@pytest.mark.docker
def test_a_zip_that_changes_during_the_build_is_a_one_line_rejection(
        tmp_path: Path, engine: None) -> None:
    zipped = raw_zip(tmp_path / "job.zip", [
        RawEntry("Dockerfile", f"FROM {hostile.BASE_IMAGE}\nCOPY . /job\n".encode()),
        RawEntry("data.bin", os.urandom(3 * MIB), method=zipfile.ZIP_STORED)])
    tag = f"dopqt-zipcontext/{os.urandom(6).hex()}:1"
    try:
        with ZipContext.open(zipped, LIMITS) as zc:
            zc.verify()
            with open(zipped, "ab") as fh:
                fh.write(b"late")
            with pytest.raises(JobRejected, match="^rejected: the archive changed while it"):
                _engine_build(zc, tag)
    finally:
        _remove(tag)
