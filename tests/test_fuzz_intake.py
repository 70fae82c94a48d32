"""Fuzz the intake: unpack() and parse_spec() raise JobRejected or succeed, nothing else.

A zip read in place for a build (``dopq.core.zipcontext``) is refused with the
unpack's words, or hashes and tars exactly as the unpacked folder does.

Bounded: 300 examples per test, no deadline. Inputs tried in one full run
(hypothesis --hypothesis-show-statistics, Python 3.11, hypothesis 6.170):
    unpack, random entries ............ 300
    unpack, plain names and odd data .. 300
    unpack, random bytes .............. 300
    unpack, mutated valid zip ......... 300
    parse_spec, any JSON value ........ 300
    parse_spec, known keys + overrides  300
    parse_array ....................... 300
    normalise_tag ..................... 300
    total ............................. 2400 (about 5 s on this machine)
"""

from __future__ import annotations

import io
import os
import re
import stat
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hostile import RawEntry, raw_zip
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dopq.core.archive import ArchiveLimits, context_hash, unpack
from dopq.core.context import tar_stream
from dopq.core.dockerignore import context_files
from dopq.core.errors import DopqError, JobRejected
from dopq.core.jobs import JobSpec
from dopq.core.spec import ENV_KEY_RE, USER_RE, normalise_tag, parse_array, parse_spec
from dopq.core.zipcontext import ZipContext

FUZZ = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
LIMITS = ArchiveLimits(max_archive_bytes=256 * 1024, max_unpacked_bytes=16 * 1024, max_entries=8)

# --- unpack ------------------------------------------------------------------

PIECES = ["..", ".", "", "a", "b", "Dockerfile", "__MACOSX", "C:", "c:\\x", "\\", "..\\..",
          "\x00", "\n", "\x1b", "é", "日本", "\u202e", "\ud800", "x" * 300, " ", "~", "$HOME"]
KINDS = [0, stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFCHR, stat.S_IFBLK,
         stat.S_IFIFO, stat.S_IFSOCK]

PLAIN = ["Dockerfile", "container_config.json", "job/", "job/Dockerfile", "job/run.sh", "a/b/c",
         "data/", "data/x.bin", "__MACOSX/job/._Dockerfile", "image.tar"]
names = st.one_of(
    st.sampled_from(PLAIN),
    st.sampled_from(PLAIN),
    st.lists(st.sampled_from(PIECES), min_size=1, max_size=4).map("/".join),
    st.builds(lambda lead, rest: lead + rest, st.sampled_from(["", "/", "//", "\\", "a/"]),
              st.text(max_size=12)),
    st.binary(max_size=16),  # not UTF-8 flagged: decoded as cp437
)
attrs = st.one_of(
    st.just((stat.S_IFREG | 0o644) << 16),
    st.just(0),
    st.builds(lambda kind, perm: (kind | perm) << 16, st.sampled_from(KINDS),
              st.integers(0, 0o7777)),
    st.integers(0, 2**32 - 1),
)
entries = st.builds(
    RawEntry,
    name=names,
    data=st.binary(max_size=64),
    external_attr=attrs,
    create_system=st.sampled_from([3, 3, 0, 19, 255]),
    flags=st.sampled_from([0, 0, 0, 0x1, 0x8, 0x40, 0x800]),
    method=st.sampled_from([0, 8, 8, 8, 12, 14, 99]),
    declared_size=st.one_of(st.none(), st.none(), st.integers(0, 2**32 - 1)),
    zeros=st.one_of(st.just(0), st.integers(0, 20000)),
)


@contextmanager
def sandbox() -> Iterator[tuple[Path, Path, Path]]:
    """(top, zip folder, dest), dest deep enough that four '..' still land in top."""
    with tempfile.TemporaryDirectory() as tmp:
        top = Path(tmp)
        deep = top / "outer" / "l1" / "l2" / "l3" / "sandbox"
        deep.mkdir(parents=True)
        (top / "outer" / "sentinel").write_text("untouched")
        (deep.parent / "sentinel").write_text("untouched")
        (top / "zips").mkdir()
        yield top, top / "zips", deep / "dest"


def outside(top: Path, dest: Path) -> set[tuple[str, int]]:
    found = set()
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            if path != dest and dest not in path.parents:
                found.add((str(path), path.lstat().st_size))
    return found


