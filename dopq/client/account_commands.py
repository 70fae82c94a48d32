"""``dopq`` commands about who you are: login (with trust on first use), logout,
whoami, and the user commands an admin runs through the API (``--remote``)."""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from typing import Any

from dopq.client.commands import _client_now as _client
from dopq.core import console
from dopq.core.errors import DopqError
from dopq.core.text import printable


def _trust_on_first_use(c: Any) -> None:
    """Like ssh: show an unknown server's fingerprint and ask before trusting it."""
    if c.has_pin():
        return
    name = c.server_name()
    if not sys.stdin.isatty():
        c.pin()  # raises the one-line "not known here" error
    seen = c.probe_fingerprint()
    print(f"DoPQ server {name} is not known here. Its certificate fingerprint is\n"
          f"    {seen}\n"
          "Compare it with what `dopq server fingerprint` prints on the server host.")
    try:
        answer = input("Trust this server and sign in (yes/no)? ").strip().lower()
    except EOFError:
        answer = ""
    if answer not in ("yes", "y"):
        raise DopqError(f"not signed in: the certificate of {name} was not accepted")
    c.fingerprint = seen


def cmd_login(args: argparse.Namespace) -> int:
    c = _client(args)
    _trust_on_first_use(c)
    user = args.user
    if not user:
        user = getpass.getuser()
        source = next((f"${v}" for v in ("LOGNAME", "USER", "LNAME", "USERNAME")
                       if os.environ.get(v)), "your Unix account")
        print(printable(f"signing in as {user} (from {source}; use --user NAME)"),
              file=sys.stderr, flush=True)
    result = c.login(user, console.read_password(args.password_stdin))
    print(f"signed in to {c.server_name()} as {result['user']} ({result['role']})")
    return 0


def cmd_logout(args: argparse.Namespace) -> int:
    _client(args).logout()
    print("signed out")
    return 0


def cmd_whoami(args: argparse.Namespace) -> int:
    r = _client(args).call("whoami")
    console.out_json(r) if args.json else print(f"{r['user']} ({r['role']})")
    return 0


def user_remote(args: argparse.Namespace) -> int:
    """``dopq user --remote ...``: the user commands through the API, for an admin away
    from the server host (the local store's are ``dopq.server.host_commands``)."""
    c = _client(args)
    if args.action == "list":
        rows = c.call("user_list")
        console.out_json(rows) if args.json else console.table(rows, console.USER_COLUMNS)
        return 0
    if not args.name:
        raise DopqError(f"user {args.action} needs a NAME")
    if args.action == "add":
        password = console.read_password(args.password_stdin, confirm=True)
        r = c.call("user_add", args.name, password, bool(args.admin))
        print(f"user {args.name.lower()} added" + (" (admin)" if args.admin else ""))
        console.warn_not_allowed(args.name, bool(r.get("allowed", True)))
    elif args.action == "passwd":
        c.call("user_passwd", args.name, console.read_password(args.password_stdin, confirm=True))
        print(f"password of {args.name.lower()} changed; its tokens were revoked")
    elif args.action == "remove":
        c.call("user_remove", args.name)
        print(f"user {args.name.lower()} removed")
    else:
        raise DopqError("user role works on the server host only (without --remote)")
    return 0
