"""The ``dopq`` commands that run on the server host: the server itself, the local
user store, the simulator.

``dopq.cli`` hands these handlers to the client's parser
(``dopq.client.commands.HostCommands``), so that ``dopq --help`` lists every
command while the client never imports the server. Each handler imports what
it needs when it runs: ``dopq user list`` does not load the scheduler, and no
client command loads this module's imports at all.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import logging
import os
import sys
from typing import Any

from dopq.core import console
from dopq.core.errors import DopqError


def _settings(args: argparse.Namespace) -> Any:
    from dopq.core import settings

    return settings.load(args.config)


def cmd_server(args: argparse.Namespace) -> int:
    """``dopq server``: run it in the foreground; ``dopq server fingerprint``: print its
    certificate's fingerprint (made on first use) for users to compare at ``dopq login``."""
    if args.what == "fingerprint":
        from dopq.wire import tls

        s = _settings(args)
        cert, _key = tls.ensure_certificate(s.server.tls_cert, s.server.tls_key,
                                            s.state_path, s.server_name)
        print(tls.file_fingerprint(cert))
        return 0
    from dopq.server.api import serve

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    os.umask(0o077)  # state, logs, keys: the server's alone; shared folders get explicit modes
    cap_malloc_arenas()
    # The queue thread's decisions over a long queue hold the GIL in long CPU runs:
    # handing it over every 1 ms (Python's default: 5) keeps API replies prompt.
    sys.setswitchinterval(SWITCH_INTERVAL)
    return serve(_settings(args))


M_ARENA_MAX = -8  # glibc's mallopt parameter
SWITCH_INTERVAL = 0.001  # seconds a thread holds the GIL while others wait


def cap_malloc_arenas(arenas: int = 2) -> bool:
    """At most ``arenas`` glibc memory pools. glibc gives a thread that allocates
    much a pool of its own and keeps it: each API connection that uploaded a
    large job grew the server by about 16 MiB for good (issue 17's 1 GB context
    benchmark). False where the C library has no ``mallopt``."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_ARENA_MAX, arenas))
    except (OSError, AttributeError):
        return False


def _users_store(args: argparse.Namespace) -> Any:
    from dopq.server.auth import Users
    from dopq.server.store import Store

    s = _settings(args)
    # A named configuration may be a new server's (its users come first); without
    # one, a missing state folder means this is not the server host.
    if not (args.config or os.environ.get("DOPQ_CONFIG")) and not s.db_path.parent.is_dir():
        raise DopqError(
            f"no DoPQ server here (no --config given, nor DOPQ_CONFIG, and no {s.state_path}): "
            "on the server host pass --config PATH; elsewhere, as a signed-in admin, "
            "use --remote")
    args.allowed = list(s.users.allowed)
    return Users(Store(s.db_path))


def cmd_user(args: argparse.Namespace) -> int:
    """``dopq user ...`` on the local store (``--remote`` is the client's)."""
    from dopq.server.auth import Role

    users = _users_store(args)
    if args.action == "list":
        rows = users.list()
        console.out_json(rows) if args.json else console.table(rows, console.USER_COLUMNS)
        return 0
    if not args.name:
        raise DopqError(f"user {args.action} needs a NAME")
    if args.action == "add":
        users.add(args.name, console.read_password(args.password_stdin, confirm=True),
                  Role.ADMIN if args.admin else Role.USER)
        print(f"user {args.name.lower()} added" + (" (admin)" if args.admin else ""))
        console.warn_not_allowed(args.name,
                                 not args.allowed or args.name.lower() in args.allowed)
    elif args.action == "passwd":
        users.set_password(args.name, console.read_password(args.password_stdin, confirm=True))
        print(f"password of {args.name.lower()} changed; its tokens were revoked")
    elif args.action == "remove":
        users.remove(args.name)
        print(f"user {args.name.lower()} removed")
    elif args.action == "role":
        users.set_role(args.name, Role.ADMIN if args.admin else Role.USER)
        print(f"{args.name.lower()} is now {'admin' if args.admin else 'user'}")
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    """``dopq simulate ...``: its own parser and ``--help`` (``dopq.core.simulate``)."""
    from dopq.core import simulate

    return int(simulate.main(args.rest))