def check_unpack(zip_path: Path, top: Path, dest: Path) -> None:
    """The unpack refuses (one line, nothing left) or writes only plain files and
    folders within the limit; read in place (``ZipContext``), the zip is refused
    with the same words, or gives the unpacked folder's hash and tar."""
    before = outside(top, dest)
    try:
        root = unpack(zip_path, dest, LIMITS)
    except JobRejected as err:
        assert "\n" not in str(err)
        assert not dest.exists()
        try:
            with ZipContext.open(zip_path, LIMITS) as zc:
                zc.verify()
        except JobRejected as err2:
            assert str(err2) == str(err)
        else:
            raise AssertionError(f"unpack refused, ZipContext did not: {err}")
    else:
        with ZipContext.open(zip_path, LIMITS) as zc:
            assert zc.verify() == context_hash(root)
            try:
                old = b"".join(tar_stream(list(context_files(root, {"Dockerfile"}))))
            except DopqError:
                old = None  # a .dockerignore the build refuses, either way
            if old is not None:
                assert b"".join(zc.tar({"Dockerfile"}, chunk=4096)) == _retimed(old, root)
        real = dest.resolve()
        assert root == real or real in root.parents
        total = 0
        for path in real.rglob("*"):
            st_ = path.lstat()
            assert stat.S_ISREG(st_.st_mode) or stat.S_ISDIR(st_.st_mode), path
            assert stat.S_IMODE(st_.st_mode) in (0o644, 0o755), path
            total += st_.st_size if stat.S_ISREG(st_.st_mode) else 0
        assert total <= LIMITS.max_unpacked_bytes
    assert outside(top, dest) == before


def _retimed(tar: bytes, root: Path) -> bytes:
    """``tar`` (of the unpacked folder) as the zip's tar writes it: mtime 0, owner 0."""
    out = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(tar)) as tin:
        for member in tin.getmembers():
            member.mtime, member.uid, member.gid, member.uname, member.gname = 0, 0, 0, "", ""
            out.write(member.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
            if member.isfile():
                data = tin.extractfile(member).read()  # type: ignore[union-attr]
                out.write(data + bytes(-len(data) % tarfile.BLOCKSIZE))
    out.write(bytes(2 * tarfile.BLOCKSIZE))
    return out.getvalue()


@FUZZ
@given(st.lists(entries, max_size=8),
       st.one_of(st.none(), st.none(), st.none(), st.integers(0, 12), st.integers(0, 0xFFFF)))
def test_unpack_random_entries(items: list[RawEntry], count: int | None) -> None:
    with sandbox() as (top, zips, dest):
        check_unpack(raw_zip(zips / "f.zip", items, declared_count=count), top, dest)


simple_names = st.one_of(
    st.sampled_from(PLAIN),
    st.from_regex(r"[a-c]{1,2}(/[a-c]{1,2}){0,2}/?", fullmatch=True),
)


@st.composite
def plain_entries(draw: st.DrawFn) -> RawEntry:
    name = draw(simple_names)
    kind = stat.S_IFDIR if name.endswith("/") else stat.S_IFREG
    perm = draw(st.sampled_from([0o644, 0o755, 0o4755, 0o600]))
    return RawEntry(
        name,
        data=draw(st.binary(max_size=64)),
        external_attr=draw(st.sampled_from([0, (kind | perm) << 16, (kind | perm) << 16])),
        method=draw(st.sampled_from([0, 8, 8, 12])),
        declared_size=draw(st.one_of(st.none(), st.none(), st.integers(0, 10**6))),
        zeros=draw(st.one_of(st.just(0), st.integers(0, 12000))),
    )


@FUZZ
@given(st.lists(plain_entries(), max_size=8, unique_by=lambda e: e.name))
def test_unpack_plain_names_odd_data(items: list[RawEntry]) -> None:
    """Names that pass the checks, so that extraction itself is exercised."""
    with sandbox() as (top, zips, dest):
        check_unpack(raw_zip(zips / "p.zip", items), top, dest)


@FUZZ
@given(st.binary(max_size=4096))
def test_unpack_random_bytes(data: bytes) -> None:
    with sandbox() as (top, zips, dest):
        path = zips / "r.zip"
        path.write_bytes(data)
        check_unpack(path, top, dest)


def _good_zip(path: Path) -> bytes:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("job/Dockerfile", "FROM dopq/busybox:latest\n" * 20)
        zf.writestr("job/container_config.json", '{"name": "fuzz", "executor_name": "x"}')
        zf.writestr("job/data/", "")
    return path.read_bytes()


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=6),
       st.one_of(st.none(), st.integers(0, 10**6)))
