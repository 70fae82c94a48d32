"""The desktop client and certificates (issue 10, wall 4): ask on first contact, refuse a change.

Offscreen, against a real server; the question box is answered by the test.
"""

from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402

pytest.importorskip("PySide6.QtWidgets")

from conftest import Running, wait_for  # noqa: E402
from PySide6.QtCore import QSettings  # noqa: E402

from dopq.client.gui import dialogs, trust  # noqa: E402
from dopq.client.gui.pipeline import Pipeline  # noqa: E402
from dopq.client.remote import Client, load_pins, save_pin  # noqa: E402

pytestmark = pytest.mark.docker


def _window(qtbot: Any, run: Running, tmp_path: Path) -> Pipeline:
    ns = run.settings.nameserver
    client = Client(ns.host, ns.port, run.settings.server_name, token="")
    w = Pipeline(client, 0.2, None, ask_login=True,
                 settings=QSettings(str(tmp_path / "gui.ini"), QSettings.Format.IniFormat))
    w.poller.max_backoff = 0.3
    qtbot.addWidget(w)
    return w


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("DOPQ_FINGERPRINT")
    return tmp_path / "home"


def test_first_contact_shows_the_fingerprint_and_pins_it(
    server: Running, qtbot: Any, tmp_path: Path, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[str] = []
    answers = iter([False, True])
    monkeypatch.setattr(trust, "ask_trust",
                        lambda _parent, _server, seen: asked.append(seen) or next(answers))
    signed_in: list[str] = []
    monkeypatch.setattr(Pipeline, "sign_in", lambda self, reason="": signed_in.append("asked"))
    w = _window(qtbot, server, tmp_path)
    w.show()
    wait_for(lambda: (qtbot.wait(50), asked)[1], 20)
    assert asked == [server.fingerprint] and not load_pins()  # said no: nothing pinned
    assert w.state == "trust"
    w.trust.forget()  # as switching servers does: ask again
    wait_for(lambda: (qtbot.wait(50), len(asked) == 2)[1], 20)
    assert load_pins() == {server.settings.server_name: server.fingerprint}
    wait_for(lambda: (qtbot.wait(50), signed_in)[1], 20)  # verified: now the sign-in
    assert w.state == "auth"
    w.close()


def test_a_changed_certificate_is_a_clear_error(
    server: Running, qtbot: Any, tmp_path: Path, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save_pin(server.settings.server_name, "SHA256:" + "A" * 43)
    shown: list[str] = []
    monkeypatch.setattr(dialogs, "show_error", lambda _p, _t, err: shown.append(str(err)))
    monkeypatch.setattr(trust, "ask_trust", lambda *_a: pytest.fail("asked to trust"))
    w = _window(qtbot, server, tmp_path)
    w.show()
    wait_for(lambda: (qtbot.wait(50), shown)[1], 20)
    assert "server identity changed" in shown[0] and "\n" not in shown[0]
    qtbot.wait(1000)
    assert len(shown) == 1 and w.state == "trust"  # told once, nothing sent
    w.close()
