"""What client and server share (dopq.wire.protocol): errors cross as their own class."""

from __future__ import annotations

import pytest
from Pyro5 import serializers

from dopq.core import errors
from dopq.wire import protocol


def over_the_wire(exc: Exception) -> Exception:
    """``exc`` as Pyro5's msgpack serializer sends it and the other side reads it."""
    s = serializers.serializers[protocol.SERIALIZER]
    back = s.loads(s.dumps(exc))
    assert isinstance(back, Exception)
    return back


@pytest.mark.parametrize("exc", [
    errors.DopqError("plain"),
    errors.Forbidden("only an admin may do that"),
    errors.NotAuthenticated("invalid token"),
    errors.ConfigError("policy.decay", "must be positive"),
    errors.JobRejected("name: required"),
    errors.BuildFailed("exit 1", "last lines"),
    errors.ServerIdentityChanged("the certificate changed"),
], ids=lambda e: type(e).__name__)
def test_dopq_errors_cross_the_wire_as_their_own_class(exc: errors.DopqError) -> None:
    back = over_the_wire(exc)
    assert type(back) is type(exc)
    assert str(back) == str(exc)
    assert vars(back) == vars(exc)  # reason, log_tail, key...: what the user needs


@pytest.mark.parametrize("cls", errors.ALL_ERRORS, ids=lambda c: c.__name__)
def test_every_error_class_is_registered(cls: type[errors.DopqError]) -> None:
    exc = cls.__new__(cls)
    errors.DopqError.__init__(exc, "one line")
    assert type(over_the_wire(exc)) is cls


def test_other_exceptions_do_not_pretend_to_be_dopq_errors() -> None:
    back = over_the_wire(ValueError("x"))
    assert not isinstance(back, errors.DopqError)
