"""Image names and what a user's build may read (pure, but for the tar rewrite).

- ``job_tag``/``cache_tag``: DoPQ's own names, unique per server (the store's
  owner id is in every one), so two servers on one engine never share a tag.
- ``check_references``: a build may read only the admins' allowed bases
  (``images.allowed_bases``, shell patterns), ``scratch``, stages of its own
  Dockerfile, and images of the same user's own earlier jobs. Anything else
  (another user's image by id, short id, digest or tag) is refused.
- ``strip_tags``: copies a ``docker save`` archive with every name removed
  (``manifest.json`` RepoTags emptied, ``repositories`` dropped, OCI name
  annotations removed), so loading it can never re-point a name on the engine.
"""

from __future__ import annotations

import fnmatch
import io
import json
import tarfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from dopq.core import spec as spec_mod
from dopq.core.dockerfile import Reference, onbuild_references
from dopq.core.errors import BuildFailed, JobRejected

# OCI and containerd annotations that name an image in index.json.
NAME_ANNOTATIONS = ("io.containerd.image.name", "org.opencontainers.image.ref.name")
_MAX_JSON = 4 * 2**20  # manifest.json / index.json are small


def job_tag(owner: str, user: str, name: str, job_id: int) -> str:
    """``dopq/<user>/<name>:<owner>-<job-id>``: one job's image on one server."""
    repo, _, _ = spec_mod.normalise_tag(user, name, job_id).rpartition(":")
    return f"{repo}:{owner[:12]}-{job_id}"


def cache_tag(owner: str, context_hash: str) -> str:
    return f"dopq-cache/{owner}:{context_hash[:40]}"


def owner_tag_pattern(owner: str) -> str:
    """Docker's ``reference`` filter for every job tag of this server."""
    return f"dopq/*/*:{owner[:12]}-*"


def normalise_ref(ref: str) -> str:
    """``busybox`` -> ``busybox:latest``; ``docker.io/library/x`` -> ``x``."""
    ref = ref.strip()
    for prefix in ("docker.io/library/", "index.docker.io/library/", "docker.io/",
                   "index.docker.io/"):
        if ref.lower().startswith(prefix):
            ref = ref[len(prefix):]
            break
    if ref.startswith("library/"):
        ref = ref[len("library/"):]
    if "@" not in ref and ":" not in ref.rsplit("/", 1)[-1]:
        ref += ":latest"
    return ref


def is_allowed_base(ref: str, patterns: Iterable[str]) -> bool:
    """Whether ``ref`` is one of the admins' names; a digest only where a pattern has one."""
    name = normalise_ref(ref)
    return any(fnmatch.fnmatchcase(name, normalise_ref(p)) and ("@" in name) == ("@" in p)
               for p in patterns)


def check_references(
    refs: list[Reference],
    allowed: list[str],
    own_images: set[str],
    resolve: Callable[[str], dict[str, Any] | None],
) -> None:
    """Refuse any reference that is not an allowed base or the user's own image.

    ``resolve(ref)`` is the engine's inspect (None when there is no such
    image). An allowed base's or own image's ONBUILD triggers are checked too:
    they run inside this build.
    """
    todo = list(refs)
    seen: set[str] = set()
    while todo:
        ref = todo.pop(0)
        if ref.ref in seen:
            continue
        seen.add(ref.ref)
        info = resolve(ref.ref)
        if not is_allowed_base(ref.ref, allowed):
            if info is None:  # a build would have to pull it
                raise JobRejected(
                    f"{ref.instruction} {ref.ref} (Dockerfile line {ref.line}): not available "
                    "on this server (no registry access) and not an allowed base image; "
                    f"allowed bases: {allowed_text(allowed)}, scratch, or your own earlier job "
                    "images (dopq images)")
            if str(info.get("Id")) not in own_images:
                where = f"{ref.instruction} on Dockerfile line {ref.line}"
                raise JobRejected(
                    f"{where}: {ref.ref!r} is not an allowed base image; a build may start "
                    f"from {allowed_text(allowed)}, scratch, or your own earlier job images "
                    "(dopq images)")
        triggers = ((info or {}).get("Config") or {}).get("OnBuild") or []
        if triggers:
            todo.extend(onbuild_references([str(t) for t in triggers]))


def allowed_text(allowed: list[str]) -> str:
    return ", ".join(allowed) if allowed else "(no base images: ask an admin)"


def strip_tags(src: Path, dst: Path, max_members: int = 100000) -> None:
    """Copy the image archive ``src`` to ``dst`` without any image names.

    Streams member by member (nothing is unpacked to disk). Refuses an
    archive that is not ``docker save`` output with exactly one image.
    """
    found_manifest = False
    try:
        with tarfile.open(src, "r:") as tin, tarfile.open(dst, "w:", format=tarfile.PAX_FORMAT
                                                           ) as tout:
            count = 0
            for member in tin:
                count += 1
                if count > max_members:
                    raise BuildFailed("image.tar: too many entries")
                name = member.name.lstrip("./")
                if name == "repositories":
                    continue  # the legacy name list: dropped
                if name in ("manifest.json", "index.json") and member.isfile():
                    data = _read_small(tin, member)
                    if name == "manifest.json":
                        found_manifest = True
                        data = _strip_manifest(data)
                    else:
                        data = _strip_index(data)
                    out = tarfile.TarInfo(member.name)
                    out.size, out.mode, out.mtime = len(data), 0o644, member.mtime
                    tout.addfile(out, io.BytesIO(data))
                    continue
                if member.isfile():
                    tout.addfile(member, tin.extractfile(member))
                elif member.isdir() or member.issym() or member.islnk():
                    tout.addfile(member)
                else:
                    raise BuildFailed(f"image.tar: unexpected entry type ({member.name})")
    except (tarfile.TarError, OSError, EOFError) as exc:
        dst.unlink(missing_ok=True)
        raise BuildFailed(f"image.tar: not a readable tar archive ({exc.__class__.__name__})"
                          ) from None
    except BuildFailed:
        dst.unlink(missing_ok=True)
        raise
    if not found_manifest:
        dst.unlink(missing_ok=True)
        raise BuildFailed("image.tar: no manifest.json (make it with docker save)")


def _read_small(tin: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    if member.size > _MAX_JSON:
        raise BuildFailed(f"image.tar: {member.name} is too large")
    fh = tin.extractfile(member)
    if fh is None:
        raise BuildFailed(f"image.tar: cannot read {member.name}")
    return fh.read()


def _strip_manifest(data: bytes) -> bytes:
    try:
        manifest = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise BuildFailed("image.tar: manifest.json is not JSON") from None
    if not isinstance(manifest, list) or not all(isinstance(m, dict) for m in manifest):
        raise BuildFailed("image.tar: manifest.json is not a list of images")
    if len(manifest) != 1:
        raise BuildFailed(f"image.tar: must hold exactly one image (found {len(manifest)})")
    for entry in manifest:
        entry["RepoTags"] = None
    return json.dumps(manifest).encode()


def _strip_index(data: bytes) -> bytes:
    try:
        index = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise BuildFailed("image.tar: index.json is not JSON") from None
    if not isinstance(index, dict):
        raise BuildFailed("image.tar: index.json is not an object")
    for desc in index.get("manifests") or []:
        if isinstance(desc, dict) and isinstance(desc.get("annotations"), dict):
            for key in NAME_ANNOTATIONS:
                desc["annotations"].pop(key, None)
    return json.dumps(index).encode()
