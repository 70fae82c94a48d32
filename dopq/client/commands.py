"""``dopq``: the command line. Commands parse arguments and call the client.

Every listing command takes ``--json`` (JSON only on stdout). Errors are one
line on stderr (``dopq: error: ...``) with exit status 1; usage errors 2.
"""

from __future__ import annotations

import argparse
import difflib
import getpass
import json
import logging
import os
import re
import shutil
import sys
import textwrap
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from dopq import __version__
from dopq.core.errors import DopqError
from dopq.core.jobs import format_duration
from dopq.core.text import printable

Handler = Callable[[argparse.Namespace], int]


def _out(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=False, default=str))


def _table(rows: list[dict[str, Any]], cols: Sequence[tuple[str, str]]) -> None:
    if not rows:
        print("(none)")
        return
    text = [[_cell(r.get(key)) for key, _ in cols] for r in rows]
    widths = [max(len(h), *(len(t[i]) for t in text)) for i, (_, h) in enumerate(cols)]
    print("  ".join(h.ljust(w) for (_, h), w in zip(cols, widths, strict=True)).rstrip())
    for t in text:
        print("  ".join(c.ljust(w) for c, w in zip(t, widths, strict=True)).rstrip())


def _cell(v: Any) -> str:
    """A table cell; control characters of stored text (another user's job name)
    are written out as escapes, never sent to the terminal."""
    if v is None:
        return "-"
    if isinstance(v, list):
        return printable(",".join(str(x) for x in v)) or "-"
    if isinstance(v, float):
        return f"{v:g}"
    text = printable(v)
    if len(text) > 60:
        return text[:57] + "..."
    return text


def _client(args: argparse.Namespace) -> Any:
    from dopq.client.remote import Client

    return Client(args.ns_host, args.ns_port, args.server,
                  fingerprint=getattr(args, "fingerprint", None))


def _settings(args: argparse.Namespace) -> Any:
    from dopq.core import settings

    return settings.load(args.config)


def _read_password(args: argparse.Namespace, prompt: str = "Password: ") -> str:
    if getattr(args, "password_stdin", False):
        line = sys.stdin.readline()
        return line.rstrip("\r\n")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", getpass.GetPassWarning)
            pw = getpass.getpass(prompt)
            if getattr(args, "confirm", False) and getpass.getpass("Again: ") != pw:
                raise DopqError("passwords differ")
    except (getpass.GetPassWarning, EOFError):
        raise DopqError("no terminal to ask the password on: "
                        "pipe it in with --password-stdin") from None
    return pw


# -- server side --------------------------------------------------------------------
def cmd_server(args: argparse.Namespace) -> int:
    from dopq.server.api import serve

    if args.what == "fingerprint":
        from dopq.wire import tls

        s = _settings(args)
        cert, _key = tls.ensure_certificate(s.server.tls_cert, s.server.tls_key,
                                            s.state_path, s.server_name)
        print(tls.file_fingerprint(cert))
        return 0
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    os.umask(0o077)  # state, logs, keys: the server's alone; shared folders get explicit modes
    return serve(_settings(args))


def cmd_config_show(args: argparse.Namespace) -> int:
    from dopq.core import settings

    s = _settings(args)
    if args.json:
        _out(settings.effective(s))
    else:
        print(settings.to_toml(s), end="")
    return 0


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


def _warn_not_allowed(name: str, allowed: bool) -> None:
    if not allowed:
        print(f"dopq: warning: {name.lower()} is not in users.allowed: they may sign in "
              "but not submit until an admin adds them there", file=sys.stderr)


def cmd_user(args: argparse.Namespace) -> int:
    from dopq.server.auth import Role

    if args.remote:
        return _user_remote(args)
    users = _users_store(args)
    if args.action == "list":
        rows = users.list()
        if args.json:
            _out(rows)
        else:
            _table(rows, [("name", "USER"), ("role", "ROLE"), ("share", "WEIGHT")])
        return 0
    if not args.name:
        raise DopqError(f"user {args.action} needs a NAME")
    if args.action == "add":
        args.confirm = True
        users.add(args.name, _read_password(args), Role.ADMIN if args.admin else Role.USER)
        print(f"user {args.name.lower()} added" + (" (admin)" if args.admin else ""))
        _warn_not_allowed(args.name, not args.allowed or args.name.lower() in args.allowed)
    elif args.action == "passwd":
        args.confirm = True
        users.set_password(args.name, _read_password(args))
        print(f"password of {args.name.lower()} changed; its tokens were revoked")
    elif args.action == "remove":
        users.remove(args.name)
        print(f"user {args.name.lower()} removed")
    elif args.action == "role":
        users.set_role(args.name, Role.ADMIN if args.admin else Role.USER)
        print(f"{args.name.lower()} is now {'admin' if args.admin else 'user'}")
    return 0


