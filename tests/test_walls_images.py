"""Issue 10, items 2, 3, 8 and 11 (images and containers), each written as the attack.

- 2: an ``image.tar`` whose names (RepoTags, the legacy ``repositories`` file,
  OCI ``index.json`` annotations) name an allowed base image tries to re-point it.
- 3: another user's image, learned from a view or elsewhere, used in ``FROM``,
  ``COPY --from``, ``ADD --from``, ``RUN --mount from`` (by id, short id,
  digest, cache tag, through ARG, continuation lines, ONBUILD).
- 8: fork bombs, memory hogs and endless loops in ``RUN`` steps.
- 11: two servers with one name prefix on one engine; ``VOLUME`` data; tags.
"""

from __future__ import annotations

import io
import json
import tarfile
import uuid
from pathlib import Path
from typing import Any

import docker
import pytest
from conftest import Running, wait_for
from hostile import BASE_IMAGE, good_job

from dopq.core import dockerfile
from dopq.core.dockerfile import Reference
from dopq.core.errors import BuildFailed, JobRejected
from dopq.server import images
from dopq.server.images import check_references, owner_tag_pattern, strip_tags
from dopq.server.runtime import LABEL_INSTANCE, LABEL_OWNER, ContainerRuntime

ID = "sha256:" + "ab12" * 16
SHORT = ID[7:19]


# -- the Dockerfile parser (pure) ----------------------------------------------------------------
@pytest.mark.parametrize(("text", "refs"), [
    (f"FROM {SHORT}\n", [SHORT]),
    (f"from {ID}\n", [ID]),
    (f"FROM --platform=linux/amd64 {SHORT} AS build\nFROM build\n", [SHORT]),
    (f"ARG BASE={SHORT}\nFROM $BASE\n", [SHORT]),
    (f"ARG BASE={SHORT}\nFROM ${{BASE}}\n", [SHORT]),
    (f"ARG X\nFROM ${{X:-{SHORT}}}\n", [SHORT]),
    (f"FROM {BASE_IMAGE}\nCOPY --from={SHORT} /secret /x\n", [SHORT]),
    (f"FROM {BASE_IMAGE}\nCOPY --chown=1:1 --from=\"{SHORT}\" /s /x\n", [SHORT]),
    (f"FROM {BASE_IMAGE}\nADD --from={ID} /secret /x\n", [ID]),
    (f"FROM {BASE_IMAGE}\nRUN --mount=type=bind,from={SHORT},target=/m cat /m/s\n", [SHORT]),
    (f"FROM \\\n   {SHORT}\n", [SHORT]),  # a line continuation
    (f"FROM {BASE_IMAGE}\nRUN echo \\\n# a comment inside\n\n  hi\nFROM {SHORT}\n", [SHORT]),
    (f"# escape=`\nFROM {BASE_IMAGE}\nRUN echo `\n  hi\nCOPY --from={SHORT} / /\n", [SHORT]),
    # a heredoc body is read as instructions by the classic builder: checked too
    (f"FROM {BASE_IMAGE}\nRUN cat <<EOF\nFROM {SHORT}\nEOF\n", [SHORT]),
    (f"FROM {BASE_IMAGE}\nONBUILD COPY --from={SHORT} / /\n", [SHORT]),
    (f"FROM {BASE_IMAGE} AS one\nFROM one AS two\nCOPY --from=0 / /\nCOPY --from=two / /\n"
     "FROM scratch\nCOPY --from=one / /\n", []),  # stages by name and index
])
def test_dockerfile_finds_every_image_reference(text: str, refs: list[str]) -> None:
    found = [r.ref for r in dockerfile.references(text)]
    assert [r for r in found if r != BASE_IMAGE] == refs
    assert found.count(BASE_IMAGE) == text.count(f"FROM {BASE_IMAGE}")


