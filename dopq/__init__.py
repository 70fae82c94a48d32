"""DoPQ, the Docker Priority Queue: a fair-share GPU job server.

Four layers; imports go down only, never up, and the client and the server
never import each other (``lint-imports`` checks it: pyproject.toml):

    dopq.cli        the ``dopq`` command: hands the server host's commands
                    (``dopq.server.host_commands``) to the client's parser
        |
    dopq.client     what runs on a user's machine: ``remote`` (the ``Client``,
        |           over Pyro5; ``api``: its typed methods, ``from dopq import
        |           Client``), the CLI's commands (``commands``,
        |           ``job_commands``, ...) and the desktop GUI (``gui``)
    dopq.server     what runs on the GPU host: the store (SQLite), the runtime
        |           (Docker), the provider, the queue thread, the platform,
        |           the API; the only layer that loads docker-py
    dopq.wire       what both sides share: the protocol (serializer, token,
        |           error classes, retryable calls), the views' shapes, TLS,
        |           the guarded transport
    dopq.core       pure decisions and checks, no Docker, no network: jobs,
                    spec, policy, scheduler, usage, settings, errors, archive,
                    eta, simulate, the terminal's console

The seed's names, where they live now:
    Provider             dopq/server/provider.py   archives in, images built, jobs queued
    PriorityQueueThread  dopq/server/queue.py      the priority queue's thread
    DataPlatform         dopq/server/platform.py   the server's state and commands
    Controller           dopq/server/api.py        the Pyro5 API
    ViewThread           dopq/client/gui/viewthread.py   the GUI's poller
    Pipeline             dopq/client/gui/pipeline.py     the GUI's main window
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "2.0.0"
__all__ = ["Client", "__version__"]


def __getattr__(name: str) -> Any:
    """``from dopq import Client`` loads the client (Pyro5, TLS) only when asked for:
    ``import dopq`` alone stays light, for the server host's commands too. By name, not
    an import statement: the server imports ``dopq`` (its version), and lint-imports
    would read a statement here as the server importing the client."""
    if name == "Client":
        return importlib.import_module("dopq.client.api").Client
    raise AttributeError(f"module 'dopq' has no attribute {name!r}")
