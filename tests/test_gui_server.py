"""The Qt client against a real server: views, commands, reconnection, style.

Offscreen (pytest-qt), real Pyro5, real name server, real Docker engine. One
server per module holds a job in every state: running (sleeps on one GPU),
queued and held by an admin, queued, succeeded, failed (exit 3), cancelled.
The reconnection test stops that server and starts a new one on the same
name-server port, server name and state directory, so it runs last.
"""

from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from collections.abc import Iterator  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402

pytest.importorskip("PySide6.QtWidgets")

from conftest import Running, cleanup_docker, make_config, wait_for  # noqa: E402
from hostile import good_job  # noqa: E402
from PySide6.QtCore import QSettings, Qt  # noqa: E402
from PySide6.QtGui import QColor  # noqa: E402
from PySide6.QtWidgets import QMessageBox  # noqa: E402

from dopq.client.gpuview import holding  # noqa: E402
from dopq.client.gui import dialogs  # noqa: E402
from dopq.client.gui.pipeline import Pipeline  # noqa: E402
from dopq.client.gui.style import STYLES_DIR  # noqa: E402

pytestmark = pytest.mark.docker

POLL = 0.1
FINAL = ("succeeded", "failed", "cancelled")


def isolated(run: Running) -> Running:
    """Ignore containers of other DoPQ instances on the same engine (other test runs).

    They would count as GPUs busy outside DoPQ and could starve these jobs.
    """
    runtime: Any = run.server.platform.runtime
    runtime.foreign_gpu_envs = lambda _owner: []
    return run


@dataclass
class World:
    run: Running
    jobs: dict[str, int]
    runs: list[Running] = field(default_factory=list)  # every server started, to clean up


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, engine: None) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("gui")
    run = isolated(Running(make_config(tmp, gpus={"backend": "virtual", "virtual_count": 4})))
    w = World(run, {}, [run])
    try:
        jobs = tmp / "jobs"
        alice, bob, root = run["alice"], run["bob"], run["root"]

        def submit(client: Any, user: str, name: str, script: str, gpus: int = 0) -> int:
            return int(client.submit(good_job(jobs, user, name, script, num_gpus=gpus))["id"])

        ids = w.jobs
        ids["running"] = submit(alice, "alice", "train", "sleep 120", 1)
        ids["succeeded"] = submit(bob, "bob", "fine", "echo fine")
        ids["failed"] = submit(bob, "bob", "bad", "exit 3")
        ids["cancelled"] = submit(alice, "alice", "dropped", "sleep 120")
        wait_for(lambda: all(root.call("job", ids[n])["state"] == "running"
                             for n in ("running", "cancelled")), 60, 0.1)
        root.call("cancel", ids["cancelled"])
        # all four GPUs each: they wait while "train" holds one
        ids["held"] = submit(alice, "alice", "later", "true", 4)
        root.call("edit", [ids["held"]], "hold")
        ids["queued"] = submit(bob, "bob", "big", "true", 4)
        ids["queued2"] = submit(alice, "alice", "bigger", "true", 4)
        for name in ("succeeded", "failed", "cancelled"):
            job = run.wait_job(ids[name])
            assert job["state"] == name, job["error"]
        wait_for(lambda: {j["id"] for j in root.call("snapshot")["queued"]
                          if j["state"] == "queued"}
                 >= {ids["held"], ids["queued"], ids["queued2"]}, 60, 0.1)
        yield w
    finally:
        for r in w.runs:
            try:
                r.stop()
            except Exception:  # noqa: BLE001 - a stopped store may refuse
                pass
        cleanup_docker(run.settings.docker.name_prefix)


def open_window(qtbot: Any, client: Any, tmp_path: Path, style: str | None = None) -> Pipeline:
    settings = QSettings(str(tmp_path / "gui.ini"), QSettings.Format.IniFormat)
    w = Pipeline(client, POLL, style, settings=settings)
    w.poller.max_backoff = 0.3
    qtbot.addWidget(w)
    with qtbot.waitSignal(w.refreshed, timeout=10000):
        w.show()
    return w


def column(model: Any, title: str) -> int:
    return [c.title for c in model.columns].index(title)


def cell(model: Any, key: Any, title: str, role: int = Qt.ItemDataRole.DisplayRole) -> Any:
    return model.data(model.index(model.row_of(key), column(model, title)), role)


def ids_of(rows: list[dict[str, Any]], key: str = "id") -> list[Any]:
    return [r[key] for r in rows]