@pytest.mark.parametrize(("text", "words"), [
    ("# syntax=docker/dockerfile:1\nFROM scratch\n", "syntax"),
    ("#syntax = evil/frontend\nFROM scratch\n", "syntax"),
    ("FROM $NOPE\n", "no value"),
    (f"FROM {BASE_IMAGE}\nCOPY --from=$X / /\n", "variables are not allowed"),
    ("RUN echo no from\n", "no FROM"),
    ("FROM a b c d\n", "FROM takes"),
    (f"FROM {BASE_IMAGE}\nONBUILD FROM {SHORT}\n", "ONBUILD FROM"),
])
def test_dockerfile_refuses_what_it_cannot_read_for_sure(text: str, words: str) -> None:
    with pytest.raises(JobRejected, match=words):
        dockerfile.references(text)


def test_references_are_checked_against_bases_and_own_images() -> None:
    engine = {
        BASE_IMAGE: {"Id": "sha256:base", "Config": {}},
        "trap:latest": {"Id": "sha256:trap", "Config": {"OnBuild": [f"COPY --from={SHORT} / /"]}},
        SHORT: {"Id": ID, "Config": {}},
        "mine": {"Id": "sha256:mine", "Config": {}},
    }

    def resolve(ref: str) -> dict[str, Any] | None:
        return engine.get(ref)

    allowed = [BASE_IMAGE, "trap:*"]
    ok = [Reference(BASE_IMAGE, "FROM", 1), Reference("mine", "COPY --from", 2)]
    check_references(ok, allowed, {"sha256:mine"}, resolve)
    for bad in (SHORT, "sha256:nothing", "dopq/bob/job:abc-1"):
        with pytest.raises(JobRejected, match="not an allowed base.*dopq/busybox:latest"):
            check_references([Reference(bad, "FROM", 1)], allowed, {"sha256:mine"}, resolve)
    # an allowed base's ONBUILD trigger runs in this build: it is checked too
    with pytest.raises(JobRejected, match="ONBUILD COPY --from"):
        check_references([Reference("trap:latest", "FROM", 1)], allowed, set(), resolve)
    assert images.is_allowed_base("docker.io/library/busybox", ["busybox:latest"])
    assert not images.is_allowed_base("dopq/busybox:latest@sha256:x", [BASE_IMAGE])
    assert not images.is_allowed_base("dopq/busybox@sha256:x", ["dopq/busybox*"])
    assert images.is_allowed_base("dopq/busybox:1.36", ["dopq/busybox:*"])


# -- item 2: image.tar takes over image names ---------------------------------------------------
def _evil_archive(api: Any, tmp: Path, prefix: str, names: list[str], repositories: str,
                  annotation: str) -> tuple[Path, str]:
    """An image (not the base) saved with names that point at ``names``."""
    df = io.BytesIO(f"FROM {BASE_IMAGE}\nRUN echo evil > /evil\n".encode())
    evil = None
    for chunk in api.build(fileobj=df, rm=True, forcerm=True, decode=True,
                           labels={LABEL_INSTANCE: prefix}, network_mode="none"):
        assert "error" not in chunk, chunk
        if isinstance(chunk.get("aux"), dict):
            evil = chunk["aux"]["ID"]
    assert evil
    raw = tmp / "saved.tar"
    with raw.open("wb") as fh:
        for part in api.get_image(evil):
            fh.write(part)
    out = tmp / "job"
    out.mkdir()
    with tarfile.open(raw) as tin, tarfile.open(out / "image.tar", "w") as tout:
        for m in tin:
            data = tin.extractfile(m).read() if m.isfile() else None
            if m.name == "manifest.json":
                manifest = json.loads(data or b"")
                manifest[0]["RepoTags"] = names
                data = json.dumps(manifest).encode()
                m.size = len(data)
            tout.addfile(m, io.BytesIO(data) if data is not None else None)
        repo, _, tag = repositories.rpartition(":")
        extra = {
            "repositories": {repo: {tag: evil[7:]}},
            "index.json": {"schemaVersion": 2, "manifests": [{
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": evil, "size": 1,
                "annotations": {"io.containerd.image.name": annotation,
                                "org.opencontainers.image.ref.name": "latest"}}]},
        }
        for name, content in extra.items():
            blob = json.dumps(content).encode()
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tout.addfile(info, io.BytesIO(blob))
    (out / "container_config.json").write_text(json.dumps({
        "name": "evil-load", "executor_name": "alice", "num_gpus": 0, "build_flag": False,
        "command": ["sh", "-c", "cat /evil"]}))
    return out, evil


