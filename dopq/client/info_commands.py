"""``dopq`` commands that show the server: status, users, images, priority, audit,
servers, the effective configuration; and the admin's one-call commands."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from dopq.client import gpuview
from dopq.client.commands import Handler
from dopq.client.commands import _client_now as _client
from dopq.core import console
from dopq.core.errors import DopqError
from dopq.core.jobs import format_duration
from dopq.core.text import printable
from dopq.wire.views import StatusView, iso


def cmd_config_show(args: argparse.Namespace) -> int:
    from dopq.core import settings

    s = settings.load(args.config)
    if args.json:
        console.out_json(settings.effective(s))
    else:
        print(settings.to_toml(s), end="")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    s: StatusView = _client(args).call("status")
    if args.json:
        console.out_json(s)
        return 0
    print(printable(f"server {s['name']} (DoPQ {s['version']}), up "
                    f"{format_duration(s['uptime_s'])} since {s['started_at']}"))
    print(f"queue: {s['queue_state']}   provider: {s['provider_state']}   "
          f"engine: {s['engine_state']}   policy: {s['policy']}   "
          f"GPUs: {s['gpu_backend']} ({s['gpu_mode']})")
    counts = s["counts"]
    print("jobs: " + "  ".join(f"{k} {v}" for k, v in counts.items()))
    rows: list[dict[str, Any]] = []
    for g in s["gpus"]:
        # One line per job or foreign process on the device; the device's own
        # columns on its first line only.
        lines = list(gpuview.device_lines(g)) or ["free"]
        util = g.get("utilization")
        rows.append({"index": g["index"], "name": g["name"], "memory": gpuview.device_memory(g),
                     "util": "-" if util is None else f"{util:.0f}", "holder": lines[0]})
        rows += [{"index": "", "name": "", "memory": "", "util": "", "holder": line}
                 for line in lines[1:]]
    console.table(rows, [("index", "GPU"), ("name", "NAME"), ("memory", "MEMORY"),
                         ("util", "UTIL%"), ("holder", "HELD BY")])
    return 0


def cmd_users(args: argparse.Namespace) -> int:
    rows = _client(args).call("users")
    if args.json:
        console.out_json(rows)
    else:
        console.table(rows, [("user", "USER"), ("queued", "QUEUED"), ("running", "RUNNING"),
                             ("finished", "FINISHED"), ("gpu_hours", "GPU-HOURS"),
                             ("share", "SHARE"), ("fairshare", "F"), ("penalty", "PENALTY")])
    return 0


def cmd_images(args: argparse.Namespace) -> int:
    r = _client(args).call("images")
    if args.json:
        console.out_json(r)
        return 0
    print("A build may start from (FROM, COPY --from, RUN --mount from):")
    for base in r["allowed_bases"] or ["(no base images: ask an admin)"]:
        print(f"  {printable(base)}")
    print("  scratch, the stages of its own Dockerfile, and your own job images:")
    console.table([{**o, "image": o["image"][:19], "present": "yes" if o["present"] else "no"}
                   for o in r["own"]],
                  [("image", "IMAGE"), ("job", "LAST JOB"), ("jobs", "JOBS"),
                   ("present", "ON ENGINE")])
    return 0


def cmd_priority(args: argparse.Namespace) -> int:
    rows = _client(args).call("priority", args.id)
    if args.json:
        console.out_json(rows)
        return 0
    flat = []
    for r in rows:
        f = r.get("factors") or {}
        flat.append({"id": r["id"], "position": r["position"], "priority": r["priority"],
                     "reason": r["reason"], **{k: round(v, 4) if isinstance(v, float) else v
                                               for k, v in f.items()}})
    keys = sorted({k for r in flat for k in r} - {"id", "position", "priority", "reason"})
    console.table(flat, [("position", "POS"), ("id", "ID"), ("priority", "PRIORITY"),
                         *[(k, k.upper()) for k in keys], ("reason", "REASON")])
    return 0


def simple(method: str, fmt: Callable[[Any], str], *names: str) -> Handler:
    """A command that is one API call with ``names`` of its arguments, its answer
    written by ``fmt`` (or as JSON)."""

    def handler(args: argparse.Namespace) -> int:
        r = _client(args).call(method, *[getattr(args, n) for n in names])
        console.out_json(r) if getattr(args, "json", False) else print(printable(fmt(r)))
        return 0

    return handler


def cmd_audit(args: argparse.Namespace) -> int:
    rows = _client(args).call("audit", args.limit)
    for r in rows:
        r["at"] = iso(r["at"])
    console.out_json(rows) if args.json else console.table(
        rows, [("at", "WHEN"), ("actor", "WHO"), ("action", "ACTION"), ("detail", "DETAIL")])
    return 0


def cmd_servers(args: argparse.Namespace) -> int:
    from dopq.client.remote import Client

    base = _client(args)
    rows = []
    for name, uri in sorted(base.servers().items()):
        row: dict[str, Any] = {"server": name, "uri": uri}
        try:
            s = Client(args.ns_host, args.ns_port, name, timeout=5).call("status")
            row.update(state=s["queue_state"], engine=s["engine_state"],
                       gpus=len(s["gpus"]), running=s["counts"]["running"],
                       queued=s["counts"]["queued"])
        except DopqError as exc:
            row.update(state=f"unreachable ({exc})")
        rows.append(row)
    console.out_json(rows) if args.json else console.table(rows, [
        ("server", "SERVER"), ("state", "STATE"), ("engine", "ENGINE"), ("gpus", "GPUS"),
        ("running", "RUNNING"), ("queued", "QUEUED"), ("uri", "URI")])
    return 0
