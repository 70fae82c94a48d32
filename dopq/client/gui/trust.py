"""First contact with a server in the GUI: its fingerprint, a question, a pin.

As ``dopq login`` does on a terminal: a server with no pinned certificate is
not talked to until the user has seen its fingerprint and said yes; the pin
is then kept with the CLI's (``dopq.client.remote.save_pin``). A server whose
certificate is not the pinned one gets a clear error and nothing else.
"""

from __future__ import annotations

from typing import Any

from PySide6.QtCore import QObject

from dopq.client.gui import dialogs
from dopq.client.remote import save_pin


def ask_trust(parent: Any, server: str, seen: str) -> bool:
    return dialogs.confirm(
        parent, f"Unknown server {server}",
        f"DoPQ server {server} is not known on this computer.\n\n"
        f"Its certificate fingerprint is\n{seen}\n\n"
        "Compare it with what `dopq server fingerprint` prints on the server host. "
        "Trust this server?")


class TrustKeeper(QObject):
    """Answers the poller's ``untrusted`` signal for one window (``Pipeline``)."""

    def __init__(self, window: Any, ask: bool) -> None:
        super().__init__(window)
        self.window, self.ask = window, ask
        self._busy = False
        self._declined: set[str] = set()
        self._told = ""
        window.poller.untrusted.connect(self.on_untrusted)

    def _server(self) -> str:
        return str(getattr(self.window.client, "server", None) or self.window.server_name
                   or "the server")

    def on_untrusted(self, kind: str, message: str) -> None:
        self.window._set_live(False, "trust", message)
        if not self.ask or self._busy:
            return
        if kind == "changed":
            if message != self._told:
                self._told = message
                dialogs.show_error(self.window, "Server identity changed", message)
            return
        server = self._server()
        probe = getattr(self.window.client, "probe_fingerprint", None)
        if server in self._declined or probe is None:
            return
        self._busy = True
        self.window.runner.start(probe, on_done=lambda seen: self._decide(server, str(seen)),
                                 on_error=self._failed)

    def _failed(self, exc: BaseException) -> None:
        self._busy = False
        dialogs.show_error(self.window, "Check the server", exc)

    def _decide(self, server: str, seen: str) -> None:
        try:
            if ask_trust(self.window, server, seen):
                save_pin(server, seen)
                self.window.poller.poke()
            else:
                self._declined.add(server)
        finally:
            self._busy = False

    def forget(self) -> None:
        """Another server was picked: ask again where the user said no."""
        self._declined.clear()
        self._told = ""