def test_image_tar_cannot_re_point_any_name(server_factory: Any, tmp_path: Path) -> None:
    victims = [f"dopqv{uuid.uuid4().hex[:8]}/base:latest" for _ in range(4)]
    api = docker.APIClient(version="auto")
    base_id = api.inspect_image(BASE_IMAGE)["Id"]
    for v in victims[:2]:  # two existing names users build FROM; two that do not exist yet
        repo, _, tag = v.rpartition(":")
        api.tag(base_id, repo, tag)
    try:
        server = server_factory(images={"allowed_bases": [BASE_IMAGE, *victims]})
        # (the suite's own base image is not named: a regression would break other tests)
        folder, evil = _evil_archive(api, tmp_path, server.settings.docker.name_prefix,
                                     victims[:2], victims[2], victims[3])
        job = server.wait_job(server["alice"].submit(folder)["id"], 90)
        assert job["state"] == "succeeded", job
        assert job["image"] == evil
        assert "evil" in server["alice"].call("logs", job["id"])["data"]
        # no name moved, and no name appeared
        assert api.inspect_image(BASE_IMAGE)["Id"] == base_id
        for v in victims[:2]:
            assert api.inspect_image(v)["Id"] == base_id
        for v in victims[2:]:
            with pytest.raises(docker.errors.ImageNotFound):
                api.inspect_image(v)
        # the loaded image carried only DoPQ's own tag, gone with the job
        tag = images.job_tag(server.server.platform.store.owner_id(), "alice", "evil-load",
                             job["id"])
        assert tag.endswith(f"-{job['id']}")
        wait_for(lambda: not api.images(filters={"reference": tag}), 30)
    finally:
        for v in victims:
            try:
                api.remove_image(v, noprune=True)
            except docker.errors.APIError:
                pass
        api.close()


def _tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize(("members", "words"), [
    ({"repositories": b'{"dopq/busybox": {"latest": "x"}}'}, "no manifest.json"),
    ({"manifest.json": b'[{"RepoTags": []}, {"RepoTags": []}]'}, "exactly one image"),
    ({"manifest.json": b"not json"}, "not JSON"),
    ({"manifest.json": b'{"a": 1}'}, "not a list"),
])
def test_image_tar_that_is_not_one_saved_image_is_refused(
        tmp_path: Path, members: dict[str, bytes], words: str) -> None:
    src = _tar(tmp_path / "image.tar", members)
    with pytest.raises(BuildFailed, match=words):
        strip_tags(src, tmp_path / "out.tar")
    assert not (tmp_path / "out.tar").exists()


def test_strip_tags_removes_every_name(tmp_path: Path) -> None:
    src = _tar(tmp_path / "image.tar", {
        "manifest.json": json.dumps([{"Config": "c.json", "RepoTags": ["dopq/busybox:latest",
                                                                       "x:1"], "Layers": []}]
                                    ).encode(),
        "repositories": b'{"dopq/busybox": {"latest": "abc"}}',
        "index.json": json.dumps({"manifests": [{"annotations": {
            "io.containerd.image.name": "dopq/busybox:latest",
            "org.opencontainers.image.ref.name": "latest", "keep": "me"}}]}).encode(),
        "c.json": b"{}",
    })
    strip_tags(src, tmp_path / "out.tar")
    with tarfile.open(tmp_path / "out.tar") as tf:
        names = tf.getnames()
        manifest = json.loads(tf.extractfile("manifest.json").read())  # type: ignore[union-attr]
        index = json.loads(tf.extractfile("index.json").read())  # type: ignore[union-attr]
    assert "repositories" not in names and "c.json" in names
    assert manifest[0]["RepoTags"] is None
    assert index["manifests"][0]["annotations"] == {"keep": "me"}


