"""``dopq config show`` prints every key the settings have, and the README documents each."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from dopq.client import commands as cli
from dopq.core import settings
from dopq.core.settings import MountSettings, Settings

README = Path(__file__).resolve().parent.parent / "README.md"


def every_key(cls: Any = Settings, prefix: str = "") -> list[str]:
    """Dotted names of every key of the settings dataclasses (``[[mounts]]`` as mounts.*)."""
    keys = []
    for f in dataclasses.fields(cls):
        default = (f.default_factory() if f.default_factory is not dataclasses.MISSING
                   else f.default)
        if dataclasses.is_dataclass(default):
            keys += every_key(type(default), f"{prefix}{f.name}.")
        elif f.name == "mounts":
            keys += every_key(MountSettings, "mounts.")
        else:
            keys.append(prefix + f.name)
    return keys


def test_config_show_prints_every_key(capsys: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DOPQ_CONFIG", raising=False)
    assert cli.main(["config", "show"]) == 0
    out = capsys.readouterr().out
    section = ""
    shown = set()
    for line in out.splitlines():
        line = line.removeprefix("# ")  # [[mounts]] as an example when there are none
        if m := re.match(r"^\[\[?(\w+)\]\]?", line):
            section = m.group(1) + "."
        elif m := re.match(r"^(\w+) = ", line):
            shown.add(section + m.group(1))
    assert set(every_key()) - shown == set()
    # the effective values, and a configuration that reads back as the same settings
    s = Settings().validate()
    assert f'inbox = "{s.inbox_path}"' in out and 'inbox = ""' not in out
    assert settings.from_dict(tomllib.loads(out)).to_dict() == {
        **s.to_dict(), "inbox": str(s.inbox_path),
        "server": {**s.to_dict()["server"], "name": s.server_name}}


def test_config_show_prints_mounts(capsys: Any, tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[[mounts]]\nsource = "/data"\ntarget = "/data"\n')
    assert cli.main(["config", "show", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert '[[mounts]]\nsource = "/data"\ntarget = "/data"\nread_only = true' in out


def test_readme_documents_every_key() -> None:
    text = README.read_text()
    config = text[text.index("## Configuration"):text.index("## Fair share")]
    missing = [k for k in every_key() if f"`{k.rsplit('.', 1)[-1]}`" not in config]
    assert missing == []
    sections = {k.split(".")[0] for k in every_key() if "." in k}
    assert all(f"`[{s}]`" in config or f"`[[{s}]]`" in config for s in sections)


def test_readme_priority_formula_is_the_policys() -> None:
    text = README.read_text()
    assert "w_fairshare·F + w_age·min(1, wait/max_age) + w_job·(p + 1000)/2000 − nice" in text
    from dopq.core.policy import job_term

    assert job_term(0, 1000.0) == 500.0 and job_term(1000, 1000.0) == 1000.0


def test_config_show_json_has_the_effective_inbox(capsys: Any,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    monkeypatch.delenv("DOPQ_CONFIG", raising=False)
    assert cli.main(["config", "show", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["inbox"] == str(Settings().inbox_path) and data["server"]["name"]
    assert "mounts" in data
