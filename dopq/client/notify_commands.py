"""``dopq notify add|list|remove``: where the server tells you about your jobs.

Each target is one apprise URL (mailto://, slack://, matrix://, discord://,
msteams://, json://...); the server sends to it off its queue thread. The
URLs hold secrets, so ``list`` shows them to their owner (and admins) only.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from dopq.client.commands import _client_now as _client
from dopq.core import console
from dopq.core.errors import DopqError
from dopq.core.messages import DEFAULT_EVENTS, JOB_EVENTS, parse_events
from dopq.core.text import printable


def cmd_notify(args: argparse.Namespace) -> int:
    c = _client(args)
    if args.action == "add":
        if not args.arg:
            raise DopqError("notify add: give the target's URL (e.g. mailto://me@example.org)")
        r = c.call("notify_add", args.arg, list(parse_events(args.on)))
        shown: Any = r if args.json else printable(
            f"notification target {r['id']} added: {', '.join(r['events'])}")
    elif args.action == "remove":
        try:
            target = int(args.arg or "")
        except ValueError:
            raise DopqError("notify remove: give the target's number (see dopq notify list)"
                            ) from None
        r = c.call("notify_remove", target)
        shown = r if args.json else f"notification target {r['removed']} removed"
    else:
        rows = c.call("notify_list")
        if args.json:
            console.out_json(rows)
            return 0
        if not rows:
            print("no notification targets (add one: dopq notify add URL)")
            return 0
        console.table([{**r, "events": ",".join(r["events"])} for r in rows],
                      [("id", "ID"), ("user", "USER"), ("events", "EVENTS"), ("url", "URL")])
        return 0
    console.out_json(shown) if args.json else print(shown)
    return 0


def add_commands(add: Callable[..., Any]) -> None:
    sp = add("notify", cmd_notify, "your notification targets: add URL, list, remove N")
    sp.add_argument("action", choices=["add", "list", "remove"])
    sp.add_argument("arg", nargs="?", metavar="URL|N")
    sp.add_argument("--on", metavar="EVENTS",
                    help=f"comma-separated, of {','.join(JOB_EVENTS)} "
                         f"(default {','.join(DEFAULT_EVENTS)})")
