"""``dopq`` commands on jobs: submit, listings with filters, arrays, logs, cancel, wait,
edit and outputs. ``dopq.client.commands`` builds the parser; these parse and call the client.

A job is named by its id (``31``) or, for an element of an array, by the
array's first id and its index (``23_2``, as Slurm writes it). ``cancel 23`` and
``wait 23`` on an array's first job act on the whole array.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from dopq.client import gpuview
from dopq.client.commands import _client_now as _client
from dopq.core.console import add_times as _add_times
from dopq.core.console import out_json as _out
from dopq.core.console import table as _table
from dopq.core.errors import DopqError, NotFound
from dopq.core.text import printable, printable_lines

FINAL = ("succeeded", "failed", "cancelled")
STATES = {
    "queue": ("received", "building", "queued", "held"),
    "running": ("running",),
    "history": FINAL,
}
_REF = re.compile(r"(\d{1,12})(?:_(\d{1,9}))?")

# "gpu_request": 2 whole GPUs, or 1x10G (a 10 GiB share of one); dopq.client.gpuview
QUEUE_COLS = [("position", "POS"), ("id", "ID"), ("name", "NAME"), ("user", "USER"),
              ("state", "STATE"), ("gpu_request", "GPUS"), ("priority_value", "PRIORITY"),
              ("wait", "WAITING"), ("start", "START"), ("reason", "REASON")]
RUNNING_COLS = [("id", "ID"), ("name", "NAME"), ("user", "USER"), ("gpu_request", "GPUS"),
                ("gpus", "ON GPUS"), ("gpu_mem", "GPU MEM"), ("gpu_util", "GPU%"),
                ("run", "RUNNING"), ("time_limit_h", "LIMIT"), ("container", "CONTAINER")]
HISTORY_COLS = [("id", "ID"), ("name", "NAME"), ("user", "USER"), ("state", "STATE"),
                ("exit_code", "EXIT"), ("run", "RAN"), ("finished_at", "FINISHED"),
                ("error", "ERROR")]


# -- naming jobs ---------------------------------------------------------------------
def job_ref(text: str) -> str:
    """argparse type: ``31`` or ``23_2``."""
    if not _REF.fullmatch(text.strip()):
        raise argparse.ArgumentTypeError(f"{text!r} is not a job id (e.g. 31, or 23_2 for "
                                         "element 2 of array 23)")
    return text.strip()


def display_id(row: dict[str, Any]) -> str:
    """``23_2`` for element 2 of the array whose first job is 23, else the id."""
    parent, index = row.get("array_parent"), row.get("array_index")
    if parent is not None and index is not None:
        return f"{parent}_{index}"
    return str(row["id"])


def resolve(c: Any, ref: str, whole_array: bool = False, active: bool = False) -> list[int]:
    """The job ids ``ref`` names: one, or with ``whole_array`` all of an array's
    (with ``active`` those not yet ended)."""
    m = _REF.fullmatch(ref)
    if m is None:
        raise DopqError(f"{ref!r} is not a job id")
    head, index = int(m.group(1)), m.group(2)
    if index is None and not whole_array:
        return [head]
    elements = c.call("array", head)
    if index is None:
        return [e["id"] for e in elements
                if not (active and e["state"] in FINAL)] or [head]
    for e in elements:
        if e["array_index"] == int(index):
            return [int(e["id"])]
    raise NotFound(f"no job {ref}" + ("" if elements else f": job {head} is no array"))


def array_ids(head: int, array: str | None) -> list[str]:
    """``23_0 23_1 ...``: the names the elements of a submitted array will have."""
    if not array:
        return []
    from dopq.core.spec import check_overrides

    return [f"{head}_{i}" for i in check_overrides({"array": array}).array]


def one(c: Any, ref: str) -> int:
    return resolve(c, ref)[0]


def resolving(handler: Any) -> Any:
    """Wrap a handler taking ``args.id`` as an int so it takes ``23_2`` too."""

    def wrapped(args: argparse.Namespace) -> int:
        args.id = one(_client(args), args.id)
        return int(handler(args))

    return wrapped


# -- submitting -----------------------------------------------------------------------
def _submit_options(args: argparse.Namespace) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    for key in ("user", "name", "memory", "gpu_memory", "time_limit", "shm_size", "array"):
        v = getattr(args, key)
        if v is not None:
            opts[key] = v
    if args.gpus is not None:
        opts["gpus"] = args.gpus
    if args.cpus is not None:
        opts["cpus"] = args.cpus
    if args.priority is not None:
        opts["priority"] = args.priority
    if args.preemptible is not None:
        opts["preemptible"] = args.preemptible
    if args.after:  # "12,13": read and checked by dopq.core.spec (a mistake is one line)
        opts["after"] = args.after
    if args.after_any:
        opts["after_any"] = args.after_any
    if args.env:
        env = {}
        for item in args.env:
            k, sep, v = item.partition("=")
            if not sep:
                raise DopqError(f"--env {item!r}: use KEY=VALUE")
            env[k] = v
        opts["env"] = env
    if args.command:
        opts["command"] = args.command
    return opts


def cmd_submit(args: argparse.Namespace) -> int:
    from dopq.core.submitcheck import UploadProgress

    c = _client(args)
    progress = UploadProgress(sys.stderr, quiet=args.json)  # a terminal only
    job = c.submit(args.path, _submit_options(args), progress)
    ids = array_ids(job["id"], args.array)
    if args.json:
        _out({"id": job["id"], "state": job["state"], "user": job["user"],
              **({"ids": ids} if ids else {})})
    elif ids:
        print(f"submitted array {job['id']} of {len(ids)} jobs ({job['user']}): {' '.join(ids)}")
    else:
        print(f"submitted job {job['id']} ({job['user']})")
    return 0


def add_submit(add: Any) -> None:
    """Register ``submit`` (``add`` is ``build_parser``'s helper)."""
    sp = add("submit", cmd_submit, "submit a zip or a folder")
    sp.add_argument("path")
    sp.add_argument("--user")
    sp.add_argument("--name")
    sp.add_argument("--gpus", type=int, help="how many GPUs (container_config.json: num_gpus)")
    sp.add_argument("--gpu-memory", dest="gpu_memory", metavar="SIZE",
                    help="GPU memory on each GPU, e.g. 10g: the job shares its GPUs with "
                         "other such jobs instead of holding them whole (container_config"
                         ".json: gpu_memory; it may use no more than this)")
    sp.add_argument("--memory")
    sp.add_argument("--cpus", type=float)
    sp.add_argument("--shm-size", dest="shm_size")
    sp.add_argument("--time-limit", dest="time_limit")
    sp.add_argument("--priority", type=int)
    sp.add_argument("--preemptible", action=argparse.BooleanOptionalAction, default=None,
                    help="the job may be stopped (its stop signal, then a grace to save a "
                         "checkpoint) and queued again for a user under their fair share; it "
                         "reruns with the same /outdir and DOPQ_RESTART_COUNT (container_config"
                         ".json: preemptible; default: the server's)")
    sp.add_argument("--after", help="start after these jobs succeeded (ID[,ID])")
    sp.add_argument("--after-any", dest="after_any", help="start after these jobs ended")
    sp.add_argument("--array", help="job array indices, e.g. 0-9")
    sp.add_argument("--env", action="append", help="KEY=VALUE (repeatable)")
    sp.add_argument("--command", help="command to run instead of the image's")


# -- listings --------------------------------------------------------------------------
def listing(method: str, cols: list[tuple[str, str]]) -> Any:
    """``queue``/``running``/``history`` with ``--user``, ``--me`` and ``--state``."""

    def handler(args: argparse.Namespace) -> int:
        from dopq.client.remote import Client

        base = _client(args)
        user = args.user.lower() if args.user else None
        if args.me:
            user = base.call("whoami")["user"]
        kw: dict[str, Any] = {}
        if method == "history":
            kw["limit"] = args.limit * (10 if args.state else 1)
            if user:
                kw["user"] = user
        clients = [(None, base)]
        if args.all_servers:
            clients = [(n, Client(args.ns_host, args.ns_port, n)) for n in sorted(base.servers())]
        rows = []
        for name, c in clients:
            for r in c.call(method, **kw):
                if name is not None:
                    r["server"] = name
                rows.append(r)
        rows = [r for r in rows if _wanted(r, user, args.state)]
        if method == "history":
            rows = rows[: args.limit]
        if args.json:
            for r in rows:
                r["job"] = display_id(r)
            _out(rows)
            return 0
        for r in rows:
            r["job"] = display_id(r)
            r["gpu_request"] = gpuview.gpu_request(r)
            r["gpu_mem"] = gpuview.gpu_memory_used(r)
            r["gpu_util"] = gpuview.gpu_utilisation(r)
        shown = [("job" if k == "id" else k, h) for k, h in cols]
        if any(r.get("array_index") is not None for r in rows):
            at = [k for k, _ in shown].index("job") + 1
            shown.insert(at, ("array_index", "INDEX"))
        if any(r.get("preemptible") or r.get("restarts") for r in rows):
            # Only where preemption is in play: a preemptible job's restarts ("0P": may
            # be preempted, never was), a job that may not be preempted "-".
            for r in rows:
                r["restarts_cell"] = restarts_cell(r)
            shown.insert([k for k, _ in shown].index("user") + 1, ("restarts_cell", "RESTARTS"))
        if args.all_servers:
            shown.insert(0, ("server", "SERVER"))
        _table(_add_times(rows), shown)
        return 0

    return handler


def restarts_cell(row: dict[str, Any]) -> str:
    """How often a job was preempted, with ``P`` when it may be again: ``1P``, ``0P``, ``-``."""
    n = int(row.get("restarts") or 0)
    if row.get("preemptible"):
        return f"{n}P"
    return str(n) if n else "-"


def _wanted(row: dict[str, Any], user: str | None, state: str | None) -> bool:
    if user and row.get("user") != user:
        return False
    if state == "held":
        return bool(row.get("held"))
    return not state or row.get("state") == state


def add_filters(sp: argparse.ArgumentParser, command: str) -> None:
    sp.add_argument("--user", help="only this user's jobs")
    sp.add_argument("--me", action="store_true", help="only your own jobs")
    sp.add_argument("--state", choices=STATES[command], help="only jobs in this state")
    sp.add_argument("--all-servers", action="store_true", help="every server's jobs, merged")


# -- logs ----------------------------------------------------------------------------------
def cmd_logs(args: argparse.Namespace) -> int:
    c = _client(args)
    job_id = one(c, args.id)
    kind = "build" if args.build else "run"
    job = c.call("job", job_id)
    if args.run is not None:  # an earlier run of a preempted job: saved, it does not grow
        if args.run < 1:
            raise DopqError(f"--run {args.run}: runs count from 1 (the first run)")
        r = c.call("logs", job_id, f"run.{args.run}", 0, 4 << 20)
        sys.stdout.write(r["data"] if job["user"] == c.call("whoami")["user"]
                         else printable_lines(r["data"]))
        return 0
    # Another user's log (users.logs_visible_to_all) could drive this terminal:
    # its control characters are written out, only newlines and tabs stay.
    mine = job["user"] == c.call("whoami")["user"]
    if kind == "run" and not job.get("started_at"):
        if job["state"] in FINAL:  # never ran: rejected, failed to build, cancelled
            why = job.get("error") or "no reason recorded"
            print(printable(f"job {args.id} {job['state']} before it started: {why}"))
            if job["state"] == "failed":
                print(f"(`dopq logs {args.id} --build` shows its build log, if it had one)")
            return 0
        if args.follow:
            print(f"job {args.id} is {job['state']}: waiting for it to start, then following "
                  "its log (Ctrl-C to stop)", file=sys.stderr, flush=True)
    offset = 0
    while True:
        r = c.call("logs", job_id, kind, offset)
        if r["data"]:
            sys.stdout.write(r["data"] if mine else printable_lines(r["data"]))
            sys.stdout.flush()
        offset = r["offset"]
        if not args.follow or r["done"]:
            if offset == 0 and kind == "run" and not job.get("started_at"):
                job = c.call("job", job_id)
                if job["state"] in FINAL and not job.get("started_at"):
                    print(printable(f"job {args.id} {job['state']} before it started: "
                                    f"{job.get('error') or 'no reason recorded'}"))
                elif not args.follow:
                    print(f"job {args.id} is {job['state']}: no log until it starts "
                          f"(`dopq logs -f {args.id}` waits for it)", file=sys.stderr)
                    if job.get("restarts"):
                        print(f"it was preempted: `dopq logs {args.id} --run N` shows its "
                              f"run N (1 to {job['restarts']})", file=sys.stderr)
            return 0
        if not r["data"]:
            time.sleep(0.5)


# -- cancel, wait ----------------------------------------------------------------------
def cmd_cancel(args: argparse.Namespace) -> int:
    c = _client(args)
    failed = False
    for ref in args.ids:
        ids = resolve(c, ref, whole_array=True, active=True)
        states, errors = [], []
        for job_id in ids:
            try:
                states.append(c.call("cancel", job_id)["state"])
            except DopqError as exc:
                errors.append(exc)
        if not states:  # nothing cancelled: the (first) reason, one line
            raise errors[0]
        if len(ids) == 1:
            print(f"job {ref}: {states[0]}" + (" (stopping)" if states[0] == "running" else ""))
        else:
            stopping = states.count("running")
            print(f"array {ref}: {len(states)} of {len(ids)} jobs cancelled"
                  + (f" ({stopping} stopping)" if stopping else ""))
        for error in errors:
            print(printable(f"dopq: error: {error}"), file=sys.stderr)
        failed = failed or bool(errors)
    return 1 if failed else 0


def cmd_wait(args: argparse.Namespace) -> int:
    c = _client(args)
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    jobs = []
    for ref in args.ids:
        if "_" not in ref:  # an array's elements exist once its image is built
            while c.call("job", int(ref))["state"] in ("received", "building") and (
                    deadline is None or time.monotonic() < deadline):
                time.sleep(0.3)
        for job_id in resolve(c, ref, whole_array=True):
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            jobs.append(c.wait(job_id, left))
    if args.json:
        _out(jobs if len(jobs) > 1 else jobs[0])
    else:
        for job in jobs:
            extra = f", exit code {job['exit_code']}" if job["exit_code"] is not None else ""
            err = f": {job['error']}" if job.get("error") else ""
            print(printable(f"job {display_id(job)} {job['state']}{extra}{err}"))
    return 0 if all(j["state"] == "succeeded" for j in jobs) else 1


# -- edit ------------------------------------------------------------------------------
def cmd_edit(args: argparse.Namespace) -> int:
    actions = [(a, v) for a, v in (
        ("delete", args.delete), ("hold", args.hold), ("release", args.release),
        ("top", args.top)) if v] + [(a, v) for a, v in (
        ("priority", args.priority), ("nice", args.nice),
        ("time_limit", args.time_limit)) if v is not None]
    if len(actions) != 1:
        raise DopqError("give exactly one of --delete, --priority N, --nice N, --hold, "
                        "--release, --top, --time-limit T")
    action, value = actions[0]
    c = _client(args)
    ids = [i for ref in args.ids for i in resolve(c, ref, whole_array=True, active=True)]
    r = c.call("edit", ids, action, None if isinstance(value, bool) else value)
    shown = action.replace("_", "-") + (f" {value}" if not isinstance(value, bool) else "")
    _out(r) if args.json else print(f"{shown}: jobs {', '.join(map(str, r['changed']))}")
    return 0


# -- outputs -----------------------------------------------------------------------------
def cmd_outputs(args: argparse.Namespace) -> int:
    from dopq.core.archive import ArchiveLimits, unpack

    c = _client(args)
    c.timeout = max(c.timeout, 900.0)  # the server zips the whole folder before answering
    job_id = one(c, args.id)
    dest = Path(args.to or f"dopq-outputs-{args.id}")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise DopqError(f"{dest} exists and is not empty: name another folder with --to")
    f = c.call("outputs_begin", job_id)
    size, got = int(f["size"]), 0
    show = sys.stderr.isatty() and not args.json
    with tempfile.TemporaryDirectory(prefix="dopq-fetch-") as tmp:
        zpath = Path(tmp) / "outputs.zip"
        try:
            with zpath.open("wb") as fh:
                while got < size:
                    data = c.call("outputs_chunk", f["fetch"], got)
                    if not data:
                        raise DopqError("the server sent less than it announced")
                    fh.write(bytes(data))
                    got += len(data)
                    if show:
                        print(f"\rfetching {got * 100 // max(size, 1):3d}% ({got}/{size} bytes)",
                              end="", file=sys.stderr, flush=True)
        finally:
            try:
                c.call("outputs_end", f["fetch"])
            except DopqError:
                pass
            if show:
                print(file=sys.stderr)
        if got > size:
            raise DopqError("the server sent more than it announced")
        limits = ArchiveLimits(max_archive_bytes=size + 1, max_unpacked_bytes=8 << 30,
                               max_entries=1_000_000)
        if f["files"] or _has_entries(zpath):
            unpack(zpath, dest / ".dopq-unpack", limits)
            _lift(dest / ".dopq-unpack", dest)
        else:
            dest.mkdir(parents=True, exist_ok=True)
    skipped = list(f.get("skipped") or [])
    if args.json:
        _out({"id": job_id, "to": str(dest.resolve()), "files": f["files"], "bytes": size,
              "skipped": skipped})
    else:
        print(printable(f"job {args.id}: {f['files']} files ({size} bytes zipped) in {dest}"))
        for s in skipped:
            print(printable(f"  skipped {s}"))
    return 0


def _has_entries(zpath: Path) -> bool:
    import zipfile

    with zipfile.ZipFile(zpath) as zf:
        return bool(zf.infolist())


def _lift(tmp: Path, dest: Path) -> None:
    """Move what was unpacked in ``dest/.dopq-unpack`` up into ``dest``."""
    for child in tmp.iterdir():
        child.rename(dest / child.name)
    tmp.rmdir()


def add_commands(add: Any, conn: Any) -> None:
    """Register the listings and the commands on jobs (``add`` is ``build_parser``'s helper)."""
    for name, c, help in (("queue", QUEUE_COLS, "queued jobs in priority order"),
                          ("running", RUNNING_COLS, "running jobs"),
                          ("history", HISTORY_COLS, "finished jobs, newest first")):
        sp = add(name, listing(name, list(c)), help)
        add_filters(sp, name)
        if name == "history":
            sp.add_argument("--limit", type=int, default=50)
    sp = add("logs", cmd_logs, "a job's run (or build) log", (conn,))
    sp.add_argument("id", type=job_ref)
    sp.add_argument("--build", action="store_true")
    sp.add_argument("--run", type=int, metavar="N",
                    help="a preempted job's N-th run (1: its first), saved when it was stopped")
    sp.add_argument("-f", "--follow", action="store_true",
                    help="follow the log (a queued job: wait for its start)")
    sp = add("cancel", cmd_cancel, "cancel jobs (an array's first id: the whole array; "
             "23_2: one element)", (conn,))
    sp.add_argument("ids", type=job_ref, nargs="+")
    sp = add("wait", cmd_wait, "wait for jobs; exit 0 only if all succeeded")
    sp.add_argument("ids", type=job_ref, nargs="+")
    sp.add_argument("--timeout", type=float)
    sp = add("outputs", cmd_outputs, "fetch a finished job's /outdir through the API")
    sp.add_argument("id", type=job_ref)
    sp.add_argument("--to", help="folder to unpack into (default ./dopq-outputs-ID)")
    sp = add("edit", cmd_edit, "change queued jobs (one atomic batch); your own: hold, "
             "release, lower or restore the priority (up to 0), nice, time limit")
    sp.add_argument("ids", type=job_ref, nargs="+")
    sp.add_argument("--delete", action="store_true")
    sp.add_argument("--priority", type=int)
    sp.add_argument("--nice", type=int)
    sp.add_argument("--hold", action="store_true")
    sp.add_argument("--release", action="store_true")
    sp.add_argument("--top", action="store_true")
    sp.add_argument("--time-limit", dest="time_limit", help="e.g. 30m, 2h, 01:30:00")
