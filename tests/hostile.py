"""Build hostile (and one good) job archives in a folder, for intake tests.

``raw_zip`` writes zip bytes by hand, so it can say what ``zipfile`` refuses to
write: NUL in names, duplicates, symlink and device modes, encryption flags,
lying sizes and entry counts. Every builder takes a folder and returns the
path of the zip it wrote there.

``ARCHIVE_CASES`` (refused by ``dopq.core.archive.unpack``) and ``CONFIG_CASES``
(unpacked fine, refused later by ``inspect_context`` or ``parse_spec``) map a
case name to ``(builder, words expected in the reason)``.
"""

from __future__ import annotations

import json
import stat
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dopq.core.archive import zip_folder

BASE_IMAGE = "dopq/busybox:latest"
REG = (stat.S_IFREG | 0o644) << 16
DIR = ((stat.S_IFDIR | 0o755) << 16) | 0x10
_DOS_TIME = (0, (1 << 5) | 1)  # 1980-01-01 00:00:00


@dataclass
class RawEntry:
    """One entry as ``raw_zip`` writes it; defaults make a plain deflated file."""

    name: str | bytes
    data: bytes = b""
    external_attr: int = REG
    create_system: int = 3
    flags: int = 0
    method: int = zipfile.ZIP_DEFLATED
    declared_size: int | None = None  # uncompressed size to claim; None = the truth
    zeros: int = 0  # append this many zero bytes (streamed, for bombs)


def raw_zip(path: Path, entries: Iterable[RawEntry], *, declared_count: int | None = None) -> Path:
    """Write ``entries`` to ``path`` as a zip, byte by byte, trusting nothing."""
    path = Path(path)
    central = bytearray()
    count = 0
    with open(path, "wb") as out:
        for e in entries:
            count += 1
            if isinstance(e.name, bytes):
                name, flags = e.name, e.flags
            else:
                name, flags = e.name.encode("utf-8", "surrogatepass"), e.flags | 0x800
            crc, size, payload = _payload(e)
            declared = size if e.declared_size is None else e.declared_size
            offset = out.tell()
            out.write(struct.pack(
                "<4s5H3L2H", b"PK\x03\x04", 20, flags, e.method, *_DOS_TIME,
                crc, len(payload), declared, len(name), 0,
            ))
            out.write(name)
            out.write(payload)
            central += struct.pack(
                "<4s6H3L5H2L", b"PK\x01\x02", (e.create_system << 8) | 20, 20, flags,
                e.method, *_DOS_TIME, crc, len(payload), declared, len(name), 0, 0, 0, 0,
                e.external_attr & 0xFFFFFFFF, offset,
            )
            central += name
        cd_at = out.tell()
        out.write(central)
        n = count if declared_count is None else declared_count
        out.write(struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, n, n, len(central), cd_at, 0))
    return path


def _payload(e: RawEntry) -> tuple[int, int, bytes]:
    """(crc32, uncompressed size, stored bytes) of an entry's data plus its zeros."""
    crc = zlib.crc32(e.data)
    chunk = bytes(1024**2)
    left = e.zeros
    if e.method == zipfile.ZIP_STORED:
        while left:
            part = chunk[: min(left, len(chunk))]
            crc = zlib.crc32(part, crc)
            left -= len(part)
        return crc, len(e.data) + e.zeros, e.data + bytes(e.zeros)
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    out = [comp.compress(e.data)]
    while left:
        part = chunk[: min(left, len(chunk))]
        crc = zlib.crc32(part, crc)
        out.append(comp.compress(part))
        left -= len(part)
    out.append(comp.flush())
    return crc, len(e.data) + e.zeros, b"".join(out)


# --- a good job --------------------------------------------------------------


def good_job(
    folder: Path,
    user: str,
    name: str,
    script: str = "echo hi",
    *,
    num_gpus: int = 0,
    config: dict[str, Any] | None = None,
) -> Path:
    """Write a valid job folder ``folder/name`` and return it.

    ``config`` adds or replaces keys of ``container_config.json``.
    """
    job = Path(folder) / name
    job.mkdir(parents=True)
    (job / "Dockerfile").write_text(
        f"FROM {BASE_IMAGE}\nCOPY run.sh /job/run.sh\nCMD [\"sh\", \"/job/run.sh\"]\n"
    )
    cfg: dict[str, Any] = {
        "name": name,
        "executor_name": user,
        "num_gpus": num_gpus,
        "build_flag": True,
        "run_params": {},
    }
    cfg.update(config or {})
    (job / "container_config.json").write_text(json.dumps(cfg, indent=2))
    run = job / "run.sh"
    run.write_text(f"#!/bin/sh\n{script}\n")
    run.chmod(0o755)
    return job


