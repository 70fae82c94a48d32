"""The ``dopq`` command: the one layer above both the client and the server.

The client's parser (``dopq.client.commands``) lists every command; the ones
that run on the server host come from ``dopq.server.host_commands``, handed in
here, so that neither side imports the other.
"""

from __future__ import annotations

from collections.abc import Sequence

from dopq.client import commands
from dopq.server import host_commands

HOST = commands.HostCommands(server=host_commands.cmd_server, user=host_commands.cmd_user,
                             simulate=host_commands.cmd_simulate)


def main(argv: Sequence[str] | None = None) -> int:
    """``dopq ARGV``: every command, those of the server host included."""
    return commands.main(argv, HOST)


__all__ = ["main"]

if __name__ == "__main__":
    raise SystemExit(main())
