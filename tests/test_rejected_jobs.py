"""A rejected job as its owner sees it: its own name, the whole reason, a wait that ends.

Through a real server (``tests/conftest.py``); the upload is made call by call,
as ``Client.submit`` does, so that what the server does with an archive it
accepted is tested whatever the client checks first.
"""

from __future__ import annotations

import datetime as dt
import io
import os
import zipfile
from pathlib import Path
from typing import Any

import pytest
from conftest import Running, wait_for

from dopq.client import commands as cli
from dopq.core.errors import DopqError

DOCKERFILE = "FROM dopq/busybox:latest\nCMD [\"true\"]\n"


def upload(server: Running, config: str, options: dict[str, Any]) -> int | None:
    """Upload a zip of a Dockerfile and ``config``; the job id, or None if refused at once."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("Dockerfile", DOCKERFILE)
        zf.writestr("container_config.json", config)
    data = buf.getvalue()
    alice = server["alice"]
    try:
        up = alice.call("submit_begin", len(data), options)
        alice.call("submit_chunk", up, data)
        return int(alice.call("submit_finish", up)["id"])
    except DopqError:
        return None  # refused before a job was made: nothing to name


def seconds(iso: str) -> float:
    return dt.datetime.fromisoformat(iso).timestamp()


def drop(server: Running, file: str, config: str) -> None:
    """Drop a zip into ``inbox/alice/`` as a user on the server host would."""
    inbox = server.settings.inbox_path / "alice"
    inbox.mkdir(parents=True, exist_ok=True)
    part = inbox / f"{file}.part"
    with zipfile.ZipFile(part, "w") as zf:
        zf.writestr("Dockerfile", DOCKERFILE)
        zf.writestr("container_config.json", config)
    part.rename(inbox / file)


def test_rejected_jobs_keep_their_names(server: Running, capsys: Any,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    alice = server["alice"]
    drop(server, "unreadable-config.zip", "{not json")
    drop(server, "folder-name.zip",
         '{"name": "resnet-sweep", "num_gpus": 1, "run_params": {"privileged": true}}')
    expected = {"unreadable-config.zip": "unreadable-config",  # no config: the file's name
                "folder-name.zip": "resnet-sweep"}  # the config's name, though it failed
    # an upload the server accepted and then rejected keeps --name, else the file's name
    uploaded = upload(server, "{not json", {"source_name": "my-experiment"})

    def done() -> list[dict[str, Any]] | None:
        rows = [r for r in alice.call("history") if r["state"] == "failed"]
        return rows if len(rows) >= 2 + (uploaded is not None) else None

    rows = {r["id"]: r for r in wait_for(done, 60)}
    names = sorted(r["name"] for r in rows.values())
    assert set(expected.values()) <= set(names), names
    if uploaded is not None:
        assert rows[uploaded]["name"] == "my-experiment"
    for row in rows.values():
        job = alice.call("job", row["id"])
        assert job["error"].startswith("rejected:"), job
        # the wait ended with the job: finished - submitted, not growing with the clock
        assert job["wait_s"] == pytest.approx(
            seconds(job["finished_at"]) - seconds(job["submitted_at"]), abs=0.01)

    # dopq show: the whole reason, wrapped to the terminal, never cut
    big = next(r["id"] for r in rows.values() if r["name"] == "resnet-sweep")
    monkeypatch.setattr(cli, "_client", lambda _args: alice)
    monkeypatch.setattr("shutil.get_terminal_size", lambda *_a: os.terminal_size((60, 24)))
    assert cli.main(["show", str(big)]) == 0
    out = capsys.readouterr().out
    error = alice.call("job", big)["error"]
    assert len(error) > 44, error  # longer than a line of this 60-column terminal
    lines = out[out.index("        error: "):].splitlines()
    shown = [lines[0][15:]]
    for line in lines[1:]:
        if not line.startswith(" " * 15):
            break
        shown.append(line[15:])
    assert " ".join(shown).split() == error.split()
    assert len(shown) > 1 and all(len(" " * 15 + ln) <= 60 for ln in shown)


def test_show_wraps_a_long_error() -> None:
    text = "rejected: " + "word " * 40
    lines = cli._wrapped("error", text).splitlines()
    assert lines[0].startswith("        error: rejected:") and len(lines) > 1
    assert " ".join(ln.strip() for ln in lines).replace("error: ", "", 1).split() \
        == text.split()


def test_upload_name_is_a_fallback(tmp_path: Path) -> None:
    from dopq.client.remote import Client

    sent: list[dict[str, Any]] = []

    class Recorder(Client):
        def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
            if method == "submit_begin":
                sent.append(args[1])
                raise DopqError("stop here")
            return None

    folder = tmp_path / "my-job"
    folder.mkdir()
    (folder / "Dockerfile").write_text(DOCKERFILE)
    (folder / "container_config.json").write_text('{"name": "abc"}')
    with pytest.raises(DopqError):
        Recorder("127.0.0.1", 1, "x", token="").submit(folder, {"gpus": 1})
    assert sent and sent[0]["source_name"] == "my-job" and sent[0]["gpus"] == 1
