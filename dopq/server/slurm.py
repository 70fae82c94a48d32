"""The seam around a Slurm cluster: ``SlurmRuntime``, a job runtime whose containers
run on Slurm's nodes.

Each job is one Slurm batch job (``sbatch``) whose script (``dopq.server.batch``)
runs the container on the node's Docker engine. The job folder
``<shared_dir>/<owner>/job-<job id>-<name>/`` (on storage every node sees) holds
``job.sh``, ``log`` (the container's output, streamed), ``status`` (JSON the
script writes when the container is gone), ``slurm.out`` and ``meta.json``
(the Slurm job id and the name, written here after ``sbatch``).

Every Slurm command goes through ``runner(argv, timeout) -> (rc, stdout, stderr)``;
the default runs it without a shell, with ``SLURM_CONF`` and ``bin_dir`` from
the settings. A controller that does not answer is ``EngineUnavailable`` (the
queue waits, as for a Docker engine that is down); other failures are
``DopqError`` with Slurm's first line. Reading Slurm's answers is
``dopq.server.slurmstate`` (pure). A Slurm job is ours when its comment is
``dopq:<owner>:<job id>`` and it was submitted by this process's user.
"""

from __future__ import annotations

import builtins
import json
import logging
import math
import os
import re
import secrets
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from dopq.core.errors import DopqError, EngineUnavailable
from dopq.core.settings import Settings
from dopq.server.batch import batch_script
from dopq.server.runspec import LABEL_JOB, LABEL_OWNER, ContainerSpec, ContainerStatus
from dopq.server.slurmstate import (
    ALIVE,
    HOLDING,
    NOT_STARTED,
    SQUEUE_FORMAT,
    SlurmJob,
    SlurmNode,
    gres_gpus,
    job_status,
    node_state,
    parse_jobs,
    parse_nodes,
    sbatch_argv,
    tres_gpus,
)

__all__ = ["Runner", "SlurmNode", "SlurmRuntime", "subprocess_runner"]

Runner = Callable[[builtins.list[str], float], tuple[int, str, str]]
STATUS_POLL = 0.2  # seconds between looks at running jobs' status files
log = logging.getLogger("dopq.server.slurm")

TIMEOUT = 10.0
REF_PREFIX = "slurm-"
UNREACHABLE = ("unable to contact slurm controller", "socket timed out", "connection refused",
               "zero bytes were transmitted", "communication connection failure",
               "transport endpoint is not connected", "slurm_persist_conn_open")
SAFE_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def subprocess_runner(settings: Settings) -> Runner:
    """Slurm's commands as child processes: no shell, a small environment."""
    conf, bin_dir = settings.slurm.conf, settings.slurm.bin_dir
    # sbatch hands its environment to the job: only what the script needs
    # (HOME: the docker CLI's config, with the registry's credentials).
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"}
    for name in ("TZ", "HOME"):
        if os.environ.get(name):
            env[name] = os.environ[name]
    if conf:
        env["SLURM_CONF"] = conf

    def run(argv: builtins.list[str], timeout: float) -> tuple[int, str, str]:
        cmd = [str(Path(bin_dir) / argv[0]) if bin_dir else argv[0], *argv[1:]]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                  env=env, stdin=subprocess.DEVNULL, check=False)
        except subprocess.TimeoutExpired:
            raise EngineUnavailable(f"Slurm: {argv[0]} did not answer in {timeout:g} s") from None
        except OSError as exc:
            raise DopqError(f"Slurm: cannot run {cmd[0]}: {exc.strerror}") from None
        return done.returncode, done.stdout, done.stderr

    return run


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")[:300]


def _tail(fh: BinaryIO, lines: int) -> bytes:
    """The last ``lines`` lines of a file, read from its end."""
    if lines <= 0:
        return b""
    end = fh.seek(0, os.SEEK_END)
    data = b""
    pos = end
    while pos > 0 and data.count(b"\n", 0, len(data) - 1) < lines:
        step = min(pos, 1 << 16)
        pos -= step
        fh.seek(pos)
        data = fh.read(step) + data
    return b"".join(data.splitlines(keepends=True)[-lines:])


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # there but unreadable: the job did end
    return data if isinstance(data, dict) else {}


