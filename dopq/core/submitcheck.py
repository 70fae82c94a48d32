"""What ``dopq submit`` checks on the submitter's side, and its upload progress.

Before anything is zipped or sent: the folder (or zip) has a
``container_config.json`` that parses and passes ``dopq.core.spec`` with the
options, and a ``Dockerfile`` of that exact name (or ``image.tar`` when
``build_flag`` is false). What only the server knows (its limits, the
``--after`` jobs, the allowed base images) it judges from the config and
Dockerfile sent with ``submit_begin`` (``dopq.server.intake``), and again from the
archive at ``submit_finish``.
"""

from __future__ import annotations

import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from dopq.core import archive as archive_mod
from dopq.core import spec as spec_mod
from dopq.core.dockerignore import ALWAYS_SENT, context_files
from dopq.core.errors import JobRejected, NotFound

SEND_AT_MOST = 512 * 1024  # of config and Dockerfile each, with submit_begin (its call is capped)
_NO_LIMITS = archive_mod.ArchiveLimits(2**62, 2**62, 10**7)  # the server applies its own


@dataclass
class Prepared:
    """A job folder or zip as read here."""

    config: dict[str, Any]
    dockerfile: str | None = None
    files: list[tuple[str, Path, os.stat_result]] | None = None  # a folder's, .dockerignore'd
    notes: list[str] = field(default_factory=list)

    def check(self) -> dict[str, Any]:
        """What ``submit_begin`` carries for the server's verdict."""
        sent: dict[str, Any] = {}
        if len(repr(self.config)) <= SEND_AT_MOST:
            sent["config"] = self.config
        if self.dockerfile is not None and len(self.dockerfile) <= SEND_AT_MOST:
            sent["dockerfile"] = self.dockerfile
        return sent


def prepare(path: Path, options: dict[str, Any] | None = None) -> Prepared:
    """Read and check a job folder or zip; ``JobRejected`` names the first mistake."""
    path = Path(path)
    if path.is_dir():
        prepared = _folder(path)
    elif path.is_file():
        prepared = _zip(path)
    else:
        raise NotFound(f"{path}: no such file or folder")
    check_spec(prepared.config, options)
    return prepared


def check_spec(config: dict[str, Any], options: dict[str, Any] | None) -> None:
    """``dopq.core.spec`` on the config and options, as the server will run it (the
    user checks, which need the server's accounts, are left to it)."""
    overrides = {k: v for k, v in (options or {}).items() if k != "user"}
    executor = config.get("executor_name")
    submitter = executor if isinstance(executor, str) else (options or {}).get("user") or "you"
    spec_mod.parse_spec(config, submitter=submitter, overrides=overrides, allowed_users=())


def _folder(folder: Path) -> Prepared:
    try:
        names = set(os.listdir(folder))  # exact names, also on case-insensitive disks
    except OSError as exc:
        raise NotFound(f"{folder}: {exc.strerror}") from None
    config_name, docker_name = archive_mod.CONFIG_NAME, archive_mod.DOCKERFILE_NAME
    data = _small_file(folder, config_name, names)
    if data is None:
        raise JobRejected(f"no {config_name} in {folder}" + near_miss(names, config_name))
    config = archive_mod.load_config(data)
    keep = set(ALWAYS_SENT)
    prepared = Prepared(config)
    if config.get("build_flag") is False:
        keep.add(archive_mod.IMAGE_TAR_NAME)
        if archive_mod.IMAGE_TAR_NAME not in names:
            raise JobRejected(f"build_flag is false but {folder} has no image.tar")
    else:
        text = _small_file(folder, docker_name, names)
        if text is None:
            raise JobRejected(f"no {docker_name} in {folder}" + near_miss(names, docker_name))
        try:
            prepared.dockerfile = text.decode("utf-8")
        except UnicodeDecodeError:
            raise JobRejected(f"{folder / docker_name} is not UTF-8 text") from None
    prepared.files = list(context_files(folder, keep))
    return prepared


def _small_file(folder: Path, name: str, names: set[str]) -> bytes | None:
    if name not in names:
        return None
    path = folder / name
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode):
        raise JobRejected(f"{path} is not a regular file")
    if st.st_size > archive_mod.MAX_CONFIG_BYTES:
        raise JobRejected(f"{path} is larger than {archive_mod.MAX_CONFIG_BYTES} bytes")
    return path.read_bytes()


def _zip(path: Path) -> Prepared:
    names, data = archive_mod.peek(path, _NO_LIMITS)
    config_name, docker_name = archive_mod.CONFIG_NAME, archive_mod.DOCKERFILE_NAME
    if config_name not in data:
        raise JobRejected(f"{path}: no {config_name} at the top of the zip"
                          + near_miss(names, config_name))
    config = archive_mod.load_config(data[config_name])
    prepared = Prepared(config)
    if config.get("build_flag") is False:
        if archive_mod.IMAGE_TAR_NAME not in names:
            raise JobRejected(f"build_flag is false but {path} has no image.tar")
        return prepared
    if docker_name not in data:
        raise JobRejected(f"{path}: no {docker_name} at the top of the zip"
                          + near_miss(names, docker_name))
    try:
        prepared.dockerfile = data[docker_name].decode("utf-8")
    except UnicodeDecodeError:
        raise JobRejected(f"{path}: the Dockerfile is not UTF-8 text") from None
    return prepared


def near_miss(names: set[str], wanted: str) -> str:
    """``" (found 'dockerfile': the name must be exactly 'Dockerfile')"`` or ``""``."""
    close = sorted(n for n in names if n.lower() == wanted.lower() and n != wanted)
    if not close:
        return ""
    return f" (found {close[0]!r}: the name must be exactly {wanted!r})"


def human(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


class UploadProgress:
    """One updating line on a terminal: ``uploading 12.0 MiB of 40.0 MiB (30%)``.

    Silent unless ``stream`` is a terminal (and not asked to be quiet, as with
    ``--json``); at most ten updates a second, the last one always shown.
    """

    def __init__(self, stream: TextIO, quiet: bool = False, interval: float = 0.1) -> None:
        try:
            tty = stream.isatty()
        except (AttributeError, ValueError):
            tty = False
        self.stream = stream
        self.enabled = tty and not quiet
        self.interval = interval
        self._last = 0.0
        self._width = 0

    def __call__(self, sent: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last < self.interval and sent < total:
            return
        self._last = now
        line = f"uploading {human(sent)} of {human(total)} ({sent * 100 // max(total, 1)}%)"
        pad = " " * max(0, self._width - len(line))
        self._width = len(line)
        self.stream.write(f"\r{line}{pad}")
        if sent >= total:
            self.stream.write("\n")
        self.stream.flush()
