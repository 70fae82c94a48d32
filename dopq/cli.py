"""The ``dopq`` command: the entry point above the client and the server."""

from __future__ import annotations

from dopq.client.commands import main

__all__ = ["main"]

if __name__ == "__main__":
    raise SystemExit(main())