# -- item 3: reading another user's work through images -----------------------------------------
def _job(folder: Path, name: str, dockerfile_text: str, user: str, **files: str) -> Path:
    job = folder / name
    job.mkdir()
    (job / "Dockerfile").write_text(dockerfile_text)
    for fname, content in files.items():
        (job / fname.replace("_", ".")).write_text(content)
    (job / "container_config.json").write_text(json.dumps(
        {"name": name, "executor_name": user, "num_gpus": 0}))
    return job


def _refused(server: Running, client: Any, folder: Path) -> str:
    """The refusal of a job: at submit (checked early) or as the failed job's error,
    with nothing built (the build log holds no step)."""
    try:
        job = client.submit(folder)
    except JobRejected as exc:
        return str(exc)
    got = server.wait_job(job["id"], 60)
    assert got["state"] == "failed", got
    assert "Step 1/" not in client.call("logs", job["id"], "build")["data"]
    return str(got["error"])


def test_builds_cannot_read_another_users_image(server: Running, jobs_dir: Path) -> None:
    alice, bob, root = server["alice"], server["bob"], server["root"]
    secret = _job(jobs_dir, "secret", f"FROM {BASE_IMAGE}\nCOPY secret.txt /secret.txt\n"
                  "CMD [\"cat\", \"/secret.txt\"]\n", "alice", secret_txt="alice-secret-42")
    job = server.wait_job(alice.submit(secret)["id"], 90)
    assert job["state"] == "succeeded"
    # bob sees no image id of alice's anywhere; the owner and admins do
    assert bob.call("job", job["id"])["image"] is None
    assert all(j["image"] is None for j in bob.call("history"))
    snap = bob.call("snapshot", 50)
    assert all(j.get("image") is None for j in snap["finished"] + snap["running"])
    assert alice.call("job", job["id"])["image"] == root.call("job", job["id"])["image"]
    image = root.call("job", job["id"])["image"]  # the attacker got it anyway
    api = docker.APIClient(version="auto")
    try:
        cache = next(t for t in api.inspect_image(image)["RepoTags"]
                     if t.startswith("dopq-cache/"))
    finally:
        api.close()
    short, hexid = image[7:19], image[7:]
    attacks = {
        "from-id": f"FROM {image}\n",
        "from-hex": f"FROM {hexid}\n",
        "from-short": f"FROM {short}\n",
        "from-cache-tag": f"FROM {cache}\n",
        "from-arg": f"ARG B={short}\nFROM ${{B}}\n",
        "from-continued": f"FROM --platform=linux/amd64 \\\n  {short} AS x\nFROM x\n",
        "copy-from": f"FROM {BASE_IMAGE}\nCOPY --from={short} /secret.txt /x\n",
        "add-from": f"FROM {BASE_IMAGE}\nADD --from={image} /secret.txt /x\n",
        "mount-from": f"FROM {BASE_IMAGE}\nRUN --mount=type=bind,from={short},target=/m "
                      "cat /m/secret.txt\n",
        "onbuild": f"FROM {BASE_IMAGE}\nONBUILD COPY --from={short} /secret.txt /x\n",
        "syntax": f"# syntax=docker/dockerfile:1\nFROM {BASE_IMAGE}\n",
    }
    for name, text in attacks.items():
        error = _refused(server, bob, _job(jobs_dir, name, text, "bob"))
        if name == "syntax":
            assert "syntax" in error
        else:
            assert "not an allowed base image" in error, (name, error)
            assert BASE_IMAGE in error
        assert "alice-secret-42" not in error
    # alice may build on her own earlier image, by id
    mine = _job(jobs_dir, "mine", f"FROM {short}\n", "alice")
    again = server.wait_job(alice.submit(mine)["id"], 90)
    assert again["state"] == "succeeded", again
    assert "alice-secret-42" in alice.call("logs", again["id"])["data"]
    # `dopq images`: the allowed bases, and only the caller's own images
    assert alice.call("images")["allowed_bases"] == [BASE_IMAGE]
    assert image in {o["image"] for o in alice.call("images")["own"]}
    assert image not in {o["image"] for o in bob.call("images")["own"]}


