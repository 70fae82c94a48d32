"""What a DoPQ client and server agree on to talk at all (the views' shapes: ``dopq.wire.views``).

- Pyro5 with msgpack only (``SERIALIZER``): the API and the name server refuse
  any other serializer (``dopq.wire.transport``).
- Servers register in the name server as ``dopq.<name>`` (``NS_PREFIX``).
- The sign-in token travels as the ``TOKEN_ANNOTATION`` annotation of every
  message, the CONNECT message included; the transport reads it (to size what
  a message may carry) before Pyro decodes anything.
- DoPQ's errors cross as their own classes: Pyro5's serializer is taught to
  rebuild every class of ``dopq.core.errors.ALL_ERRORS`` when this module is
  imported, by either side, so a client catches ``Forbidden``, not a
  ``SerializeError``.
- ``IDEMPOTENT_CALLS``: the API calls that change nothing, so a client may send
  one again after a dropped connection. Any other call is sent at most once.
- ``snapshot(limit, since)`` replies carry the shared part pre-encoded
  (``encode_reply``) under ``ENCODED``: the server encodes it once for every
  client that polls the same version, the client decodes it (``decode_reply``)
  and merges it into the reply, so callers see the same dicts as before.
"""

from __future__ import annotations

from typing import Any

import msgpack
from Pyro5.serializers import SerializerBase

from dopq.core import errors

SERIALIZER = "msgpack"
NS_PREFIX = "dopq."
TOKEN_ANNOTATION = "TOKN"  # Pyro5 annotation names are four characters

IDEMPOTENT_CALLS = frozenset({
    "ping", "whoami", "job", "queue", "running", "history", "status", "users", "priority",
    "snapshot", "logs", "user_list", "audit", "array", "outputs_chunk",
    "notify_list",
    "report",
})


ENCODED = "encoded"  # the key of a reply's pre-encoded part (msgpack bytes)


def encode_reply(data: Any) -> bytes:
    """Plain data as msgpack, as Pyro5's msgpack serializer would write it."""
    blob: bytes = msgpack.packb(data, use_bin_type=True)
    return blob


def decode_reply(blob: bytes) -> Any:
    """``encode_reply``'s bytes back to data, as Pyro5's msgpack serializer reads them."""
    return msgpack.unpackb(blob, raw=False)


def _wire_name(cls: type[BaseException]) -> str:
    """The class name Pyro5 writes for an exception: its module and name."""
    return f"{cls.__module__}.{cls.__name__}"


_BY_WIRE_NAME: dict[str, type[errors.DopqError]] = {_wire_name(c): c for c in errors.ALL_ERRORS}


def error_from_dict(classname: str, data: dict[str, Any]) -> Exception:
    """Rebuild a DoPQ error from what Pyro5 sent: its arguments and attributes.

    ``__init__`` is skipped (subclasses take different arguments); the message
    is set from the first argument when the attributes did not carry it.
    """
    cls = _BY_WIRE_NAME[classname]
    exc = cls.__new__(cls)
    Exception.__init__(exc, *data.get("args", ()))
    for key, value in (data.get("attributes") or {}).items():
        setattr(exc, key, value)
    if not hasattr(exc, "message"):
        exc.message = str(data.get("args", [""])[0] if data.get("args") else "")
    return exc


def register_errors() -> None:
    """Teach Pyro5's serializer DoPQ's error classes (idempotent)."""
    for name in _BY_WIRE_NAME:
        SerializerBase.register_dict_to_class(name, error_from_dict)


register_errors()  # on import: whichever side imports the protocol gets real classes