def zip_it(folder: Path, out: Path | None = None, *, nest: bool = False) -> Path:
    """Zip a job folder as ``dopq submit`` does, or (``nest``) with the folder on top."""
    folder = Path(folder)
    out = Path(out) if out is not None else folder.parent / f"{folder.name}.zip"
    if not nest:
        return zip_folder(folder, out)
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(folder.rglob("*")):
            zf.write(path, f"{folder.name}/{path.relative_to(folder).as_posix()}")
    return out


# --- hostile archives --------------------------------------------------------

_DOCKERFILE = RawEntry("Dockerfile", f"FROM {BASE_IMAGE}\n".encode())
_CONFIG = RawEntry(
    "container_config.json", b'{"name": "evil-job", "executor_name": "mallory", "num_gpus": 0}'
)


def _job_with(folder: Path, file: str, *extra: RawEntry) -> Path:
    return raw_zip(Path(folder) / file, [_DOCKERFILE, _CONFIG, *extra])


def not_a_zip(folder: Path) -> Path:
    path = Path(folder) / "not-a-zip.zip"
    path.write_bytes(b"this is not a zip file, just some text\n" * 10)
    return path


def truncated_zip(folder: Path) -> Path:
    path = raw_zip(Path(folder) / "truncated.zip", [_DOCKERFILE, _CONFIG])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def empty_zip(folder: Path) -> Path:
    path = Path(folder) / "empty.zip"
    with zipfile.ZipFile(path, "w"):
        pass
    return path


def traversal(folder: Path, name: str = "../evil") -> Path:
    return _job_with(folder, "traversal.zip", RawEntry(name, b"gotcha"))


def nested_traversal(folder: Path) -> Path:
    return traversal(folder, "job/../../evil")


def absolute(folder: Path, name: str = "/etc/x") -> Path:
    return _job_with(folder, "absolute.zip", RawEntry(name, b"gotcha"))


def drive_letter(folder: Path) -> Path:
    return _job_with(folder, "drive.zip", RawEntry("C:/Windows/evil", b"gotcha"))


def backslash(folder: Path) -> Path:
    return _job_with(folder, "backslash.zip", RawEntry("..\\..\\evil", b"gotcha"))


def symlink(folder: Path) -> Path:
    link = RawEntry("link", b"/etc/passwd", external_attr=(stat.S_IFLNK | 0o777) << 16)
    return _job_with(folder, "symlink.zip", link)


def device(folder: Path) -> Path:
    dev = RawEntry("null", b"", external_attr=(stat.S_IFCHR | 0o666) << 16)
    return _job_with(folder, "device.zip", dev)


def fifo(folder: Path) -> Path:
    pipe = RawEntry("pipe", b"", external_attr=(stat.S_IFIFO | 0o644) << 16)
    return _job_with(folder, "fifo.zip", pipe)


def duplicate(folder: Path) -> Path:
    return _job_with(folder, "duplicate.zip", RawEntry("Dockerfile", b"FROM scratch\n"))


def file_and_folder(folder: Path) -> Path:
    return _job_with(folder, "clash.zip", RawEntry("data", b"x"), RawEntry("data/inner", b"y"))


def nul_name(folder: Path) -> Path:
    return _job_with(folder, "nul.zip", RawEntry("ok.txt\x00../../evil", b"gotcha"))


def control_name(folder: Path) -> Path:
    return _job_with(folder, "control.zip", RawEntry("bad\x1b[31mname", b"x"))


def encrypted(folder: Path) -> Path:
    return _job_with(folder, "encrypted.zip", RawEntry("secret", b"x" * 40, flags=0x1))


def too_many_entries(folder: Path, n: int = 30) -> Path:
    entries = [RawEntry(f"f{i:05d}", b"") for i in range(n)]
    return raw_zip(Path(folder) / "many.zip", [_DOCKERFILE, _CONFIG, *entries])


def lying_count(folder: Path, n: int = 30) -> Path:
    """Many entries, but an end record that claims just one."""
    entries = [RawEntry(f"f{i:05d}", b"") for i in range(n)]
    return raw_zip(Path(folder) / "lying-count.zip", entries, declared_count=1)