# -- item 8: builds escape the limits -----------------------------------------------------------
def _cgroups_left(owner: str) -> list[str]:
    from dopq.server.builds import cgroup_prefix

    return [str(p) for p in Path("/sys/fs/cgroup").glob(f"*/{cgroup_prefix(owner)}*")]


def test_builds_run_under_the_job_limits(server_factory: Any, jobs_dir: Path) -> None:
    server = server_factory(docker={"pids_limit": 64}, build={"time_limit": "15s"})
    alice = server["alice"]
    builds = {
        "fork-bomb": ("RUN i=0; while [ $i -lt 300 ]; do sleep 60 & i=$((i+1)); done; wait",
                      {}),
        "memory-hog": ("RUN head -c 400m /dev/zero | tail -c 300m > /dev/null",
                       {"required_memory": "128m"}),
        "endless": ("RUN while :; do :; done", {}),
        "network": ("RUN ls /sys/class/net > /nets", {}),
    }
    ids = {}
    for name, (run, cfg) in builds.items():
        folder = good_job(jobs_dir, "alice", name, "cat /nets", config=cfg)
        df = folder / "Dockerfile"
        df.write_text(df.read_text().replace("COPY", f"{run}\nCOPY", 1))
        ids[name] = alice.submit(folder)["id"]
    neighbour = alice.submit(good_job(jobs_dir, "alice", "neighbour", "sleep 3; echo fine"))
    jobs = {name: server.wait_job(i, 120) for name, i in ids.items()}
    fork = jobs["fork-bomb"]
    assert fork["state"] == "failed" and "pids limit (64)" in fork["error"], fork
    hog = jobs["memory-hog"]
    assert hog["state"] == "failed" and "memory limit (128m)" in hog["error"], hog
    endless = jobs["endless"]
    assert endless["state"] == "failed", endless
    assert "build time limit of 15s" in endless["error"], endless
    net = jobs["network"]
    assert net["state"] == "succeeded"
    assert alice.call("logs", net["id"])["data"].split() == ["lo"]  # build.network = false
    assert server.wait_job(neighbour["id"], 60)["state"] == "succeeded"
    # every build's cgroup (and so every RUN container) is gone
    owner = server.server.platform.store.owner_id()
    wait_for(lambda: not _cgroups_left(owner), 30)


# -- item 11: volumes, tags and names of two servers on one engine ------------------------------
def test_volume_data_goes_with_the_container(server: Running, jobs_dir: Path) -> None:
    alice = server["alice"]
    folder = good_job(jobs_dir, "alice", "volume", "echo data > /data/x; sleep 3")
    df = folder / "Dockerfile"
    df.write_text(df.read_text() + "VOLUME /data\n")
    jid = alice.submit(folder)["id"]
    mine = [f"dopq.job={jid}", f"{LABEL_OWNER}={server.server.platform.store.owner_id()}"]
    api = docker.APIClient(version="auto")
    try:
        def volume() -> str | None:
            for c in api.containers(filters={"label": mine}):
                for m in api.inspect_container(c["Id"])["Mounts"]:
                    if m.get("Destination") == "/data":
                        return str(m["Name"])
            return None

        name = wait_for(volume, 60)
        assert server.wait_job(jid)["state"] == "succeeded"
        wait_for(lambda: not api.containers(all=True, filters={"label": mine}), 30)
        names = {v["Name"] for v in (api.volumes().get("Volumes") or [])}
        assert name not in names
    finally:
        api.close()


