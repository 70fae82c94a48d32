"""The API benchmark's load generator: clients in processes of their own, on cores of their own.

``split_cores()`` gives the server one half of the CPUs this process may use
and the clients the other (on 2 cores: the server core 0, the clients core
1; on 1 core they share it and say so). ``pin_tree`` pins every thread of a
process and of its children, so the server's threads stay on its cores.

``run_load`` starts the pollers as threads in a few worker processes
(``POLLERS_PER_PROCESS`` each: the Python client is GIL-bound) and a pinger
in a process of its own. Every process pins itself to the client cores.
The pollers run at a lower priority than the pinger, so that the pinger,
which measures what a call that does no work costs under the load, waits
for the server and not behind the pollers on a busy client core; where
priorities may be raised, server, pinger and pollers run above other work on
the machine (``priorities``: the machine is shared with other tests here).
Each poller warms up first (connects, and in GUI mode takes the whole
snapshot it then follows), untimed; all start together when every worker is
ready.

GUI mode asks the server exactly what ``SnapshotFollower`` asks
(``snapshot(limit, version)``) and decodes the reply, encoded part included;
the merge of the rows into a full list, which the GUI does on a thread of
its own, is left out (``LightFollower``): at 100 pollers it would take a
client core of its own. Views mode calls the five views the older GUI made.

``CpuMeter`` reads /proc at a phase's start and end: the busy share of each
core, the load average, and the CPU of the server, its children, the
clients, and everything else on the machine (other tests running beside the
benchmark show there).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

POLLERS_PER_PROCESS = 10
# Nice values, where this process may raise priorities (root, CAP_SYS_NICE): the
# server and the pinger above the pollers, and all three above other work on a
# shared machine (tests running beside the benchmark); else the pollers below.
SHIELDED = {"server": -10, "pinger": -10, "pollers": -5}
PLAIN = {"server": 0, "pinger": 0, "pollers": 10}
PING_EVERY_S = 0.1
CLK_TCK = os.sysconf("SC_CLK_TCK")

# call, when (s after start), seconds, error, bytes of the reply's encoded part (GUI mode)
Sample = tuple[str, float, float, str | None, int | None]


# -- cores ---------------------------------------------------------------------------------
def split_cores() -> tuple[list[int], list[int]]:
    """(server cores, client cores): the usable CPUs split in two halves, server first."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return cpus, cpus
    half = len(cpus) // 2
    return cpus[:half], cpus[half:]


def priorities() -> dict[str, int]:
    """``SHIELDED`` where priorities may be raised here, else ``PLAIN``."""
    mine = os.getpriority(os.PRIO_PROCESS, 0)
    try:
        os.setpriority(os.PRIO_PROCESS, 0, min(mine, SHIELDED["server"]))
    except OSError:
        return dict(PLAIN)
    os.setpriority(os.PRIO_PROCESS, 0, mine)
    return dict(SHIELDED)


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                try:
                    todo += [int(x) for x in (task / "children").read_text().split()]
                except OSError:
                    pass
        except OSError:
            pass
    return out


def pin_tree(pid: int, cores: list[int], nice: int | None = None) -> int:
    """Pin every thread of ``pid`` and of its descendants to ``cores`` (and ``nice``).

    Both are per thread on Linux; threads started later inherit them from
    the thread that starts them. Returns the threads pinned.
    """
    pinned = 0
    for p in descendants(pid):
        try:
            tids = [int(t.name) for t in Path(f"/proc/{p}/task").iterdir()]
        except OSError:
            continue
        for tid in tids:
            try:
                os.sched_setaffinity(tid, cores)
                if nice is not None:
                    os.setpriority(os.PRIO_PROCESS, tid, nice)
                pinned += 1
            except OSError:  # the thread ended meanwhile
                pass
    return pinned


