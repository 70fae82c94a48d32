"""Keeps the server registered in the Pyro5 name server (``dopq.<name>``)."""

from __future__ import annotations

import logging
import threading
from typing import Any

import Pyro5.api
import Pyro5.errors

from dopq.core.settings import Settings

log = logging.getLogger("dopq.server.api")  # its messages read as the API's, as before


class Registrar(threading.Thread):
    """Keeps ``dopq.<name>`` registered; registers again when the name server returns."""

    def __init__(self, settings: Settings, uri: Any, stop: threading.Event) -> None:
        super().__init__(name="dopq-registrar", daemon=True)
        self.settings = settings
        self.uri = uri
        self._halt = stop
        self.registered = threading.Event()

    def _ns(self) -> Any:
        ns = Pyro5.api.locate_ns(self.settings.nameserver.host, self.settings.nameserver.port)
        ns._pyroTimeout = 3.0
        return ns

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                with self._ns() as ns:
                    current = ns.list(prefix=self.settings.object_name).get(
                        self.settings.object_name
                    )
                    if current != str(self.uri):
                        ns.register(self.settings.object_name, self.uri, metadata={"dopq"})
                        log.info("registered %s in the name server", self.settings.object_name)
                self.registered.set()
            except Pyro5.errors.PyroError:
                self.registered.clear()
            self._halt.wait(1.0)

    def unregister(self) -> None:
        try:
            with self._ns() as ns:
                ns.remove(self.settings.object_name)
        except Pyro5.errors.PyroError:
            pass