def test_two_servers_with_one_prefix_never_touch_each_other(
        server_factory: Any, jobs_dir: Path) -> None:
    prefix = "dopqt" + uuid.uuid4().hex[:8]
    one = server_factory(docker={"name_prefix": prefix})
    two = server_factory(docker={"name_prefix": prefix})
    long_job = one["alice"].submit(good_job(jobs_dir, "alice", "long", "sleep 60"))
    running = wait_for(lambda: (j := one["alice"].call("job", long_job["id"]))["state"]
                       == "running" and j["container"] and j, 60)
    # the same job id on the other server, whose start fails (no such user in the image)
    bad = two["alice"].submit(good_job(jobs_dir / "two", "alice", "long", "true",
                                       config={"run_params": {"user": "nobody-here"}}))
    assert bad["id"] == long_job["id"]
    failed = two.wait_job(bad["id"], 60)
    assert failed["state"] == "failed" and "start failed" in failed["error"]
    assert failed["container"] != running["container"]
    # the other server's runtime refuses to stop or remove a container it does not own
    owner_two = two.server.platform.store.owner_id()
    rt = ContainerRuntime()
    try:
        rt.stop(running["container"], 0, owner=owner_two)
        rt.remove(running["container"], owner=owner_two)
        st = rt.status(running["container"])
        assert st is not None and st.running
        assert st.owner == one.server.platform.store.owner_id() != owner_two
    finally:
        rt.close()
    assert one["alice"].call("job", long_job["id"])["state"] == "running"
    # tags: each server's own names, and gone when the job is
    owner_one = one.server.platform.store.owner_id()
    api = docker.APIClient(version="auto")
    try:
        assert not api.images(filters={"reference": owner_tag_pattern(owner_two)})
        assert api.images(filters={"reference": owner_tag_pattern(owner_one)})
        one["alice"].call("cancel", long_job["id"])
        assert one.wait_job(long_job["id"], 30)["state"] == "cancelled"
        wait_for(lambda: not api.images(filters={"reference": owner_tag_pattern(owner_one)}),
                 30)
    finally:
        api.close()


def test_cancelled_and_rejected_jobs_leave_no_tag(server: Running, jobs_dir: Path) -> None:
    alice = server["alice"]
    owner = server.server.platform.store.owner_id()
    blocker = alice.submit(good_job(jobs_dir, "alice", "blocker", "sleep 30", num_gpus=2))
    wait_for(lambda: alice.call("job", blocker["id"])["state"] == "running", 60)
    waiting = alice.submit(good_job(jobs_dir, "alice", "waiting", "true", num_gpus=2))
    wait_for(lambda: alice.call("job", waiting["id"])["state"] == "queued", 60)
    _refused(server, alice, _job(jobs_dir, "rejected", f"FROM {SHORT}\n", "alice"))
    for job in (waiting, blocker):
        alice.call("cancel", job["id"])
        server.wait_job(job["id"], 30)
    api = docker.APIClient(version="auto")
    try:
        wait_for(lambda: not api.images(filters={"reference": owner_tag_pattern(owner)}), 30)
    finally:
        api.close()


def test_a_crash_leaves_no_build_cgroup_of_ours(tmp_path: Path) -> None:
    from dopq.server.builds import cgroup_prefix, remove_stale

    for ctrl in ("pids", "memory", "cpu", "cpuset"):
        (tmp_path / ctrl / f"{cgroup_prefix('mine')}1" / ("c" * 64)).mkdir(parents=True)
        (tmp_path / ctrl / f"{cgroup_prefix('other')}1").mkdir(parents=True)
    assert remove_stale("mine", tmp_path) == 1
    assert sorted(p.name for p in tmp_path.glob("*/dopq-build-*")) == \
        [f"{cgroup_prefix('other')}1"] * 4