class SlurmRuntime:
    """Jobs as Slurm batch jobs, each running its container on a node's engine."""

    def __init__(self, settings: Settings, owner: str, runner: Runner | None = None, *,
                 grace: float | None = None, clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.settings = settings
        self.owner = owner
        self.grace = settings.docker.stop_grace if grace is None else grace
        self._run = runner or subprocess_runner(settings)
        self._clock = clock
        self._sleep = sleep
        self._uid = os.getuid()
        self._dirs: dict[str, Path] = {}
        self._lock = threading.Lock()

    # -- Slurm commands ------------------------------------------------------------
    def _call(self, argv: builtins.list[str], *, missing_ok: bool = False) -> str | None:
        rc, out, err = self._run(argv, TIMEOUT)
        if rc == 0:
            return out
        low = err.lower()
        if any(text in low for text in UNREACHABLE):
            raise EngineUnavailable(f"Slurm controller unavailable: {_first_line(err)}")
        if missing_ok and ("invalid job id" in low or "already completing or completed" in low):
            return None
        raise DopqError(f"Slurm: {argv[0]}: {_first_line(err) or f'exit status {rc}'}")

    def _jobs(self, job: int | None = None) -> builtins.list[SlurmJob]:
        argv = ["squeue", "--noheader", "--all", "--states=all", f"--user={self._uid}",
                f"--format={SQUEUE_FORMAT}"]
        if job is not None:
            argv.append(f"--jobs={job}")
        out = self._call(argv, missing_ok=job is not None)
        rows = parse_jobs(out or "")
        return [r for r in rows if job is None or r.id == job]

    def _comment(self, job: SlurmJob) -> tuple[str, int] | None:
        """(owner, DoPQ job id) of a job this user submitted for a DoPQ server, else None."""
        tag, _, rest = job.comment.partition(":")
        owner, _, job_id = rest.rpartition(":")
        if tag != "dopq" or job.uid != self._uid or not owner or not job_id.isdigit():
            return None
        return owner, int(job_id)

    def _ours(self, job: SlurmJob, owner: str) -> int | None:
        """The DoPQ job id of a Slurm job of ``owner``'s, else None."""
        mine = self._comment(job)
        return mine[1] if mine is not None and mine[0] == owner else None

    def ping(self) -> bool:
        try:
            out = self._call(["scontrol", "ping"])
        except DopqError:
            return False
        return "UP" in (out or "")

    def has_nvidia_runtime(self) -> bool:
        return False

    def close(self) -> None:
        pass

    # -- nodes -----------------------------------------------------------------------
    def nodes(self) -> builtins.list[SlurmNode]:
        """Every node with its state, GPUs and the GPUs other jobs hold on it."""
        # --details: GresUsed, the GPUs in use where AllocTRES does not count them
        text = self._call(["scontrol", "--details", "--oneliner", "show", "node"])
        rows = parse_nodes(text or "")
        ours: dict[str, int] = {}
        for job in self._jobs():
            if job.state in HOLDING and self._ours(job, self.owner) is not None:
                ours[job.node] = ours.get(job.node, 0) + job.gpus
        out = []
        for row in rows:
            name = row.get("NodeName", "")
            state, usable = node_state(row.get("State", "UNKNOWN"))
            alloc = tres_gpus(row.get("AllocTRES", ""))
            if alloc is None:
                alloc = gres_gpus(row.get("GresUsed", ""))
            memory = row.get("RealMemory", "0")
            cpus = row.get("CPUTot", "0")
            out.append(SlurmNode(
                name=name, state=state, usable=usable, gpus=gres_gpus(row.get("Gres", "")),
                cpus=int(cpus) if cpus.isdigit() else 0,
                memory=int(memory) * 2**20 if memory.isdigit() else 0,
                foreign_gpus=max(0, alloc - ours.get(name, 0))))
        return out

    # -- job folders -------------------------------------------------------------
    def _root(self, owner: str) -> Path:
        shared = self.settings.slurm.shared_dir
        if not shared:
            raise DopqError("slurm.shared_dir is not set: the nodes need a shared folder")
        if not SAFE_NAME.fullmatch(owner) or owner.startswith("."):
            raise DopqError(f"slurm: bad owner id {owner[:40]!r}")
        return Path(shared) / owner

    def _folders(self, owner: str) -> dict[str, Path]:
        """ref -> job folder, from the folders' meta.json (after a restart too)."""
        root = self._root(owner)
        found: dict[str, Path] = {}
        try:
            entries = builtins.list(root.iterdir())
        except FileNotFoundError:
            return found
        for d in entries:
            if not d.name.startswith("job-"):
                continue
            meta = _read_json(d / "meta.json") or {}
            sid = str(meta.get("slurm_job", ""))
            if sid.isdigit():
                found[REF_PREFIX + sid] = d
        with self._lock:
            self._dirs.update(found)
        return found

    def _folder(self, ref: str, owner: str, job_id: int | None = None) -> Path | None:
        with self._lock:
            known = self._dirs.get(ref)
        if known is not None and known.is_dir():
            return known
        found = self._folders(owner).get(ref)
        if found is None and job_id is not None:
            # sbatch answered but the server died before meta.json: by the job id
            # (a folder with a meta.json belongs to another run of the job)
            matches = [d for d in self._root(owner).glob(f"job-{job_id}-*")
                       if _read_json(d / "meta.json") is None]
            found = matches[0] if len(matches) == 1 else None
        if found is not None:
            with self._lock:
                self._dirs[ref] = found
        return found

    @staticmethod
    def _job_number(ref: str) -> int | None:
        rest = ref[len(REF_PREFIX):] if ref.startswith(REF_PREFIX) else ""
        return int(rest) if rest.isdigit() else None

    # -- the runtime seam --------------------------------------------------------
    def run(self, spec: ContainerSpec) -> str:
        """Write the job's folder and script, ``sbatch`` it; return ``slurm-<id>``."""
        owner = spec.labels.get(LABEL_OWNER) or self.owner
        job_text = spec.labels.get(LABEL_JOB, "")
        if not job_text.isdigit():
            raise DopqError(f"slurm: the spec has no job id label ({LABEL_JOB})")
        job_id = int(job_text)
        root = self._root(owner)
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", spec.name)[:100]
        # One folder per run: a rerun (after a requeue) never shares the status, log or
        # removal of the run before it.
        job_dir = root / f"job-{job_id}-{safe}-{secrets.token_hex(4)}"
        job_dir.mkdir(mode=0o700)
        os.chmod(job_dir, 0o700)
        script = batch_script(spec, str(job_dir), self.grace, self.settings.slurm.node_docker)
        fd = os.open(job_dir / "job.sh", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o700)
        with os.fdopen(fd, "w") as fh:
            fh.write(script)
        try:
            out = self._call(sbatch_argv(self.settings, spec, job_dir, owner, job_id,
                                         self.grace)) or ""
        except DopqError:
            shutil.rmtree(job_dir, ignore_errors=True)
            raise
        sid = out.strip().split(";")[0]
        if not sid.isdigit():
            raise DopqError(f"Slurm: sbatch gave no job id: {_first_line(out)!r}")
        tmp = job_dir / "meta.json.tmp"
        tmp.write_text(json.dumps({"slurm_job": sid, "name": spec.name, "job_id": job_id}))
        tmp.replace(job_dir / "meta.json")
        ref = REF_PREFIX + sid
        with self._lock:
            self._dirs[ref] = job_dir
        return ref

    def _status_of(self, ref: str, job: SlurmJob | None, folder: Path | None, owner: str,
                   job_id: int | None) -> ContainerStatus:
        meta = (_read_json(folder / "meta.json") or {}) if folder else {}
        status = _read_json(folder / "status") if folder else None
        name = str(meta.get("name") or (job.name if job else "") or (folder.name if folder
                                                                     else ""))
        if job_id is None and isinstance(meta.get("job_id"), int):
            job_id = int(meta["job_id"])
        return job_status(ref, name, job_id, owner, job, status, self._clock(),
                          self.settings.slurm.requeue_on_node_failure)

    def status(self, ref: str) -> ContainerStatus | None:
        """The job behind ``ref``; None when neither Slurm nor a job folder knows it."""
        number = self._job_number(ref)
        if number is None:
            return None
        rows = self._jobs(number)
        job = rows[0] if rows else None
        owner, job_id = self.owner, None
        if job is not None:
            mine = self._comment(job)
            if mine is None:
                return None  # not a DoPQ server's Slurm job
            owner, job_id = mine
        folder = self._folder(ref, owner, job_id)
        if folder is None:
            return None  # removed (Slurm keeps an ended job's row a few minutes)
        return self._status_of(ref, job, folder, owner, job_id)

    def list(self, instance: str, owner: str | None = None) -> builtins.list[ContainerStatus]:
        """This server's jobs: those Slurm knows, and folders whose Slurm job is gone.

        ``instance`` is not used: the owner in the comment already tells servers apart.
        """
        owner = owner or self.owner
        # The folders first: a job submitted meanwhile is then surely in squeue's
        # answer, never taken for one that Slurm lost.
        folders = self._folders(owner)
        out: builtins.list[ContainerStatus] = []
        for job in self._jobs():
            job_id = self._ours(job, owner)
            if job_id is None:
                continue
            ref = f"{REF_PREFIX}{job.id}"
            folder = folders.pop(ref, None)
            if folder is None and job.state in ALIVE:
                folder = self._folder(ref, owner, job_id)
            if folder is None:
                continue  # removed (Slurm keeps an ended job's row a few minutes)
            out.append(self._status_of(ref, job, folder, owner, job_id))
        for ref, folder in sorted(folders.items()):
            out.append(self._status_of(ref, None, folder, owner, None))
        return out

    def stop(self, ref: str, grace: float, *, owner: str) -> None:
        """SIGTERM to the batch script (it stops the container with ``grace``), then
        ``scancel`` if the job is still there ``grace`` + 5 s later. Blocks the caller."""
        number = self._job_number(ref)
        st = self.status(ref)
        if number is None or st is None or not st.running:
            return
        if st.owner != owner:
            log.warning("not touching Slurm job %s: owner %r is not %r", ref, st.owner, owner)
            return
        rows = self._jobs(number)
        if not rows or rows[0].state in NOT_STARTED:
            self._call(["scancel", str(number)], missing_ok=True)
            return
        self._call(["scancel", "--batch", "--signal=TERM", str(number)], missing_ok=True)
        deadline = self._clock() + grace + 5
        while self._clock() < deadline:
            self._sleep(0.5)
            st = self.status(ref)
            if st is None or not st.running:
                return
        self._call(["scancel", str(number)], missing_ok=True)

    def remove(self, ref: str, *, owner: str) -> None:
        """Cancel the job if Slurm still runs it and delete its folder (and only that)."""
        number = self._job_number(ref)
        if number is None:
            return
        rows = self._jobs(number)
        if rows:
            if self._ours(rows[0], owner) is None:
                log.warning("not touching Slurm job %s: not %r's", ref, owner)
                return
            if rows[0].state in ALIVE:
                self._call(["scancel", str(number)], missing_ok=True)
        # By the ref only: the job id's fallback (a folder without meta.json) may be a
        # new run of the same job being submitted right now, never to be deleted.
        folder = self._folder(ref, owner)
        with self._lock:
            self._dirs.pop(ref, None)
        if folder is not None and folder.parent == self._root(owner):
            shutil.rmtree(folder, ignore_errors=True)

    def logs(self, ref: str, *, tail: int | str = "all") -> bytes:
        folder = self._folder(ref, self.owner)
        if folder is None:
            return b""
        try:
            with (folder / "log").open("rb") as fh:
                if tail == "all" or not isinstance(tail, int):
                    return fh.read()
                return _tail(fh, tail)
        except OSError:
            return b""

    def save_logs(self, ref: str, path: Path, cap: int) -> int:
        """Copy the job's log to ``path`` (at most ``cap`` bytes, then a truncation mark)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        folder = self._folder(ref, self.owner)
        written = 0
        with path.open("wb") as out:
            if folder is None:
                return 0
            try:
                src = (folder / "log").open("rb")
            except OSError:
                return 0
            with src:
                while chunk := src.read(1 << 20):
                    room = cap - written
                    out.write(chunk[:room])
                    written += min(len(chunk), room)
                    if len(chunk) > room:
                        out.write(b"\n[dopq: log truncated]\n")
                        break
        return written

    def stats(self, ref: str) -> dict[str, float] | None:
        return None

    def foreign_gpu_envs(
        self, owner: str
    ) -> builtins.list[tuple[builtins.list[str], builtins.list[str]]]:
        return []  # Slurm allots the GPUs: SlurmNode.foreign_gpus counts the others'

    def events(self, owner: str, stop: threading.Event) -> Iterator[dict[str, Any]]:
        """``die`` once for each of ``owner``'s jobs that is no longer running.

        Polls every ``slurm.poll_interval``; ``EngineUnavailable`` when Slurm stops
        answering (the caller reconnects).
        """
        told: set[str] = set()
        while not stop.is_set():
            current = self.list("", owner)
            for st in current:
                if not st.running and st.id not in told:
                    told.add(st.id)
                    yield {"Action": "die", "id": st.id}
            told &= {st.id for st in current}
            with self._lock:
                watch = {st.id: self._dirs.get(st.id) for st in current if st.running}
            # Between reads of Slurm, the status files of running jobs (a stat each):
            # an end is seen within STATUS_POLL, not within poll_interval.
            steps = max(1, math.ceil(self.settings.slurm.poll_interval / STATUS_POLL))
            for _ in range(steps):
                if stop.wait(self.settings.slurm.poll_interval / steps):
                    break
                for ref, folder in watch.items():
                    if ref not in told and folder is not None and (folder / "status").exists():
                        told.add(ref)
                        yield {"Action": "die", "id": ref}