# -- CPU and load during a phase ---------------------------------------------------------------
def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _all_processes() -> dict[int, tuple[str, float]]:
    out: dict[int, tuple[str, float]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue
        name = text[text.find("(") + 1:text.rfind(")")]
        fields = text.rpartition(")")[2].split()
        out[int(entry.name)] = (name, (int(fields[11]) + int(fields[12])) / CLK_TCK)
    return out


def _core_jiffies() -> dict[str, tuple[int, int]]:
    """Per core: (busy, total) jiffies since boot (iowait counts as idle)."""
    out: dict[str, tuple[int, int]] = {}
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("cpu") and line[3:4].isdigit():
            name, *vals = line.split()
            v = [int(x) for x in vals[:8]]
            out[name[3:]] = (sum(v) - v[3] - v[4], sum(v))
    return out


class CpuMeter:
    """CPU of the server, the clients and everything else over one phase."""

    def __init__(self, server_pid: int) -> None:
        self.server_pid = server_pid

    def _read(self, clients: list[int]) -> dict[str, Any]:
        procs = _all_processes()
        server = descendants(self.server_pid)
        return {"t": time.monotonic(), "cores": _core_jiffies(), "procs": procs,
                "server": procs.get(self.server_pid, ("", 0.0))[1],
                "children": sum(procs[p][1] for p in server[1:] if p in procs),
                "ours": set(server) | set(clients) | {os.getpid()}}

    def start(self, clients: list[int]) -> None:
        self._a = self._read(clients)

    def stop(self, clients: list[int]) -> dict[str, Any]:
        a, b = self._a, self._read(clients)
        wall = b["t"] - a["t"]
        ours = a["ours"] | b["ours"]

        def delta(pid: int) -> float:
            if pid not in b["procs"]:
                return 0.0
            before = a["procs"][pid][1] if pid in a["procs"] else 0.0
            return b["procs"][pid][1] - before

        busy = {c: (b["cores"][c][0] - a["cores"][c][0])
                / max(1, b["cores"][c][1] - a["cores"][c][1]) for c in b["cores"]}
        clients_s = sum(delta(p) for p in clients) + delta(os.getpid())
        others = sorted(((delta(p), b["procs"][p][0]) for p in b["procs"] if p not in ours),
                        reverse=True)
        by_name: dict[str, float] = {}
        for s, name in others:
            by_name[name] = by_name.get(name, 0.0) + s
        top = sorted(by_name.items(), key=lambda kv: -kv[1])[:5]
        server_s = b["server"] - a["server"]
        children_s = max(0.0, b["children"] - a["children"])
        total_busy = sum(busy.values())
        return {
            "wall_s": round(wall, 1),
            "core_busy": {c: round(v, 2) for c, v in sorted(busy.items())},
            "loadavg_1m": round(os.getloadavg()[0], 2),
            "server_cpu_cores": round(server_s / wall, 2),
            "server_children_cpu_cores": round(children_s / wall, 2),
            "clients_cpu_cores": round(clients_s / wall, 2),
            # every other process, short-lived ones included (the cores' busy time less ours)
            "others_cpu_cores": round(max(0.0, total_busy
                                          - (server_s + children_s + clients_s) / wall), 2),
            "others_top": [[name, round(s / wall, 2)] for name, s in top if s > 0],
        }


# -- the client processes ------------------------------------------------------------------------
def _connect(conn: dict[str, Any], token: str | None = None) -> Any:
    from dopq.client.remote import Client

    return Client(conn["ns_host"], conn["ns_port"], conn["server"],
                  token=token or conn["token"], fingerprint=conn["fingerprint"])


class LightFollower:
    """The calls ``SnapshotFollower`` makes, without merging the rows into a full list."""

    def __init__(self, client: Any, history_limit: int) -> None:
        self.client = client
        self.history_limit = history_limit
        self.version = 0

    def update(self) -> int | None:
        """Poll once; the size of the reply's encoded part (None from an older server)."""
        from dopq.wire.protocol import ENCODED, decode_reply

        snap = self.client.call("snapshot", self.history_limit, self.version)
        encoded = snap.pop(ENCODED, None)
        if encoded is not None:  # a server that encodes once (issue 17); older ones do not
            snap.update(decode_reply(encoded))
        self.version = int(snap["version"])
        return len(encoded) if encoded is not None else None


def _enter(cores: list[int], nice: int) -> None:
    os.sched_setaffinity(0, cores)
    os.setpriority(os.PRIO_PROCESS, 0, nice)


def _worker(conn: dict[str, Any], plan: dict[str, Any], ready: Any, go: Any,
            window: Any, out: str) -> None:
    """``plan["pollers"]`` pollers and ``plan["submitters"]`` submitters, as threads."""
    _enter(plan["cores"], plan["nice"]["pollers"])
    samples: list[Sample] = []
    lock = threading.Lock()
    warm = threading.Barrier(plan["pollers"] + plan["submitters"] + 1)
    started = threading.Event()

    def timed(name: str, fn: Callable[[], Any], t_start: float) -> None:
        t0 = time.perf_counter()
        err, size = None, None
        try:
            got = fn()
            size = got if isinstance(got, int) and not isinstance(got, bool) else None
        except Exception as exc:  # noqa: BLE001 - an error is a figure here
            err = f"{exc.__class__.__name__}: {str(exc)[:200]}"
        with lock:
            samples.append((name, time.time() - t_start, time.perf_counter() - t0, err, size))

    def loop(seed: int, make: Callable[[Any], list[tuple[str, Callable[[], Any]]]],
             token: str | None = None) -> None:
        try:  # warm up, untimed: connect, and take the first (whole) snapshot
            c = _connect(conn, token)
            calls = make(c)
            warmup = calls if token is None else [("ping", lambda: c.call("ping"))]
            for _, fn in warmup:
                timed("warmup", fn, time.time())
        finally:
            warm.wait()
        started.wait()
        start, end = window[0], window[1]
        time.sleep(max(0.0, start - time.time()) + random.Random(seed).random())
        while time.time() < end:
            cycle = time.monotonic()
            for name, fn in calls:
                timed(name, fn, start)
            time.sleep(max(0.0, min(cycle + 1.0 - time.monotonic(), end - time.time())))
        c.close()

    def polls(c: Any) -> list[tuple[str, Callable[[], Any]]]:
        if plan["mode"] == "snapshot":
            return [("snapshot", LightFollower(c, plan["history"]).update)]

        def one(method: str, args: list[Any]) -> Callable[[], Any]:
            return lambda: c.call(method, *args)

        return [(m, one(m, a)) for m, a in plan["calls"]]

    def submits(c: Any) -> list[tuple[str, Callable[[], Any]]]:
        return [("submit", lambda: c.submit(plan["archive"]))]

    threads = [threading.Thread(target=loop, args=(plan["seed"] + k, polls), daemon=True)
               for k in range(plan["pollers"])]
    # Submitters are another user (alice): a user's own writes make that
    # user's next reads wait for fresh views, other users' do not.
    threads += [threading.Thread(target=loop, args=(plan["seed"] + 1000 + k, submits,
                                                    conn["submit_token"]), daemon=True)
                for k in range(plan["submitters"])]
    for t in threads:
        t.start()
    warm.wait()
    ready.put(os.getpid())
    go.wait()
    started.set()
    for t in threads:
        t.join(max(1.0, window[1] - time.time() + 60))
    with lock:
        Path(out).write_text(json.dumps(samples))


def _pinger(conn: dict[str, Any], plan: dict[str, Any], ready: Any, go: Any, window: Any,
            out: str) -> None:
    """``ping`` every ``PING_EVERY_S``, above the pollers' priority, on the client cores."""
    _enter(plan["cores"], plan["nice"]["pinger"])
    c = _connect(conn)
    c.call("ping")
    ready.put(os.getpid())
    go.wait()
    start, end = window[0], window[1]
    samples: list[Sample] = []
    time.sleep(max(0.0, start - time.time()))
    while time.time() < end:
        t0 = time.perf_counter()
        err = None
        try:
            c.call("ping")
        except Exception as exc:  # noqa: BLE001
            err = f"{exc.__class__.__name__}: {str(exc)[:200]}"
        took = time.perf_counter() - t0
        samples.append(("ping", time.time() - start, took, err, None))
        time.sleep(max(0.0, PING_EVERY_S - took))
    c.close()
    Path(out).write_text(json.dumps(samples))


def run_load(conn: dict[str, Any], plan: dict[str, Any], seconds: float, tmp: Path,
             on_start: Callable[[list[int]], None] | None = None,
             on_end: Callable[[list[int]], Any] | None = None
             ) -> tuple[list[Sample], Any, dict[str, Any]]:
    """Run one phase: the samples of every call, ``on_end``'s result, and the start-up.

    ``on_start(pids)`` runs when every client is warm, just before the
    timed window; ``on_end(pids)`` when it has passed (before the clients'
    samples are collected).
    """
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["dopq.client.remote", "dopq.wire.protocol"])
    pollers = plan["pollers"]
    procs = max(1, -(-pollers // POLLERS_PER_PROCESS))
    ready, go = ctx.Queue(), ctx.Event()
    window = ctx.Array("d", [0.0, 0.0], lock=False)
    tag = f"{plan['mode']}-{pollers}-{plan['submitters']}"
    outs, workers = [], []
    t0 = time.monotonic()
    for w in range(procs):
        share = pollers // procs + (1 if w < pollers % procs else 0)
        part = {**plan, "pollers": share, "submitters": plan["submitters"] if w == 0 else 0,
                "seed": 100 * w}
        outs.append(tmp / f"samples-{tag}-{w}.json")
        workers.append(ctx.Process(target=_worker, daemon=True,
                                   args=(conn, part, ready, go, window, str(outs[-1]))))
    outs.append(tmp / f"samples-{tag}-ping.json")
    workers.append(ctx.Process(target=_pinger, daemon=True,
                               args=(conn, plan, ready, go, window, str(outs[-1]))))
    for p in workers:
        p.start()
    pids = [p.pid for p in workers if p.pid is not None]
    for _ in workers:
        ready.get(timeout=300)  # a worker that cannot warm up in 5 minutes fails the phase
    warmup_s = time.monotonic() - t0
    start = time.time() + 0.2
    window[0], window[1] = start, start + seconds
    if on_start:
        on_start(pids)
    go.set()
    time.sleep(max(0.0, start + seconds - time.time()))
    result = on_end(pids) if on_end else None
    for p in workers:
        p.join(120)
        if p.is_alive():
            p.kill()
    samples: list[Sample] = []
    for out in outs:
        if out.exists():
            samples += [tuple(s) for s in json.loads(out.read_text())]  # type: ignore[misc]
    return samples, result, {"processes": procs, "warmup_s": round(warmup_s, 1)}