def test_a_loaded_image_stays_while_its_array_needs_it(server: Running, tmp_path: Path) -> None:
    """The job tag is a loaded image's only name: dropping it with the array's first
    job would leave the other elements without an image."""
    api = docker.APIClient(version="auto")
    try:
        folder, image = _evil_archive(api, tmp_path, server.settings.docker.name_prefix,
                                      [], "none/none:none", "none")
        api.remove_image(image, force=True)  # loaded fresh: DoPQ's tag is its only name
        cfg = json.loads((folder / "container_config.json").read_text())
        cfg.update(num_gpus=2, command=["sh", "-c", "cat /evil; sleep 3"])  # one at a time
        (folder / "container_config.json").write_text(json.dumps(cfg))
        alice, root = server["alice"], server["root"]
        first = alice.submit(folder, {"array": "0-2"})["id"]

        def elements() -> list[dict[str, Any]] | None:
            rows = [j for j in root.call("queue") + root.call("running")
                    if j.get("array_parent", first) == first or j["id"] == first]
            return rows if len(rows) == 3 else None

        wait_for(elements, 60)
        rest = [first + 1, first + 2]
        root.call("edit", rest, "hold")  # they wait until the first is over and collected
        assert server.wait_job(first)["state"] == "succeeded"
        mine = [f"dopq.job={first}", f"{LABEL_OWNER}={server.server.platform.store.owner_id()}"]
        wait_for(lambda: not api.containers(all=True, filters={"label": mine}), 30)
        root.call("edit", rest, "release")
        jobs = [server.wait_job(j) for j in rest]
        assert [j["state"] for j in jobs] == ["succeeded"] * 2, jobs
        wait_for(lambda: not api.images(filters={"reference": images.job_tag(
            server.server.platform.store.owner_id(), "alice", "evil-load", first)}), 30)
    finally:
        api.close()


def test_the_layer_cache_is_never_shared_between_users(server: Running, jobs_dir: Path) -> None:
    """bob writes alice's RUN line again: the classic builder would hand him the
    layer her step produced (her secret fetched at build time); DoPQ lets a build
    reuse only the user's own layers."""
    alice, bob = server["alice"], server["bob"]
    step = "RUN cat /proc/sys/kernel/random/uuid > /stamp\n"
    tail = "COPY note.txt /note.txt\nCMD [\"cat\", \"/stamp\"]\n"

    def stamp(client: Any, name: str, user: str, note: str) -> str:
        folder = _job(jobs_dir, name, f"FROM {BASE_IMAGE}\n{step}{tail}", user, note_txt=note)
        job = server.wait_job(client.submit(folder)["id"], 90)
        assert job["state"] == "succeeded", job
        return str(client.call("logs", job["id"])["data"]).strip()

    first = stamp(alice, "cache-a1", "alice", "one")
    assert stamp(alice, "cache-a2", "alice", "two") == first  # her own layers are reused
    assert stamp(bob, "cache-b1", "bob", "three") != first  # never hers for bob


def test_an_identical_context_reuses_only_the_users_own_image(
    server: Running, jobs_dir: Path
) -> None:
    alice, bob = server["alice"], server["bob"]
    folder = jobs_dir / "same-context"  # no executor_name: anyone may submit it as it is
    folder.mkdir()
    (folder / "Dockerfile").write_text(f"FROM {BASE_IMAGE}\n"
                                       "RUN cat /proc/sys/kernel/random/uuid > /stamp\n"
                                       "CMD [\"cat\", \"/stamp\"]\n")
    (folder / "container_config.json").write_text('{"name": "same", "num_gpus": 0}')
    first = server.wait_job(alice.submit(folder)["id"], 90)
    again = server.wait_job(alice.submit(folder)["id"], 90)
    theirs = server.wait_job(bob.submit(folder)["id"], 90)
    assert first["state"] == again["state"] == theirs["state"] == "succeeded"
    assert "reusing" in alice.call("logs", again["id"], "build")["data"]
    assert "reusing" not in bob.call("logs", theirs["id"], "build")["data"]
    assert bob.call("logs", theirs["id"])["data"] != alice.call("logs", first["id"])["data"]
