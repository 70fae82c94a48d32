"""Work-arounds for bugs in the Qt binding, probed at import time, not guessed.

``emit``: some PySide6 releases (seen with 6.12.0 on CPython 3.11) return the
result of ``Signal.emit()`` without a reference of its own, so every emit from
Python lowers the reference count of ``True`` by one. Python 3.12 and later
make ``True`` immortal; on 3.11 a window that emits a few dozen signals a
second brings the count to zero within hours and the interpreter aborts
("bool_dealloc: deallocating True or False"). Every emit in ``dopq.client.gui`` goes
through ``emit()``, which gives the missing reference back when the probe
found the bug.

``keep_none``: the same releases return ``None`` from every void C++ method
(``QPainter.drawRect``, ``QLabel.setText``...) without a reference of its
own. A painted picture makes thousands of such calls per paint (the GPU
timeline, ``dopq.client.gui.timeline``), so ``None``'s count would reach zero
within seconds ("none_dealloc: deallocating None"). When the probe found the
bug, ``keep_none()`` (called at each refresh and each painted picture) lifts
the count far above anything the window can drop before the next call.
"""

from __future__ import annotations

import ctypes
import sys
from typing import Any

from PySide6.QtCore import QObject, Signal

_incref = ctypes.pythonapi.Py_IncRef
_incref.argtypes = [ctypes.py_object]
_incref.restype = None


class _Probe(QObject):
    ping = Signal()


def _emit_drops_a_reference() -> bool:
    probe = _Probe()
    before = sys.getrefcount(True)
    for _ in range(8):
        probe.ping.emit()
    lost = before - sys.getrefcount(True)
    if lost >= 8:
        for _ in range(lost):  # what the probe itself took
            _incref(True)
        return True
    return False


EMIT_DROPS_REFERENCE = _emit_drops_a_reference()


class _VoidProbe(QObject):
    pass


def _void_drops_none() -> bool:
    probe = _VoidProbe()
    before = sys.getrefcount(None)
    for _ in range(8):
        probe.setObjectName("probe")
    return before - sys.getrefcount(None) >= 8


VOID_DROPS_NONE = _void_drops_none() and sys.implementation.name == "cpython"
NONE_FLOOR = 1 << 24  # below this, keep_none tops up: far more than a paint or refresh drops
NONE_TOP_UP = 1 << 30


def keep_none() -> None:
    """Give ``None`` back the references void calls took (when the probe found the bug)."""
    if VOID_DROPS_NONE and sys.getrefcount(None) < NONE_FLOOR:
        # ob_refcnt is the first field of every CPython object (before 3.12's immortal None)
        ctypes.c_ssize_t.from_address(id(None)).value += NONE_TOP_UP


keep_none()


def emit(signal: Any, *args: Any) -> None:
    """``signal.emit(*args)``, keeping the reference count of its result right."""
    result = signal.emit(*args)
    if EMIT_DROPS_REFERENCE and result is not None:
        _incref(result)