def views_match(w: Pipeline, snap: dict[str, Any]) -> bool:
    m = w.models
    return (m["running"].keys() == ids_of(snap["running"])
            and m["queued"].keys() == ids_of(snap["queued"])
            and m["finished"].keys() == ids_of(snap["finished"])
            and m["users"].keys() == ids_of(snap["users"], "user")
            and m["system"].keys() == ids_of(snap["system"]["gpus"], "index"))


# -- (a) the five views ----------------------------------------------------------------------
def test_five_views_show_what_the_api_returns(world: World, qtbot: Any, tmp_path: Path) -> None:
    run, ids = world.run, world.jobs
    w = open_window(qtbot, run.client("root"), tmp_path)
    snap = run["root"].call("snapshot")
    qtbot.waitUntil(lambda: views_match(w, snap), timeout=5000)
    m = w.models
    assert w.state == "up" and w.whoami == {"user": "root", "role": "admin"}

    for view in ("running", "queued", "finished"):
        for row in snap[view]:
            assert cell(m[view], row["id"], "Job") == row["name"]
            assert cell(m[view], row["id"], "User") == row["user"]
    assert m["running"].keys() == [ids["running"]]
    running = snap["running"][0]
    assert cell(m["running"], ids["running"], "GPUs") == str(running["num_gpus"])  # a count
    assert cell(m["running"], ids["running"], "On GPUs") == ", ".join(map(str, running["gpus"]))
    assert cell(m["queued"], ids["held"], "State") == "queued (held)"
    assert cell(m["queued"], ids["queued"], "State") == "queued"
    for row in snap["queued"]:
        assert cell(m["queued"], row["id"], "Pos") == str(row["position"])
    assert cell(m["finished"], ids["succeeded"], "Result") == "succeeded (0)"
    assert cell(m["finished"], ids["failed"], "Result") == "failed (3)"
    assert cell(m["finished"], ids["failed"], "Exit") == "3"
    assert cell(m["finished"], ids["cancelled"], "Result").startswith("cancelled")
    for row in snap["users"]:
        for title, name in (("Running", "running"), ("Queued", "queued"),
                            ("Finished", "finished"), ("Failed", "failed")):
            assert cell(m["users"], row["user"], title) == str(row[name]), (row["user"], title)
    assert {"alice", "bob"} <= set(m["users"].keys())
    # the GPU timeline: from the same (delta) snapshots, every running job on GPUs a bar
    on_gpus = {r["id"] for r in snap["running"] if r["gpus"]}
    assert on_gpus and snap["timeline"]
    assert on_gpus <= {b["id"] for b in snap["timeline"] if b["end"] is None}
    qtbot.waitUntil(lambda: {b.id for b in w.timeline.view.bars}
                    == {b["id"] for b in run["root"].call("snapshot")["timeline"]}, timeout=5000)

    def holders_match() -> bool:
        gpus = run["root"].call("snapshot")["system"]["gpus"]
        # A whole GPU's holder: "job 7 (alice) 0/whole" (what it uses of the whole device).
        return [cell(m["system"], g["index"], "Holder") for g in gpus] == [
            f"job {g['job']} ({g['user']}) {holding(g['holders'][0])}" if g["job"] is not None
            else "busy outside DoPQ" if g["external"] else "free" for g in gpus]

    qtbot.waitUntil(holders_match, timeout=5000)
    held = [g for g in snap["system"]["gpus"] if g["job"] is not None]
    assert [(g["job"], g["user"]) for g in held] == [(ids["running"], "alice")]
    summary = w.system_panel.summary.values
    assert summary["name"].text() == snap["system"]["name"] == run.settings.server_name
    assert summary["version"].text() == snap["system"]["version"]
    assert summary["queue_state"].text() == snap["system"]["queue_state"]
    # each state cell takes its colour from the shipped dark sheet
    fg = Qt.ItemDataRole.ForegroundRole
    assert cell(m["finished"], ids["failed"], "Result", fg) == QColor("#ef5350")
    assert cell(m["running"], ids["running"], "State", fg) is not None

    # as alice, the same server: her role, and the admin commands are not offered
    w2 = open_window(qtbot, run.client("alice"), tmp_path / "alice")
    assert w2.whoami == {"user": "alice", "role": "user"}
    assert not any(w2.act[a].isEnabled() for a in w2.admin_actions)
    snap = run["alice"].call("snapshot")
    qtbot.waitUntil(lambda: views_match(w2, snap), timeout=5000)


