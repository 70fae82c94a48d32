"""The Provider builds from the zip in place: nothing unpacked, hostile zips never built.

A real store and settings, a runtime that records what reaches ``build`` (the
tar the engine would read, taken whole). A job that builds leaves no unpacked
context; an identical context is reused; an archive the unpack refused is
refused with the same one-line reason and never reaches the engine.
"""

from __future__ import annotations

import hashlib
import io
import queue
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import hostile
import pytest
from conftest import make_config
from hostile import BASE_IMAGE, RawEntry, good_job, raw_zip, zip_it

from dopq.core import settings as settings_mod
from dopq.core.jobs import JobState
from dopq.core.zipcontext import ZipContext
from dopq.server.images import cache_tag
from dopq.server.provider import Provider, job_dir
from dopq.server.store import Store

MIB = 2**20


class RecordingRuntime:
    """Builds nothing; keeps each build's tar members and hands back an image id."""

    def __init__(self) -> None:
        self.builds: list[dict[str, Any]] = []
        self.images: set[str] = set()
        self.tags: dict[str, str] = {}

    def build(self, context: Any, tag: str, labels: dict[str, str],
              on_log: Callable[[str], None], limits: Any = None) -> str:
        assert isinstance(context, ZipContext)
        data = b"".join(context.tar({"Dockerfile"}))
        with tarfile.open(fileobj=io.BytesIO(data)) as tf:
            members = {m.name: (tf.extractfile(m).read() if m.isfile() else None)  # type: ignore[union-attr]
                       for m in tf.getmembers()}
        self.builds.append({"tag": tag, "labels": labels, "members": members})
        image = "sha256:" + hashlib.sha256(data).hexdigest()
        self.images.add(image)
        return image

    def tag(self, image: str, tag: str) -> None:
        self.tags[tag] = image

    def untag(self, tag: str) -> None:
        self.tags.pop(tag, None)

    def image_exists(self, ref: str) -> bool:
        return ref in self.images

    def inspect_image(self, ref: str) -> dict[str, Any] | None:
        return {"Id": "sha256:" + "b" * 64} if ref == BASE_IMAGE else None


@pytest.fixture
def provider(tmp_path: Path) -> Iterator[Provider]:
    settings = settings_mod.from_dict(make_config(tmp_path))
    settings.state_path.mkdir(parents=True, exist_ok=True)
    store = Store(settings.db_path)
    prov = Provider(settings, 2, None, queue.Queue(), store=store,
                    runtime=RecordingRuntime())  # type: ignore[arg-type]
    try:
        yield prov
    finally:
        prov._pool.shutdown(wait=True)
        store.close()


def _run(provider: Provider, zipped: Path) -> dict[str, Any]:
    job_id = provider.store.add_job(name="job", user="alice", origin="api", source=str(zipped),
                                    overrides={}, submitted_by="alice")
    provider.process(job_id)
    return dict(provider.store.job(job_id))


def _runtime(provider: Provider) -> RecordingRuntime:
    runtime = provider.runtime
    assert isinstance(runtime, RecordingRuntime)
    return runtime


def test_a_job_is_built_from_the_zip_and_an_identical_one_reused(
        provider: Provider, tmp_path: Path) -> None:
    folder = good_job(tmp_path / "jobs", "alice", "zipped")
    (folder / "data").mkdir()
    (folder / "data" / "weights.bin").write_bytes(bytes(range(256)) * 9000)
    (folder / "secret.txt").write_text("left out")
    (folder / ".dockerignore").write_text("secret.txt\n")
    first = _run(provider, zip_it(folder, tmp_path / "a.zip"))
    assert first["state"] == JobState.QUEUED, first["error"]
    runtime = _runtime(provider)
    assert len(runtime.builds) == 1
    members = runtime.builds[0]["members"]
    assert members["data/weights.bin"] == (folder / "data" / "weights.bin").read_bytes()
    assert "secret.txt" not in members and "Dockerfile" in members and "data" in members
    assert "dopq.context" not in runtime.builds[0]["labels"]  # known only at the tar's end
    cached = runtime.tags[cache_tag(provider.store.owner_id(), first["context_hash"])]
    assert cached == first["image"]  # the hash, taken in the tar's own pass, keys the cache
    assert not (job_dir(provider.settings, first["id"]) / "context").exists()
    again = _run(provider, zip_it(folder, tmp_path / "b.zip", nest=True))  # same files
    assert again["state"] == JobState.QUEUED
    assert again["context_hash"] == first["context_hash"] and again["image"] == first["image"]
    assert len(runtime.builds) == 1  # reused, not built again
    log = (job_dir(provider.settings, again["id"]) / "build.log").read_text()
    assert "identical context already built" in log


def _bad_crc(tmp: Path) -> Path:
    path = raw_zip(tmp / "crc.zip", [*_good_entries(),
                                     RawEntry("data.bin", b"A" * 4096, method=zipfile.ZIP_STORED)])
    raw = bytearray(path.read_bytes())
    at = raw.index(b"A" * 4096)
    raw[at + 10] = ord("B")
    path.write_bytes(bytes(raw))
    return path


def _good_entries() -> list[RawEntry]:
    return [RawEntry("Dockerfile", f"FROM {BASE_IMAGE}\n".encode()),
            RawEntry("container_config.json", b'{"name": "evil-job", "executor_name": "alice"}')]


HOSTILE: dict[str, tuple[Callable[[Path], Path], str]] = {
    "traversal": (hostile.traversal, "'..' in path"),
    "duplicate": (hostile.duplicate, "duplicate name"),
    "symlink": (hostile.symlink, "symlinks are not allowed"),
    "lying_size_beyond_the_limit": (
        lambda tmp: raw_zip(tmp / "lie.zip", [*_good_entries(), RawEntry(
            "zeros.bin", zeros=20 * MIB, declared_size=100)]), "corrupt zip"),
    "declared_beyond_the_limit": (hostile.zip_bomb, "over the limit"),
    "bad_crc": (_bad_crc, "corrupt zip: entry 'data.bin'"),
    "truncated": (hostile.truncated_zip, "zip"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_archive_never_reaches_the_engine(case: str, provider: Provider,
                                                    tmp_path: Path) -> None:
    build, words = HOSTILE[case]
    job = _run(provider, build(tmp_path))
    assert job["state"] == JobState.FAILED
    assert words in job["error"] and "\n" not in job["error"]
    assert job["error"].startswith("rejected: ")
    assert _runtime(provider).builds == []
    assert not (job_dir(provider.settings, job["id"]) / "context").exists()


def test_a_config_error_comes_after_the_archives_own(provider: Provider, tmp_path: Path) -> None:
    """As when the zip was unpacked first: a corrupt entry is the reason, not the config."""
    path = raw_zip(tmp_path / "both.zip", [
        RawEntry("Dockerfile", b"FROM x\n"), RawEntry("container_config.json", b"{not json"),
        RawEntry("data.bin", zeros=MIB, declared_size=10)])
    job = _run(provider, path)
    assert "corrupt zip" in job["error"]
    fine = raw_zip(tmp_path / "cfg.zip", [RawEntry("Dockerfile", b"FROM x\n"),
                                          RawEntry("container_config.json", b"{not json")])
    assert "not valid JSON" in _run(provider, fine)["error"]
    assert _runtime(provider).builds == []