def zip_bomb(folder: Path, size: int = 64 * 1024**2) -> Path:
    """``size`` zero bytes in a few kilobytes, honestly declared."""
    return _job_with(folder, "bomb.zip", RawEntry("zeros.bin", zeros=size))


def lying_bomb(folder: Path, size: int = 64 * 1024**2, claim: int = 100) -> Path:
    """``size`` zero bytes whose headers claim only ``claim`` bytes."""
    bomb = RawEntry("zeros.bin", zeros=size, declared_size=claim)
    return _job_with(folder, "lying-bomb.zip", bomb)


def bad_method(folder: Path) -> Path:
    return _job_with(folder, "method.zip", RawEntry("odd", b"x", method=99))


# --- archives that unpack, but hold a bad job -------------------------------


def _config_zip(folder: Path, file: str, config: bytes, dockerfile: bool = True) -> Path:
    entries = [_DOCKERFILE] if dockerfile else []
    return raw_zip(Path(folder) / file, [*entries, RawEntry("container_config.json", config)])


def no_dockerfile(folder: Path) -> Path:
    return _config_zip(folder, "no-dockerfile.zip", _CONFIG.data, dockerfile=False)


def no_config(folder: Path) -> Path:
    return raw_zip(Path(folder) / "no-config.zip", [_DOCKERFILE])


def bad_json(folder: Path) -> Path:
    return _config_zip(folder, "bad-json.zip", b'{"name": "x", "num_gpus": ')


def not_an_object(folder: Path) -> Path:
    return _config_zip(folder, "not-object.zip", b'["name", "evil-job"]')


def wrongly_typed(folder: Path) -> Path:
    cfg = {"name": "evil-job", "executor_name": "mallory", "num_gpus": "two"}
    return _config_zip(folder, "wrong-type.zip", json.dumps(cfg).encode())


def unknown_key(folder: Path) -> Path:
    cfg = {"name": "evil-job", "executor_name": "mallory", "num_gpu": 1}
    return _config_zip(folder, "unknown-key.zip", json.dumps(cfg).encode())


def forbidden_run_params(folder: Path, key: str = "privileged", value: Any = True) -> Path:
    cfg = {"name": "evil-job", "executor_name": "mallory", "run_params": {key: value}}
    return _config_zip(folder, "run-params.zip", json.dumps(cfg).encode())


def host_mount(folder: Path) -> Path:
    return forbidden_run_params(folder, "volumes", {"/": {"bind": "/host", "mode": "rw"}})


Builder = Callable[[Path], Path]

ARCHIVE_CASES: dict[str, tuple[Builder, str]] = {
    "not_a_zip": (not_a_zip, "zip"),
    "truncated_zip": (truncated_zip, "zip"),
    "empty_zip": (empty_zip, "empty"),
    "traversal": (traversal, "'..'"),
    "nested_traversal": (nested_traversal, "'..'"),
    "absolute": (absolute, "absolute"),
    "drive_letter": (drive_letter, "absolute"),
    "backslash": (backslash, "backslash"),
    "symlink": (symlink, "symlink"),
    "device": (device, "special file"),
    "fifo": (fifo, "special file"),
    "duplicate": (duplicate, "duplicate"),
    "file_and_folder": (file_and_folder, "both a file and a folder"),
    "nul_name": (nul_name, "NUL"),
    "control_name": (control_name, "control"),
    "encrypted": (encrypted, "encrypted"),
    "too_many_entries": (too_many_entries, "entries"),
    "lying_count": (lying_count, "entries"),
    "zip_bomb": (zip_bomb, "over the limit"),
    "lying_bomb": (lying_bomb, "corrupt"),
    "bad_method": (bad_method, "compression"),
}
"""Refused by ``unpack`` under ``TEST_LIMITS``-like limits (16 MiB, 20 entries)."""

CONFIG_CASES: dict[str, tuple[Builder, str]] = {
    "no_config": (no_config, "missing"),
    "bad_json": (bad_json, "not valid JSON"),
    "not_an_object": (not_an_object, "JSON object"),
    "wrongly_typed": (wrongly_typed, "num_gpus"),
    "unknown_key": (unknown_key, "num_gpu"),
    "forbidden_run_params": (forbidden_run_params, "'privileged' is not allowed"),
    "host_mount": (host_mount, "'volumes' is not allowed"),
}
"""Unpacked fine; refused by ``inspect_context`` or ``parse_spec``."""
