"""Uploads through the API: begin, chunks, abort, finish (then a job exists).

An upload is judged before a byte is sent (``submit_begin``: who may submit
what, the options, the config and Dockerfile the client read) and again on
the whole archive at ``submit_finish``; only then is a job row made and the
archive handed to the Provider. Each upload holds its queue slots from the
start (``QueueSlots``), so parallel uploads cannot overshoot the per-user
limit. Part files live in ``state/uploads``; an upload idle for
``intake.upload_timeout`` is discarded.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dopq.core.errors import Conflict, DopqError, LimitExceeded, NotFound
from dopq.core.settings import Settings
from dopq.core.text import safe_name
from dopq.server import authz
from dopq.server.auth import Principal, check_username
from dopq.server.intake import Intake
from dopq.server.limits import QueueSlots, submission_slots
from dopq.server.runtime import ContainerRuntime
from dopq.server.store import Store

MAX_CHUNK = 4 * 2**20
_STREAM_BUFFER = 1 << 20  # bytes per read from the local socket
OPTIONS = frozenset({
    "name", "gpus", "gpu_memory", "memory", "cpus", "time_limit", "shm_size",
    "priority", "command", "env", "after", "after_any", "array", "preemptible",
})


@dataclass
class Upload:
    id: str
    user: str
    size: int
    overrides: dict[str, Any]
    path: Path
    received: int = 0
    last: float = field(default_factory=time.time)
    by: str = ""
    slots: int = 1  # queue slots reserved (an array: one per element)
    source_name: str = ""  # the zip's or folder's name: the job's name until its config names it
    streaming: bool = False  # its bytes are coming through the local socket (localupload)


class Uploads:
    """The uploads in flight, in this process's memory (a restart drops them)."""

    def __init__(self, settings: Settings, store: Store, runtime: ContainerRuntime,
                 total_gpus: int, send: Callable[[tuple[Any, ...]], None],
                 device_memory: int = 0) -> None:
        self.settings = settings
        self.store = store
        self.runtime = runtime
        self.total_gpus = total_gpus
        self.device_memory = device_memory  # the largest GPU's, in bytes (0: not known)
        self.send = send  # to the Provider
        self.slots = QueueSlots(store, settings.policy.max_queued_per_user)
        self.pending: dict[str, Upload] = {}
        self._lock = threading.Lock()
        # Uploads cut off by a stop or crash: their clients got no job id.
        for part in (settings.state_path / "uploads").glob("*.part"):
            part.unlink(missing_ok=True)

    def _intake(self) -> Intake:
        return Intake(self.settings, self.store, self.runtime, self.total_gpus,
                      self.device_memory)

    def begin(self, who: Principal, size: int, overrides: dict[str, Any],
              check: dict[str, Any] | None = None) -> str:
        size = int(size)
        limit = self.settings.bytes_of("limits.max_upload")
        if size <= 0:
            raise LimitExceeded("upload is empty")
        if size > limit:
            raise LimitExceeded(
                f"upload of {size} bytes is over the limit of {self.settings.limits.max_upload}"
            )
        wanted = overrides.pop("user", None)
        user = check_username(wanted) if wanted else who.name
        allowed = self.settings.users.allowed
        authz.require(who, authz.Action.SUBMIT, user=user, allowed=allowed)
        source_name = safe_name(str(overrides.pop("source_name", "") or ""), "")[:128]
        for key in overrides:
            if key not in OPTIONS:
                raise DopqError(f"unknown submit option {key!r}")
        slots = submission_slots(overrides)  # every option checked before anything is kept
        gpus = overrides.get("gpus")
        if isinstance(gpus, int) and gpus > self.total_gpus:
            raise LimitExceeded(f"asks for {gpus} GPUs, this server has {self.total_gpus}")
        authz.require(who, authz.Action.SUBMIT, user=user, allowed=allowed,
                      priority=overrides.get("priority"))
        self._intake().at_begin(who, user, overrides, check)  # the verdict, before a byte
        uid = uuid.uuid4().hex
        self.slots.reserve(uid, user, slots)  # the queue limit, uploads in flight counted
        path = self.settings.state_path / "uploads" / f"{uid}.part"
        try:
            path.touch(mode=0o600)
        except OSError as exc:
            self.slots.release(uid)
            raise DopqError(f"cannot store upload: {exc.strerror}") from None
        with self._lock:
            self.pending[uid] = Upload(uid, user, size, dict(overrides), path, by=who.name,
                                       slots=slots, source_name=source_name)
        return uid

    def _get(self, who: Principal, upload_id: str) -> Upload:
        up = self.pending.get(str(upload_id))
        if up is None:
            raise NotFound(f"no upload {upload_id} (expired or finished)")
        authz.require(who, authz.Action.UPLOAD, up.user)
        return up

    def chunk(self, who: Principal, upload_id: str, data: bytes) -> int:
        if len(data) > MAX_CHUNK:
            raise LimitExceeded(f"chunk over {MAX_CHUNK} bytes")
        with self._lock:
            up = self._get(who, upload_id)
            if up.streaming:
                raise Conflict("upload is being sent through the local socket")
            if up.received + len(data) > up.size:
                self._discard(up)
                raise LimitExceeded("upload is larger than announced; discarded")
            try:
                with up.path.open("ab") as fh:
                    fh.write(data)
            except OSError as exc:
                self._discard(up)
                raise DopqError(f"cannot store upload: {exc.strerror}") from None
            up.received += len(data)
            up.last = time.time()
            return up.received

    def receive(self, upload_id: str, read: Callable[[memoryview], int],
                open_ended: bool = False) -> int:
        """Fill an empty upload from ``read`` (as ``socket.recv_into``: 0 at the end) and
        return its size: the local socket's door (``dopq.server.localupload``), where
        the upload id is the key. Not under the lock while bytes flow; chunks and
        ``finish`` are refused meanwhile. A failure leaves the upload empty again
        (or discarded, past its announced size). ``open_ended``: the announced size
        was a bound; the upload is as long as the stream (only its client, which
        alone knows the id, finishes it, once it got ``ok`` with its own count)."""
        with self._lock:
            up = self.pending.get(str(upload_id))
            if up is None:
                raise NotFound("no such upload (expired or finished)")
            if up.streaming or up.received:
                raise Conflict("upload has data already")
            up.streaming = True
        buf = memoryview(bytearray(_STREAM_BUFFER))
        try:
            with up.path.open("r+b") as fh:
                while n := read(buf):
                    if up.received + n > up.size:
                        with self._lock:
                            self._discard(up)
                        raise LimitExceeded("upload is larger than announced; discarded")
                    fh.write(buf[:n])
                    up.received += n
                    up.last = time.time()
                    if up.id not in self.pending:
                        raise NotFound("upload was aborted")
            if open_ended and up.received:
                up.size = up.received
            if up.received != up.size:
                raise Conflict(f"stream ended after {up.received} of {up.size} bytes")
            return up.received
        except BaseException:
            up.received = 0
            with contextlib.suppress(OSError):
                os.truncate(up.path, 0)
            raise
        finally:
            up.streaming = False

    def _discard(self, up: Upload) -> None:
        self.pending.pop(up.id, None)
        self.slots.release(up.id)
        up.path.unlink(missing_ok=True)

    def abort(self, who: Principal, upload_id: str) -> None:
        with self._lock:
            self._discard(self._get(who, upload_id))

    def sweep(self, now: float) -> None:
        """Discard uploads idle for longer than ``intake.upload_timeout``."""
        with self._lock:
            for up in list(self.pending.values()):
                if now - up.last > self.settings.intake.upload_timeout:
                    self._discard(up)

    def finish(self, who: Principal, upload_id: str) -> int:
        """Judge the whole archive, make its job and hand it to the Provider; the job id."""
        with self._lock:
            up = self._get(who, upload_id)
            if up.streaming:
                raise Conflict("upload is being sent through the local socket")
            if up.received != up.size:
                raise Conflict(f"upload incomplete: {up.received} of {up.size} bytes")
            self.pending.pop(up.id, None)
        try:  # the archive's own verdict, before a job exists
            self._intake().archive(who, up.user, up.path, up.overrides)
        except DopqError:
            self._discard(up)
            raise
        target = self.settings.state_path / "incoming" / f"api-{up.id}.zip"
        name = str(up.overrides.get("name") or up.source_name or "job")[:128]
        # In place before the job exists: the Provider may find a received job on its
        # own (a scan), before it is told, and must find its archive.
        os.replace(up.path, target)
        try:  # the limit again, in the transaction that creates the job
            job_id = self.slots.add_job(up.id, dict(
                name=name, user=up.user, origin="api", source=str(target), overrides=up.overrides,
                submitted_by=up.by or up.user,
            ), up.slots)
        except DopqError:
            target.unlink(missing_ok=True)
            raise
        self.send(("job", job_id))
        return job_id

    def __len__(self) -> int:
        return len(self.pending)