def _user_remote(args: argparse.Namespace) -> int:
    """The same commands through the API, for an admin away from the server host."""
    c = _client(args)
    if args.action == "list":
        rows = c.call("user_list")
        _out(rows) if args.json else _table(
            rows, [("name", "USER"), ("role", "ROLE"), ("share", "WEIGHT")])
        return 0
    if not args.name:
        raise DopqError(f"user {args.action} needs a NAME")
    if args.action == "add":
        args.confirm = True
        r = c.call("user_add", args.name, _read_password(args), bool(args.admin))
        print(f"user {args.name.lower()} added" + (" (admin)" if args.admin else ""))
        _warn_not_allowed(args.name, bool(r.get("allowed", True)))
    elif args.action == "passwd":
        args.confirm = True
        c.call("user_passwd", args.name, _read_password(args))
        print(f"password of {args.name.lower()} changed; its tokens were revoked")
    elif args.action == "remove":
        c.call("user_remove", args.name)
        print(f"user {args.name.lower()} removed")
    else:
        raise DopqError("user role works on the server host only (without --remote)")
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from dopq.core import simulate

    return int(simulate.main(args.rest))


def cmd_gui(args: argparse.Namespace) -> int:
    try:
        from dopq.client.gui.app import main as gui_main
    except ImportError as exc:
        raise DopqError(f"the GUI needs PySide6: pip install 'dopq[gui]' ({exc})") from None
    return int(gui_main(args))


# -- client side --------------------------------------------------------------------
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
    result = c.login(user, _read_password(args))
    print(f"signed in to {c.server_name()} as {result['user']} ({result['role']})")
    return 0


def cmd_logout(args: argparse.Namespace) -> int:
    _client(args).logout()
    print("signed out")
    return 0


def cmd_whoami(args: argparse.Namespace) -> int:
    r = _client(args).call("whoami")
    _out(r) if args.json else print(f"{r['user']} ({r['role']})")
    return 0


def _submit_options(args: argparse.Namespace) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    for key in ("user", "name", "memory", "time_limit", "shm_size", "array"):
        v = getattr(args, key)
        if v is not None:
            opts[key] = v
    if args.gpus is not None:
        opts["gpus"] = args.gpus
    if args.cpus is not None:
        opts["cpus"] = args.cpus
    if args.priority is not None:
        opts["priority"] = args.priority
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
    from dopq.client.job_commands import array_ids

    ids = array_ids(job["id"], args.array)
    if args.json:
        _out({"id": job["id"], "state": job["state"], "user": job["user"],
              **({"ids": ids} if ids else {})})
    elif ids:
        print(f"submitted array {job['id']} of {len(ids)} jobs ({job['user']}): {' '.join(ids)}")
    else:
        print(f"submitted job {job['id']} ({job['user']})")
    return 0


QUEUE_COLS = [("position", "POS"), ("id", "ID"), ("name", "NAME"), ("user", "USER"),
              ("state", "STATE"), ("num_gpus", "GPUS"), ("priority_value", "PRIORITY"),
              ("wait", "WAITING"), ("start", "START"), ("reason", "REASON")]
RUNNING_COLS = [("id", "ID"), ("name", "NAME"), ("user", "USER"), ("num_gpus", "GPUS"),
                ("gpus", "ON GPUS"),
                ("run", "RUNNING"), ("time_limit_h", "LIMIT"), ("container", "CONTAINER")]
HISTORY_COLS = [("id", "ID"), ("name", "NAME"), ("user", "USER"), ("state", "STATE"),
                ("exit_code", "EXIT"), ("run", "RAN"), ("finished_at", "FINISHED"),
                ("error", "ERROR")]