# -- (b) commands reach the server -----------------------------------------------------------
def test_commands_reach_the_server_and_refusals_are_shown(
        world: World, qtbot: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run, ids = world.run, world.jobs
    root = run["root"]
    warnings: list[tuple[str, str]] = []
    monkeypatch.setattr(QMessageBox, "warning",
                        lambda _p, title, text, *a: warnings.append((title, text)))
    monkeypatch.setattr(dialogs, "pick_user", lambda *a: "bob")
    monkeypatch.setattr(dialogs, "confirm", lambda *a: True)

    admin = open_window(qtbot, run.client("root"), tmp_path / "root")
    queued = admin.models["queued"]
    assert queued.get(ids["held"])["held"] is True  # type: ignore[index]

    admin.edit_queued([ids["held"]], "release")
    qtbot.waitUntil(lambda: root.call("job", ids["held"])["held"] is False, timeout=5000)
    qtbot.waitUntil(lambda: cell(queued, ids["held"], "State") == "queued", timeout=5000)

    admin.edit_queued([ids["queued2"]], "top")
    qtbot.waitUntil(lambda: ids_of(root.call("snapshot")["queued"])[:1] == [ids["queued2"]],
                    timeout=5000)
    qtbot.waitUntil(lambda: queued.keys()[:1] == [ids["queued2"]], timeout=5000)
    assert cell(queued, ids["queued2"], "Pos") == "1"

    admin.edit_queued([ids["queued"]], "delete")
    qtbot.waitUntil(lambda: root.call("job", ids["queued"])["state"] == "cancelled",
                    timeout=5000)
    qtbot.waitUntil(lambda: ids["queued"] in admin.models["finished"].keys()
                    and ids["queued"] not in queued.keys(), timeout=5000)
    assert "delete: 1 job(s)" in admin.statusBar().currentMessage()

    # a refused edit (the job is running, no longer queued) is shown, nothing changes
    admin.edit_queued([ids["running"]], "delete")
    qtbot.waitUntil(lambda: len(warnings) == 1, timeout=5000)
    assert warnings[0][0] == "Update enqueued containers"
    assert f"job {ids['running']} is running" in warnings[0][1]
    assert root.call("job", ids["running"])["state"] == "running"

    # as alice: the server refuses clear_history, and the window says so
    user = open_window(qtbot, run.client("alice"), tmp_path / "alice")
    before = ids_of(root.call("snapshot")["finished"])
    user.clear_history()
    qtbot.waitUntil(lambda: len(warnings) == 2, timeout=5000)
    title, text = warnings[1]
    assert title == "Clear user history"
    assert "admin" in text.lower() and "\n" not in text
    assert ids_of(root.call("snapshot")["finished"]) == before


# -- (d) the style file ----------------------------------------------------------------------
def test_style_file_sets_the_state_colours(world: World, qtbot: Any, tmp_path: Path) -> None:
    run, ids = world.run, world.jobs
    sheet = tmp_path / "mine.qss"
    dark = (STYLES_DIR / "dark.qss").read_text()
    assert "qproperty-failed: #ef5350" in dark
    sheet.write_text(dark.replace("qproperty-failed: #ef5350", "qproperty-failed: #13579b"))
    w = open_window(qtbot, run.client("bob"), tmp_path, str(sheet))
    finished = w.models["finished"]
    qtbot.waitUntil(lambda: finished.row_of(ids["failed"]) >= 0, timeout=5000)
    fg = Qt.ItemDataRole.ForegroundRole
    assert cell(finished, ids["failed"], "Result", fg) == QColor("#13579b")
    assert cell(finished, ids["succeeded"], "Result", fg) != QColor("#13579b")


# -- (c) the server goes away and comes back ---------------------------------------------------
def test_window_survives_a_server_restart(world: World, qtbot: Any, tmp_path: Path) -> None:
    old = world.run
    w = open_window(qtbot, old.client("root"), tmp_path)
    docks = [d.widget() for d in w.docks.values()]
    assert w.state == "up" and all(d.isEnabled() for d in docks)
    shown = w.models["running"].keys()

    old.stop()
    qtbot.waitUntil(lambda: w.state == "down", timeout=5000)
    assert not any(d.isEnabled() for d in docks)
    assert w.connection.text().startswith("Disconnected:")
    assert w.models["running"].keys() == shown  # the last views stay on screen

    new = isolated(Running(old.cfg))  # same name-server port, server name and state dir
    world.runs.append(new)
    world.run = new
    qtbot.waitUntil(lambda: w.state == "up", timeout=15000)
    snap = new["root"].call("snapshot")
    qtbot.waitUntil(lambda: views_match(w, snap), timeout=5000)
    assert all(d.isEnabled() for d in docks)
    assert w.models["finished"].rowCount() >= 3 and w.models["users"].rowCount() >= 2
    assert old.settings.server_name in w.connection.text()
