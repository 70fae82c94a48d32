"""``dopq report`` (usage of finished jobs) and ``dopq restart`` (a finished job again)."""

from __future__ import annotations

import argparse
import csv
import sys
from typing import Any

from dopq.client.commands import _client_now as _client
from dopq.client.job_commands import job_ref, one
from dopq.core import console
from dopq.core.text import printable

REPORT_COLS = [("user", "USER"), ("month", "MONTH"), ("jobs", "JOBS"), ("succeeded", "OK"),
               ("failed", "FAILED"), ("cancelled", "CANCELLED"), ("gpu_hours", "GPU-H"),
               ("cpu_hours", "CPU-H"), ("wait_mean", "WAIT"), ("wait_p90", "WAIT P90"),
               ("efficiency", "GPU UTIL%")]
RESTART_OPTIONS = ("gpus", "memory", "time_limit", "priority", "gpu_memory", "preemptible")


def _minutes(seconds: Any) -> str:
    return "-" if seconds is None else f"{float(seconds) / 60:.1f}m"


def cmd_report(args: argparse.Namespace) -> int:
    r = _client(args).call("report", args.since, args.until, args.by)
    lines: list[dict[str, Any]] = r["lines"]
    shown = [c for c in REPORT_COLS if c[0] != "month" or "month" in r["by"]]
    shown = [c for c in shown if c[0] != "user" or "user" in r["by"]]
    if args.json:
        console.out_json(r)
    elif args.csv:
        out = csv.DictWriter(sys.stdout, fieldnames=[k for k, _ in shown], extrasaction="ignore",
                             lineterminator="\n")
        out.writeheader()
        out.writerows(lines)
    elif not lines:
        print("no finished jobs in that time")
    else:
        rows = [{**line, "gpu_hours": f"{line['gpu_hours']:.2f}",
                 "cpu_hours": f"{line['cpu_hours']:.2f}",
                 "wait_mean": _minutes(line["wait_mean"]), "wait_p90": _minutes(line["wait_p90"]),
                 "efficiency": "-" if line["efficiency"] is None else f"{line['efficiency']:.0f}"}
                for line in lines]
        console.table(rows, shown)
    return 0


def cmd_restart(args: argparse.Namespace) -> int:
    c = _client(args)
    options = {k: getattr(args, k) for k in RESTART_OPTIONS if getattr(args, k) is not None}
    job = c.call("restart_job", one(c, args.id), options)
    if args.json:
        console.out_json(job)
    else:
        print(printable(f"restarted job {args.id} as job {job['id']} ({job['user']})"))
    return 0


def add_commands(add: Any) -> None:
    """Register ``report`` and ``restart`` (``add`` is ``build_parser``'s helper)."""
    sp = add("report", cmd_report, "usage of finished jobs: GPU-hours, waits, efficiency "
             "(your own; an admin's: everyone's)")
    sp.add_argument("--since", metavar="DATE", help="from this day or month (YYYY-MM-DD, "
                    "YYYY-MM; UTC)")
    sp.add_argument("--until", metavar="DATE", help="up to the end of this day or month")
    sp.add_argument("--by", default="user", help="user, month or user,month (default user)")
    sp.add_argument("--csv", action="store_true", help="print CSV")
    sp = add("restart", cmd_restart, "queue a copy of a finished job (same image, no "
             "rebuild) with changed options")
    sp.add_argument("id", type=job_ref)
    sp.add_argument("--gpus", type=int)
    sp.add_argument("--memory")
    sp.add_argument("--time-limit", dest="time_limit", help="e.g. 30m, 2h, 01:30:00")
    sp.add_argument("--priority", type=int)
    sp.add_argument("--gpu-memory", dest="gpu_memory", metavar="SIZE")
    sp.add_argument("--preemptible", action=argparse.BooleanOptionalAction, default=None)