def test_unpack_mutated_zip(flips: list[tuple[int, int]], cut: int | None) -> None:
    with sandbox() as (top, zips, dest):
        path = zips / "m.zip"
        data = bytearray(_good_zip(path))
        for pos, value in flips:
            data[pos % len(data)] = value
        path.write_bytes(bytes(data[: cut % len(data)] if cut is not None else data))
        check_unpack(path, top, dest)


# --- parse_spec --------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12,
)
CONFIG_KEYS = ["name", "executor_name", "required_memory", "num_gpus", "num_slots", "build_flag",
               "run_params", "command", "env", "cpus", "shm_size", "time_limit", "priority"]
RUN_PARAM_KEYS = ["environment", "working_dir", "entrypoint", "command", "user", "shm_size",
                  "mem_limit", "memswap_limit", "tty", "stop_signal", "labels", "ulimits",
                  "privileged", "volumes", "network_mode", "devices", "cap_add"]
OVERRIDE_KEYS = ["name", "gpus", "memory", "cpus", "time_limit", "shm_size", "priority",
                 "command", "env", "after", "after_any", "array", "bogus"]
plausible = st.one_of(
    json_values,
    st.sampled_from(["abc", "bob", "Bob", "8g", "1.5G", "2h", "1h30m", "01:30:00", "0-9",
                     "-1", "0", "1" * 30 + "x", "/work", "SIGINT", "1000:1000", "A=1"]),
    st.integers(-2, 2000),
    st.dictionaries(st.sampled_from(["A", "B_1", "NVIDIA_X", "dopq.x", "1x", "name", "soft"]),
                    json_values, max_size=3),
)
configs = st.dictionaries(
    st.sampled_from(CONFIG_KEYS + ["num_gpu", "zzz"]),
    st.one_of(plausible, st.dictionaries(st.sampled_from(RUN_PARAM_KEYS), plausible, max_size=4)),
    max_size=8,
)
users = st.one_of(
    st.none(), st.sampled_from(["bob", "Bob", "alice", "", "k\u212a"]), st.text(max_size=8)
)


def check_spec(config: Any, submitter: Any, overrides: Any, allowed: Any) -> None:
    try:
        job = parse_spec(config, submitter=submitter, overrides=overrides, allowed_users=allowed)
    except JobRejected as err:
        assert "\n" not in str(err) and len(str(err)) < 400
        return
    assert isinstance(job, JobSpec)
    assert USER_RE.fullmatch(job.user)
    assert 3 <= len(job.name) <= 128 and job.name.isprintable()
    assert isinstance(job.num_gpus, int) and job.num_gpus >= 0
    assert all(ENV_KEY_RE.fullmatch(k) and not k.upper().startswith(("DOPQ_", "NVIDIA_"))
               for k in job.env)
    assert set(job.run_params) <= {"working_dir", "entrypoint", "user", "tty", "stop_signal",
                                   "labels", "ulimits", "memswap_limit"}


@FUZZ
@given(json_values, users, st.lists(st.text(max_size=6), max_size=3))
def test_parse_spec_any_json(config: Any, submitter: Any, allowed: list[str]) -> None:
    check_spec(config, submitter, None, allowed)


@FUZZ
@given(configs, users,
       st.one_of(st.none(), st.dictionaries(st.sampled_from(OVERRIDE_KEYS), plausible,
                                            max_size=4)),
       st.one_of(st.just([]), st.just(["bob", "alice"])))
def test_parse_spec_known_keys(config: dict[str, Any], submitter: Any, overrides: Any,
                               allowed: list[str]) -> None:
    check_spec(config, submitter, overrides, allowed)


# --- arrays and tags ---------------------------------------------------------

DOCKER_REF = re.compile(
    r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*"
    r":[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
)


@FUZZ
@given(st.one_of(st.text(alphabet="0123456789-,:% x", max_size=20), st.text(max_size=10)))
def test_parse_array(text: str) -> None:
    try:
        result = parse_array(text)
    except JobRejected:
        return
    assert result == sorted(set(result)) and 0 < len(result) <= 10000


@FUZZ
@given(st.text(max_size=40), st.text(max_size=200), st.integers(-5, 2**64))
def test_normalise_tag(user: str, name: str, job_id: int) -> None:
    try:
        tag = normalise_tag(user, name, job_id)
    except JobRejected:
        assert not 0 <= job_id < 2**63
        return
    assert DOCKER_REF.fullmatch(tag), tag
    assert len(tag.partition(":")[0]) <= 255
