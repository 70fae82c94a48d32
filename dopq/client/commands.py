"""``dopq``: the command line. Commands parse arguments and call the client.

Every listing command takes ``--json`` (JSON only on stdout). Errors are one
line on stderr (``dopq: error: ...``) with exit status 1; usage errors 2.

This module builds the parser and runs a command; the commands live in
``job_commands`` (submit, listings, logs, cancel, wait, edit, outputs),
``account_commands`` (login, logout, whoami, ``user --remote``) and
``info_commands`` (status, users, images, priority, audit, servers, config).
The commands that run on the server host (``server``, ``user`` on the local
store, ``simulate``) are not the client's: ``dopq.cli`` passes them in as
``HostCommands``, so the client never imports the server.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from dopq import __version__
from dopq.client import gpuview
from dopq.core.console import cell as _cell
from dopq.core.console import out_json as _out
from dopq.core.console import wrapped as _wrapped
from dopq.core.errors import DopqError
from dopq.core.text import printable

Handler = Callable[[argparse.Namespace], int]


def _client(args: argparse.Namespace) -> Any:
    from dopq.client.api import Client

    return Client.connect(args.server, args.ns_host, args.ns_port,
                          fingerprint=getattr(args, "fingerprint", None))


def _client_now(args: argparse.Namespace) -> Any:
    """``_client`` as it is at the call: the command modules import this one, so a
    patch of ``_client`` reaches them however late they were first imported."""
    return _client(args)


@dataclass(frozen=True)
class HostCommands:
    """The handlers of the commands that run on the server host (``dopq.server.host_commands``).

    Without them (the client alone) those commands are listed as always, and say
    where they run when called.
    """

    server: Handler
    user: Handler  # the local user store; ``--remote`` goes through the client
    simulate: Handler


def _host_only(what: str) -> Handler:
    def handler(_args: argparse.Namespace) -> int:
        raise DopqError(f"`dopq {what}` runs on the server host: start it with the `dopq` "
                        "command (dopq.cli), not the client's parser alone")

    return handler


CLIENT_ONLY = HostCommands(server=_host_only("server"), user=_host_only("user"),
                           simulate=_host_only("simulate"))


# -- commands that stay here ---------------------------------------------------------
def cmd_gui(args: argparse.Namespace) -> int:
    try:
        from dopq.client.gui.app import main as gui_main
    except ImportError as exc:
        raise DopqError(f"the GUI needs PySide6: pip install 'dopq[gui]' ({exc})") from None
    return int(gui_main(args))


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
        elif key == "num_gpus":  # 2 whole GPUs, or 1x10G: a share of one (dopq.client.gpuview)
            print(f"{key:>13}: {gpuview.gpu_request(job)} ({gpuview.gpu_request_tip(job)})")
            if job.get("state") == "running" and "gpu_utilisation" in job:
                print(f"{'gpu use':>13}: {gpuview.gpu_use_line(job)}")
        else:
            print(f"{key:>13}: {_cell(job.get(key))}")
        if key == "gpus" and job.get("node") not in (None, "", "local"):  # a cluster's node
            print(f"{'node':>13}: {printable(job['node'])}")
    if job.get("restarted_from"):
        print(f"{'restarted from':>13}: job {job['restarted_from']}")
    _show_preemption(job)
    _show_estimate(job)
    print("       events:")
    for e in job.get("events", []):
        print(printable(f"  {e['at']}  {e['state']:<10} {e['detail']}"))
    return 0


def _show_preemption(job: dict[str, Any]) -> None:
    """Whether the job may be preempted, how often it was, by which job last and why
    (the detail of its last ``preempted`` event, which names both users' shares)."""
    restarts = int(job.get("restarts") or 0)
    if not job.get("preemptible") and not restarts:
        return
    print(f"{'preemptible':>13}: {'yes' if job.get('preemptible') else 'no'}")
    print(f"{'restarts':>13}: {restarts}")
    if not restarts:
        return
    why = [e for e in job.get("events", []) if str(e.get("detail", "")).startswith("preempted")]
    if why:  # "preempted by job 17 of bob (bob under fair share; alice above)"
        line = f"{why[-1]['detail'].removeprefix('preempted').strip()}, at {why[-1]['at']}"
    else:  # the events were cleared
        line = f"by job {job.get('preempted_by', '?')}"
    print(_wrapped("preempted", printable(line)))


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


# -- parser --------------------------------------------------------------------------------
def build_parser(host: HostCommands = CLIENT_ONLY) -> argparse.ArgumentParser:
    from dopq.client import account_commands as account
    from dopq.client import info_commands as info
    from dopq.client import job_commands as cli_jobs

    def cmd_user(args: argparse.Namespace) -> int:
        return account.user_remote(args) if args.remote else host.user(args)

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

    sp = add("server", host.server, "run the server in the foreground "
             "(`server fingerprint`: print its certificate's fingerprint)", (cfg,))
    sp.add_argument("what", nargs="?", choices=["fingerprint"])
    sp.add_argument("-v", "--verbose", action="store_true")
    sp = add("config", info.cmd_config_show, "show the effective configuration", (cfg, js))
    sp.add_argument("what", choices=["show"])
    sp = add("user", cmd_user, "manage users (the local store; --remote: through the API)",
             (cfg, js, conn))
    sp.add_argument("action", choices=["add", "passwd", "remove", "list", "role"])
    sp.add_argument("--remote", action="store_true", help="as a signed-in admin, via the API")
    sp.add_argument("name", nargs="?")
    sp.add_argument("--admin", action="store_true")
    sp.add_argument("--password-stdin", action="store_true")
    sp = add("simulate", host.simulate, "replay a workload trace through the policy", ())
    sp.add_argument("rest", nargs=argparse.REMAINDER)
    sp = add("gui", cmd_gui, "start the desktop client", (conn,))
    sp.add_argument("--style", help="Qt style sheet file")
    sp.add_argument("--screenshot", help="save a picture of the window to this PNG and exit")
    sp.add_argument("--poll", type=float, help="seconds between refreshes")

    sp = add("login", account.cmd_login, "sign in and store a token", (conn,))
    sp.add_argument("--user")
    sp.add_argument("--password-stdin", action="store_true")
    add("logout", account.cmd_logout, "revoke and forget the token", (conn,))
    add("whoami", account.cmd_whoami, "show who you are signed in as")
    cli_jobs.add_submit(add)
    cli_jobs.add_commands(add, conn)
    sp = add("show", cli_jobs.resolving(cmd_show), "one job with its events")
    sp.add_argument("id", type=cli_jobs.job_ref)
    add("status", info.cmd_status, "server, queue, provider, engine and GPUs")
    add("users", info.cmd_users, "per-user statistics and fair share")
    add("images", info.cmd_images, "the base images a build may use, and your own job images")
    sp = add("priority", info.cmd_priority, "priority factors of queued jobs")
    sp.add_argument("id", type=int, nargs="?")
    sp = add("clear-history", info.simple(
        "clear_history", lambda r: f"{r['cleared']} finished jobs cleared", "user"),
        "admin: hide finished jobs from the history")
    sp.add_argument("--user")
    sp = add("clear-status", info.simple(
        "clear_status", lambda r: f"usage reset for {r['reset']}", "user"),
        "admin: reset fair-share usage")
    sp.add_argument("--user")
    sp = add("shutdown", info.simple(
        "shutdown", lambda r: "server shutting down", "stop_running"), "admin: stop the server")
    sp.add_argument("--stop-running", action="store_true",
                    help="stop running containers too (default: re-adopt at next start)")
    sp = add("share", info.simple("set_share", lambda r: f"{r['user']} weight {r['weight']:g}",
                                  "user", "weight"), "admin: set a user's fair-share weight")
    sp.add_argument("user")
    sp.add_argument("weight", type=float)
    sp = add("audit", info.cmd_audit, "admin: the audit log")
    sp.add_argument("--limit", type=int, default=100)
    add("servers", info.cmd_servers, "DoPQ servers registered in the name server")
    from dopq.client import notify_commands

    notify_commands.add_commands(add)
    from dopq.client import report_commands

    report_commands.add_commands(add)
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


def main(argv: Sequence[str] | None = None, host: HostCommands = CLIENT_ONLY) -> int:
    """Run one command; ``host``: the server host's commands (``dopq.cli`` passes them)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or bool(os.environ.get("DOPQ_DEBUG"))
    argv = [a for a in argv if a != "--debug"]
    try:
        if argv[:1] == ["simulate"]:  # its own parser, its own --help
            return host.simulate(argparse.Namespace(rest=argv[1:]))
        args = build_parser(host).parse_args(argv)
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


__all__ = ["CLIENT_ONLY", "HostCommands", "Parser", "build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
