"""The main window: five docked views, the Commands menu, the connection state.

``Pipeline`` owns the five models (``pipeline.models``), the ``ViewThread``
that feeds them and a ``Runner`` for commands. It never calls the server
itself: every call runs on another thread and comes back by signal; refusals
are shown in a message box (``dialogs.show_error``).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from typing import Any

from PySide6.QtCore import QSettings, QTimer, Signal
from PySide6.QtGui import QCloseEvent, QShowEvent
from PySide6.QtWidgets import (
    QDialog,
    QDockWidget,
    QFileDialog,
    QInputDialog,
    QLabel,
    QMainWindow,
    QMessageBox,
    QProgressDialog,
    QWidget,
)

from dopq.client.gui import actions, dialogs, layout, pictures
from dopq.client.gui.compat import emit, keep_none
from dopq.client.gui.models import MODEL_CLASSES, RowModel, may_act
from dopq.client.gui.style import StateColors, StyleManager, resolve_style
from dopq.client.gui.timeline import TimelinePanel
from dopq.client.gui.trust import TrustKeeper
from dopq.client.gui.viewthread import HISTORY_LIMIT, Runner, ViewThread, one_line
from dopq.client.gui.widgets import SystemPanel, TablePanel
from dopq.wire.views import Snapshot, StatusView, WhoAmI


class Pipeline(QMainWindow):
    """The DoPQ window over any object with the ``Client`` interface."""

    refreshed = Signal()  # after each snapshot applied to all five views
    connection_changed = Signal(str, str)  # "up" / "down" / "auth", the message

    def __init__(self, client: Any, poll_interval: float = 1.0, style_path: str | None = None,
                 *, settings: QSettings | None = None, start: bool = True,
                 ask_login: bool = False, history_limit: int = HISTORY_LIMIT,
                 parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("pipeline")
        self.setWindowTitle("DoPQ")
        self.resize(1440, 900)
        self.client = client
        self.poll_interval = poll_interval
        self.settings = settings if settings is not None else QSettings("dopq", "dopq-gui")
        self.ask_login = ask_login
        self.whoami: dict[str, Any] = {}  # a WhoAmI; empty while signed out
        self.server_name = ""
        self.state = "connecting"
        self.refreshes = 0
        self._asked_login = False
        self._last_user = ""  # offered in the sign-in dialog next time
        self._job_dialogs: dict[int, dialogs.JobDialog] = {}
        self._last_view = ""  # the job view whose selection the job commands act on
        self._edit_dialog: dialogs.EditQueuedDialog | None = None
        self._sized = False  # the default dock sizes were applied

        self.models: dict[str, RowModel] = {n: cls(self) for n, cls in MODEL_CLASSES.items()}
        self.runner = Runner(self)
        self.colors = StateColors(self)
        self.styles = StyleManager(self, self.colors, self)
        self.styles.applied.connect(self._style_applied)
        self.styles.failed.connect(lambda msg: self.statusBar().showMessage(msg, 10000))

        self.panels: dict[str, TablePanel] = {}
        self.docks: dict[str, QDockWidget] = {}
        self.system_panel: SystemPanel
        self.timeline: TimelinePanel  # the GPU timeline; and the tables' pictures:
        self.usage_bars: pictures.UsageBars
        self.util_history: pictures.UtilHistory
        self.sparklines: pictures.Sparklines
        layout.build_docks(self)
        self.act, self.theme_actions = actions.build_actions(self)
        self.admin_actions = ("clear_history", "clear_status", "shutdown")
        actions.build_menus(self)
        self.connection = QLabel(self)
        self.connection.setObjectName("connectionLabel")
        self.statusBar().addPermanentWidget(self.connection)

        self.poller = ViewThread(client, poll_interval, history_limit, self)
        t = self.poller
        t.view_whoami.connect(self._apply_whoami)
        for name in ("running", "queued", "finished", "users"):
            t.view_signal(name).connect(self.models[name].apply)
        t.view_users.connect(self.usage_bars.set_users)
        t.view_timeline.connect(self.timeline.apply)
        t.view_system.connect(self._apply_system)
        t.cycle_done.connect(self._cycle_done)
        t.connected.connect(self._on_connected)
        t.disconnected.connect(self._on_disconnected)
        t.unauthenticated.connect(self._on_unauthenticated)
        self.trust = TrustKeeper(self, ask_login)  # unknown or changed certificates

        self.styles.load(style_path or str(self.settings.value("style", "") or "") or None)
        self._default_state = self.saveState(layout.VERSION)
        self._layout_restored = layout.restore(self)  # a remembered layout was put back
        self._set_live(False, "connecting", f"connecting to {self._target()}…")
        self._update_actions()
        if start:
            self.start()

    # -- polling ---------------------------------------------------------------------------
    def start(self) -> None:
        if not self.poller.isRunning():
            self.poller.start()

    def stop(self) -> bool:
        """Stop polling; True when the poller has ended."""
        self.poller.stop()
        return not self.poller.isRunning()

    def thread_poke(self) -> None:
        self.poller.poke()

    def apply_snapshot(self, snap: Snapshot) -> None:
        """Apply one whole snapshot now, as a poll would (benchmarks, tests)."""
        self._apply_whoami(snap.get("whoami") or {})
        for name in ("running", "queued", "finished", "users"):
            self.models[name].apply(snap[name])
        self.usage_bars.set_users(snap["users"])
        self.timeline.apply({"bars": snap.get("timeline") or [], "now": snap.get("now")})
        self._apply_system(snap["system"])
        self._cycle_done(0)

    def _apply_whoami(self, who: WhoAmI | Mapping[str, Any]) -> None:
        if who != self.whoami:
            self.whoami = dict(who)
            self._update_actions()

    def _apply_system(self, status: StatusView) -> None:
        gpus = status.get("gpus") or []
        self.util_history.add(gpus)  # before the table repaints its sparklines
        self.timeline.view.set_gpus(g["index"] for g in gpus if isinstance(g.get("index"), int))
        self.models["system"].apply(gpus)
        self.system_panel.summary.show_status(status)
        self.server_name = str(status.get("name") or self.server_name)

    def _cycle_done(self, _cycle: int) -> None:
        self.refreshes += 1
        keep_none()  # a refresh makes many void Qt calls (compat.keep_none)
        m = self.models
        who = self.whoami
        self._set_live(True, "up", f"● {self.server_name} · {who.get('user', '?')} "
                       f"({who.get('role', '?')}) · {m['running'].rowCount()} running · "
                       f"{m['queued'].rowCount()} queued")
        self.setWindowTitle(f"DoPQ · {self.server_name} · {who.get('user', '')}")
        self._update_job_actions()  # a selected job may have ended or changed hands
        self.poller.acknowledge()
        emit(self.refreshed)

    def _on_connected(self, name: str) -> None:
        self.server_name = name or self.server_name

    def _on_disconnected(self, message: str) -> None:
        self._set_live(False, "down", f"Disconnected: {message} (retrying)")

    def _on_unauthenticated(self, message: str) -> None:
        self._set_live(False, "auth", f"Not signed in: {message} (DoPQ ▸ Sign in)")
        if self.ask_login and not self._asked_login:
            self._asked_login = True
            self.sign_in(f"You are not signed in to {self.server_name or 'this server'} "
                         f"({message}). Sign in to see the queue and submit jobs.")

    def _set_live(self, live: bool, state: str, text: str) -> None:
        changed = state != self.state
        self.state = state
        for dock in self.docks.values():
            widget = dock.widget()
            if widget is not None and widget.isEnabled() != live:
                widget.setEnabled(live)
        self.connection.setText(text)
        self.connection.setToolTip(text)
        if changed:
            self.connection.setProperty("state", state)
            self.connection.style().unpolish(self.connection)
            self.connection.style().polish(self.connection)
            emit(self.connection_changed, state, text)

    # -- roles -----------------------------------------------------------------------------
    @property
    def is_admin(self) -> bool:
        return self.whoami.get("role") == "admin"

    def _update_actions(self) -> None:
        admin = self.is_admin
        for key in self.admin_actions:
            self.act[key].setEnabled(admin)
        signed_in = bool(self.whoami.get("user"))
        self.act["sign_out"].setEnabled(signed_in)
        self.act["sign_in"].setText("Sign &in…" if not signed_in else "Sign in as &another…")
        if self._edit_dialog is not None:
            self._edit_dialog.set_admin(admin)
        self._update_job_actions()

    def _selection_changed(self, name: str) -> None:
        self._last_view = name
        self._update_job_actions()

    def _update_job_actions(self) -> None:
        """Cancel only jobs this user may act on; details and logs of any one job."""
        rows = [self.models[n].get(k) for n in ("running", "queued") for k in self.selected(n)]
        who = self.whoami.get("user")
        allowed = may_act(self.whoami, [r for r in rows if r is not None])
        cancel = self.act["cancel"]
        cancel.setEnabled(bool(rows) and allowed)
        cancel.setToolTip("cancel the selected jobs" if allowed else
                          f"only their owners or an admin may cancel them (you are {who})")
        one = self.selected_job() is not None
        for key in ("details", "run_log", "build_log"):
            self.act[key].setEnabled(one)

    # -- style -----------------------------------------------------------------------------
    def set_style(self, spec: str) -> None:
        if self.styles.load(spec):
            self.settings.setValue("style", spec)

    def pick_style(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Style sheet", "", "Qt style sheets (*.qss)")
        if path:
            self.set_style(path)

    def _style_applied(self, path: str) -> None:
        colors = self.colors.colors()
        for model in self.models.values():
            model.set_state_colors(colors)
        for theme, act in self.theme_actions.items():
            act.setChecked(path == str(resolve_style(theme)))

    # -- commands --------------------------------------------------------------------------
    def _run(self, title: str, fn: Callable[..., Any], *args: Any,
             done: Callable[[Any], None] | None = None) -> None:
        """Run a command off the GUI thread; show a refusal, then refresh."""

        def ok(result: Any) -> None:
            if done is not None:
                done(result)
            self.poller.poke()

        self.runner.start(fn, *args, on_done=ok,
                          on_error=lambda exc: dialogs.show_error(self, title, exc))

    def _call(self, title: str, method: str, *args: Any, message: str = "") -> None:
        self._run(title, self.client.call, method, *args,
                  done=lambda _r: self.statusBar().showMessage(message or f"{title}: done", 8000))

    def selected(self, name: str) -> list[Hashable]:
        return self.panels[name].selected_keys()

    def selected_job(self) -> int | None:
        """The job selected in the view used last (else in any job view)."""
        names = [self._last_view, "running", "queued", "finished"]
        for name in names:
            keys = self.selected(name) if name else []
            if keys:
                return int(keys[0])  # type: ignore[call-overload]
        return None

    def open_selected(self, log: str = "") -> dialogs.JobDialog | None:
        """The details of the selected job, or (``log``: run/build) its log."""
        jid = self.selected_job()
        if jid is None:
            return None
        dlg = self.open_job(jid)
        dlg.show_log(log) if log else dlg.show_details()
        return dlg

    def open_job(self, job_id: Hashable) -> dialogs.JobDialog:
        jid = int(job_id)  # type: ignore[call-overload]
        dlg = self._job_dialogs.get(jid)
        if dlg is None or not dlg.isVisible():
            dlg = dialogs.JobDialog(self.client, self.runner, jid, self.poll_interval, self)
            self._job_dialogs[jid] = dlg
            dlg.finished.connect(lambda _r, j=jid: self._job_dialogs.pop(j, None))
        dlg.show()
        dlg.raise_()
        return dlg

    def open_edit_queued(self) -> dialogs.EditQueuedDialog:
        if self._edit_dialog is None:
            dlg = dialogs.EditQueuedDialog(self.models["queued"],  # type: ignore[arg-type]
                                           self.selected("queued"), self.is_admin, self)
            dlg.requested.connect(self.edit_queued)
            dlg.may_act = lambda rows: may_act(self.whoami, rows)
            dlg.set_admin(self.is_admin)  # the buttons again, with may_act
            self._edit_dialog = dlg
        else:
            self._edit_dialog.panel.select_keys(self.selected("queued"))
        self._edit_dialog.show()
        self._edit_dialog.raise_()
        return self._edit_dialog

    def edit_queued(self, ids: list[int], action: str, value: Any = None) -> None:
        """One batch ``edit`` call; a refusal is shown, never swallowed."""
        self._call("Update enqueued containers", "edit", [int(i) for i in ids], action, value,
                   message=f"{action}: {len(ids)} job(s)")

    def cancel_selected(self) -> None:
        ids = [int(k) for k in self.selected("running") + self.selected("queued")]  # type: ignore[call-overload]
        if not ids or not dialogs.confirm(
                self, "Cancel jobs", f"Cancel job(s) {', '.join(map(str, ids[:20]))}?"):
            return

        def cancel_all() -> list[Any]:
            return [self.client.call("cancel", i) for i in ids]

        self._run("Cancel jobs", cancel_all,
                  done=lambda _r: self.statusBar().showMessage(f"cancelled {len(ids)} job(s)"))

    def _users(self) -> list[str]:
        return [str(k) for k in self.models["users"].keys()]

    def clear_history(self) -> None:
        user = dialogs.pick_user(self, "Clear user history", self._users())
        if user is None or not dialogs.confirm(
                self, "Clear user history",
                f"Hide the finished jobs of {user or 'all users'} from the history?"):
            return
        self._call("Clear user history", "clear_history", user or None)

    def clear_status(self) -> None:
        user = dialogs.pick_user(self, "Clear user status", self._users())
        if user is None or not dialogs.confirm(
                self, "Clear user status",
                f"Forget the recorded GPU usage of {user or 'all users'}? Their fair-share "
                "priority starts afresh."):
            return
        self._call("Clear user status", "clear_status", user or None)

    def shutdown_server(self) -> None:
        choice = dialogs.choose(
            self, "Shut down server",
            f"Shut down the DoPQ server {self.server_name}? Queued jobs stay queued.",
            ["Shut down, leave running jobs", "Shut down and stop running jobs"])
        if choice is None:
            return
        self._call("Shut down server", "shutdown", choice == 1, message="server shutting down")

    def submit_job(self) -> None:
        dlg = dialogs.SubmitDialog(self)
        if dlg.exec() == QDialog.DialogCode.Accepted:
            self.submit(dlg.path.text().strip(), dlg.options())

    def submit(self, path: str, options: dict[str, Any]) -> QProgressDialog:
        """Upload a folder or zip off the GUI thread, with a cancellable progress dialog."""
        progress = QProgressDialog("Uploading…", "Cancel", 0, 1000, self)
        progress.setWindowTitle("Submit job")
        progress.setMinimumDuration(300)

        def step(done: Any, total: Any) -> None:
            progress.setValue(int(1000 * int(done) / max(int(total), 1)))
            progress.setLabelText(dialogs.describe_upload(int(done), int(total)))

        def finished(job: dict[str, Any]) -> None:
            progress.reset()
            progress.deleteLater()
            self.statusBar().showMessage(f"submitted job {job.get('id')} ({job.get('user')})",
                                         10000)
            self.poller.poke()

        def failed(exc: BaseException) -> None:
            progress.reset()
            progress.deleteLater()
            dialogs.show_error(self, "Submit job", exc)

        task = self.runner.start(self.client.submit, path, options, progress_kwarg="progress",
                                 on_progress=step, on_done=finished, on_error=failed)
        progress.canceled.connect(task.cancelled.set)
        return progress

    def sign_in(self, reason: str = "") -> None:
        server = self.server_name or str(getattr(self.client, "server", "") or "")
        dlg = dialogs.LoginDialog(server, self, reason=reason, user=self._last_user or None)
        if dlg.exec() == QDialog.DialogCode.Accepted:
            self.login(*dlg.values())

    def login(self, user: str, password: str, remember: bool = True) -> None:
        self._run("Sign in", self.client.login, user, password, remember,
                  done=lambda r: self._signed_in(r))

    def _signed_in(self, r: dict[str, Any]) -> None:
        self._last_user = str(r.get("user") or "")
        self.statusBar().showMessage(f"signed in as {r.get('user')} ({r.get('role')})", 8000)

    def sign_out(self) -> None:
        self._run("Sign out", self.client.logout,
                  done=lambda _r: self.statusBar().showMessage("signed out", 8000))

    def switch_server(self) -> None:
        self._run("Switch server", self.client.servers, done=self._pick_server)

    def _pick_server(self, servers: dict[str, str]) -> None:
        if not servers:
            dialogs.show_error(self, "Switch server", "no DoPQ server is registered")
            return
        names = sorted(servers)
        current = names.index(self.server_name) if self.server_name in names else 0
        name, ok = QInputDialog.getItem(self, "Switch server", "Server:", names, current, False)
        if ok and name:
            self._run("Switch server", self._switch_to, str(name),
                      done=lambda _r: self._forget_views(str(name)))

    def _switch_to(self, name: str) -> None:
        """Worker thread: point the client at another server (and its stored token)."""
        self.client.server = name
        self.client.token = None
        self.client.close()

    def _forget_views(self, name: str) -> None:
        self.server_name = name
        self.trust.forget()
        self.whoami = {}
        for model in self.models.values():
            model.clear()
        self._update_actions()
        self._set_live(False, "connecting", f"connecting to {name}…")

    def about(self) -> None:
        from dopq import __version__

        QMessageBox.about(self, "About DoPQ",
                          f"DoPQ {__version__}, the Docker Priority Queue.\n\n"
                          "A fair-share GPU job queue for a shared deep-learning server.")

    def _target(self) -> str:
        return str(getattr(self.client, "server", None) or "the DoPQ server")

    # -- layout ----------------------------------------------------------------------------
    def _default_sizes(self) -> None:
        layout.default_sizes(self)

    def save_layout(self) -> None:
        layout.save(self)

    def reset_layout(self) -> None:
        for dock in self.docks.values():
            dock.show()
        self.restoreState(self._default_state, layout.VERSION)
        self._default_sizes()

    def showEvent(self, event: QShowEvent) -> None:
        super().showEvent(event)
        if not self._layout_restored and not self._sized:
            self._sized = True
            QTimer.singleShot(0, self._default_sizes)  # after the first layout pass
            self.panels["running"].view.setFocus()  # not the first filter box

    def closeEvent(self, event: QCloseEvent) -> None:
        self.save_layout()
        self.stop()
        for dlg in list(self._job_dialogs.values()):
            dlg.close()
        if self._edit_dialog is not None:
            self._edit_dialog.close()
        self.runner.wait(2000)
        super().closeEvent(event)


__all__ = ["Pipeline", "one_line"]