def _add_times(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    from dopq.core.eta import start_text

    now = time.time()
    for r in rows:
        r["wait"] = format_duration(r.get("wait_s"))
        r["run"] = format_duration(r.get("run_s"))
        r["time_limit_h"] = format_duration(r.get("time_limit"))
        if "expected_start" in r:
            r["start"] = start_text(r["expected_start"], now)
    return rows


def cmd_show(args: argparse.Namespace) -> int:
    job = _client(args).call("job", args.id)
    if args.json:
        _out(job)
        return 0
    for key in ("id", "name", "user", "state", "num_gpus", "gpus", "exit_code", "error",
                "submitted_at", "started_at", "finished_at", "time_limit", "priority", "nice",
                "held", "array_index", "after", "after_any", "image", "container",
                "outputs"):
        if key == "error" and job.get(key):  # in full, wrapped under its title
            print(_wrapped(key, printable(job[key])))
        elif key == "outputs" and job.get(key):  # in full: a path to copy
            print(f"{key:>13}: {printable(job[key])}\n{'':>15}(on the server host; "
                  f"elsewhere: dopq outputs {job['id']})")
        else:
            print(f"{key:>13}: {_cell(job.get(key))}")
    _show_estimate(job)
    print("       events:")
    for e in job.get("events", []):
        print(printable(f"  {e['at']}  {e['state']:<10} {e['detail']}"))
    return 0


def _wrapped(title: str, text: str) -> str:
    """``title: text`` as ``dopq show`` prints it, the text wrapped to the terminal."""
    width = max(40, shutil.get_terminal_size((100, 24)).columns - 1)
    lines = textwrap.wrap(text, width - 15, break_long_words=True) or ["-"]
    return f"{title:>13}: " + ("\n" + " " * 15).join(lines)


def _show_estimate(job: dict[str, Any]) -> None:
    """The expected start and the reason, in full; for a job that ran, the estimates kept."""
    from dopq.core.eta import start_text

    now = time.time()
    if job.get("state") == "queued":
        start = job.get("expected_start")
        print(f"{'start':>13}: {start_text(start, now)}" + (f" ({start})" if start else ""))
        print(f"{'reason':>13}: {printable(job.get('reason') or '-')}")
    elif job.get("expected_start_first") or job.get("expected_start_last"):
        print(f"{'estimated':>13}: first {_cell(job.get('expected_start_first'))}, "
              f"last while waiting {_cell(job.get('expected_start_last'))}")


def cmd_status(args: argparse.Namespace) -> int:
    s = _client(args).call("status")
    if args.json:
        _out(s)
        return 0
    print(printable(f"server {s['name']} (DoPQ {s['version']}), up "
                    f"{format_duration(s['uptime_s'])} since {s['started_at']}"))
    print(f"queue: {s['queue_state']}   provider: {s['provider_state']}   "
          f"engine: {s['engine_state']}   policy: {s['policy']}   "
          f"GPUs: {s['gpu_backend']} ({s['gpu_mode']})")
    counts = s["counts"]
    print("jobs: " + "  ".join(f"{k} {v}" for k, v in counts.items()))
    rows = []
    for g in s["gpus"]:
        holder = f"job {g['job']} ({g['user']})" if g["job"] else (
            "busy (outside DoPQ)" if g["external"] else "free")
        rows.append({"index": g["index"], "name": g["name"], "holder": holder,
                     "util": g.get("utilization")})
    _table(rows, [("index", "GPU"), ("name", "NAME"), ("holder", "HOLDER"), ("util", "UTIL%")])
    return 0


def cmd_users(args: argparse.Namespace) -> int:
    rows = _client(args).call("users")
    if args.json:
        _out(rows)
    else:
        _table(rows, [("user", "USER"), ("queued", "QUEUED"), ("running", "RUNNING"),
                      ("finished", "FINISHED"), ("gpu_hours", "GPU-HOURS"),
                      ("share", "SHARE"), ("fairshare", "F"), ("penalty", "PENALTY")])
    return 0


def cmd_images(args: argparse.Namespace) -> int:
    r = _client(args).call("images")
    if args.json:
        _out(r)
        return 0
    print("A build may start from (FROM, COPY --from, RUN --mount from):")
    for base in r["allowed_bases"] or ["(no base images: ask an admin)"]:
        print(f"  {printable(base)}")
    print("  scratch, the stages of its own Dockerfile, and your own job images:")
    _table([{**o, "image": o["image"][:19], "present": "yes" if o["present"] else "no"}
            for o in r["own"]],
           [("image", "IMAGE"), ("job", "LAST JOB"), ("jobs", "JOBS"), ("present", "ON ENGINE")])
    return 0


def cmd_priority(args: argparse.Namespace) -> int:
    rows = _client(args).call("priority", args.id)
    if args.json:
        _out(rows)
        return 0
    flat = []
    for r in rows:
        f = r.get("factors") or {}
        flat.append({"id": r["id"], "position": r["position"], "priority": r["priority"],
                     "reason": r["reason"], **{k: round(v, 4) if isinstance(v, float) else v
                                               for k, v in f.items()}})
    keys = sorted({k for r in flat for k in r} - {"id", "position", "priority", "reason"})
    _table(flat, [("position", "POS"), ("id", "ID"), ("priority", "PRIORITY"),
                  *[(k, k.upper()) for k in keys], ("reason", "REASON")])
    return 0


def _simple(method: str, fmt: Callable[[Any], str], *names: str) -> Handler:
    def handler(args: argparse.Namespace) -> int:
        r = _client(args).call(method, *[getattr(args, n) for n in names])
        _out(r) if getattr(args, "json", False) else print(printable(fmt(r)))
        return 0

    return handler


def cmd_audit(args: argparse.Namespace) -> int:
    rows = _client(args).call("audit", args.limit)
    from dopq.server.platform import iso

    for r in rows:
        r["at"] = iso(r["at"])
    _out(rows) if args.json else _table(
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
    _out(rows) if args.json else _table(rows, [
        ("server", "SERVER"), ("state", "STATE"), ("engine", "ENGINE"), ("gpus", "GPUS"),
        ("running", "RUNNING"), ("queued", "QUEUED"), ("uri", "URI")])
    return 0


# -- parser --------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from dopq.client import job_commands as cli_jobs

    p = Parser(prog="dopq", description="DoPQ, the Docker Priority Queue")
    p.add_argument("--version", action="version", version=f"dopq {__version__}")
    p.add_argument("--debug", action="store_true",
                   help="show the Python traceback of an unexpected error")
    conn = argparse.ArgumentParser(add_help=False)
    conn.add_argument("--ns-host", help="name server host (env DOPQ_NS_HOST)")
    conn.add_argument("--ns-port", type=int, help="name server port (env DOPQ_NS_PORT)")
    conn.add_argument("--server", help="server name (env DOPQ_SERVER)")
    conn.add_argument("--fingerprint", help="the server's certificate fingerprint, "
                      "SHA256:... (env DOPQ_FINGERPRINT; default: the one pinned at login)")
    js = argparse.ArgumentParser(add_help=False)
    js.add_argument("--json", action="store_true", help="print JSON only")
    cfg = argparse.ArgumentParser(add_help=False)
    cfg.add_argument("--config", help="settings file (env DOPQ_CONFIG)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, fn: Handler, help: str, parents: Sequence[Any] = (conn, js)) -> Any:
        sp = sub.add_parser(name, help=help, parents=list(parents))
        sp.set_defaults(fn=fn)
        return sp

    sp = add("server", cmd_server, "run the server in the foreground "
             "(`server fingerprint`: print its certificate's fingerprint)", (cfg,))
    sp.add_argument("what", nargs="?", choices=["fingerprint"])
    sp.add_argument("-v", "--verbose", action="store_true")
    sp = add("config", cmd_config_show, "show the effective configuration", (cfg, js))
    sp.add_argument("what", choices=["show"])
    sp = add("user", cmd_user, "manage users (the local store; --remote: through the API)",
             (cfg, js, conn))
    sp.add_argument("action", choices=["add", "passwd", "remove", "list", "role"])
    sp.add_argument("--remote", action="store_true", help="as a signed-in admin, via the API")
    sp.add_argument("name", nargs="?")
    sp.add_argument("--admin", action="store_true")
    sp.add_argument("--password-stdin", action="store_true")
    sp = add("simulate", cmd_simulate, "replay a workload trace through the policy", ())
    sp.add_argument("rest", nargs=argparse.REMAINDER)
    sp = add("gui", cmd_gui, "start the desktop client", (conn,))
    sp.add_argument("--style", help="Qt style sheet file")
    sp.add_argument("--screenshot", help="save a picture of the window to this PNG and exit")
    sp.add_argument("--poll", type=float, help="seconds between refreshes")

    sp = add("login", cmd_login, "sign in and store a token", (conn,))
    sp.add_argument("--user")
    sp.add_argument("--password-stdin", action="store_true")
    add("logout", cmd_logout, "revoke and forget the token", (conn,))
    add("whoami", cmd_whoami, "show who you are signed in as")
    sp = add("submit", cmd_submit, "submit a zip or a folder")
    sp.add_argument("path")
    sp.add_argument("--user")
    sp.add_argument("--name")
    sp.add_argument("--gpus", type=int)
    sp.add_argument("--memory")
    sp.add_argument("--cpus", type=float)
    sp.add_argument("--shm-size", dest="shm_size")
    sp.add_argument("--time-limit", dest="time_limit")
    sp.add_argument("--priority", type=int)
    sp.add_argument("--after", help="start after these jobs succeeded (ID[,ID])")
    sp.add_argument("--after-any", dest="after_any", help="start after these jobs ended")
    sp.add_argument("--array", help="job array indices, e.g. 0-9")
    sp.add_argument("--env", action="append", help="KEY=VALUE (repeatable)")
    sp.add_argument("--command", help="command to run instead of the image's")
    cli_jobs.add_commands(sub, add, conn, js, (QUEUE_COLS, RUNNING_COLS, HISTORY_COLS))
    sp = add("show", cli_jobs.resolving(cmd_show), "one job with its events")
    sp.add_argument("id", type=cli_jobs.job_ref)
    add("status", cmd_status, "server, queue, provider, engine and GPUs")
    add("users", cmd_users, "per-user statistics and fair share")
    add("images", cmd_images, "the base images a build may use, and your own job images")
    sp = add("priority", cmd_priority, "priority factors of queued jobs")
    sp.add_argument("id", type=int, nargs="?")
    sp = add("clear-history", _simple(
        "clear_history", lambda r: f"{r['cleared']} finished jobs cleared", "user"),
        "admin: hide finished jobs from the history")
    sp.add_argument("--user")
    sp = add("clear-status", _simple(
        "clear_status", lambda r: f"usage reset for {r['reset']}", "user"),
        "admin: reset fair-share usage")
    sp.add_argument("--user")
    sp = add("shutdown", _simple(
        "shutdown", lambda r: "server shutting down", "stop_running"), "admin: stop the server")
    sp.add_argument("--stop-running", action="store_true",
                    help="stop running containers too (default: re-adopt at next start)")
    sp = add("share", _simple("set_share", lambda r: f"{r['user']} weight {r['weight']:g}",
                              "user", "weight"), "admin: set a user's fair-share weight")
    sp.add_argument("user")
    sp.add_argument("weight", type=float)
    sp = add("audit", cmd_audit, "admin: the audit log")
    sp.add_argument("--limit", type=int, default=100)
    add("servers", cmd_servers, "DoPQ servers registered in the name server")
    return p


class Parser(argparse.ArgumentParser):
    """An argument parser that suggests the nearest command for a mistyped one."""

    def error(self, message: str) -> Any:  # type: ignore[override]
        m = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if m:
            choices = [c.strip(" '") for c in m.group(2).split(",")]
            near = difflib.get_close_matches(m.group(1), choices, n=1, cutoff=0.5)
            if near:
                message = f"invalid choice: {m.group(1)!r}: did you mean {near[0]}?"
        return super().error(message)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or bool(os.environ.get("DOPQ_DEBUG"))
    argv = [a for a in argv if a != "--debug"]
    try:
        if argv[:1] == ["simulate"]:  # its own parser, its own --help
            return cmd_simulate(argparse.Namespace(rest=argv[1:]))
        args = build_parser().parse_args(argv)
        return int(args.fn(args))
    except DopqError as exc:
        print(f"dopq: error: {printable(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except (OSError, EOFError) as exc:  # a file, a terminal or the network: the user can act
        if debug:
            raise
        what = exc.strerror if isinstance(exc, OSError) and exc.strerror else (
            str(exc) or exc.__class__.__name__)
        where = f": {exc.filename}" if isinstance(exc, OSError) and exc.filename else ""
        print(printable(f"dopq: error: {what}{where}"), file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - a bug: one line, the traceback on request
        if debug:
            raise
        print(printable(f"dopq: error: unexpected {exc.__class__.__name__}: {exc} "
                        "(run again with --debug for the traceback)"), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
