"""The one validated settings object, read from a TOML file.

Every key has a typed default here and nowhere else. Unknown keys and bad
values stop the start-up with a ``ConfigError`` that names the key
(``docker.network: expected a string``). The object is passed explicitly;
nothing reads a global configuration.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dopq.core.errors import ConfigError, JobRejected
from dopq.core.fairshare import PolicyConfig
from dopq.core.jobs import parse_duration, parse_size

ENV_CONFIG = "DOPQ_CONFIG"
# Capabilities a job keeps after dropping all: enough for ordinary images
# (chown, su to an unprivileged user), nothing that reaches the host.
DEFAULT_CAPS = ("CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID")


@dataclass
class ServerSettings:
    name: str = ""  # registered as dopq.<name>; empty: the host name
    host: str = "127.0.0.1"
    port: int = 0  # 0: any free port
    tls_cert: str = ""
    tls_key: str = ""
    max_connections: int = 256  # worker threads of the API
    max_connections_per_address: int = 128
    idle_timeout: float = 10.0  # an API connection silent this long is closed
    handshake_timeout: float = 2.0  # TLS and Pyro's CONNECT must be done within this


@dataclass
class NameServerSettings:
    host: str = "127.0.0.1"
    port: int = 9090
    embedded: str = "auto"  # auto | yes | no


@dataclass
class GpuSettings:
    backend: str = "auto"  # auto | nvml | virtual
    virtual_count: int = 2
    virtual_memory: str = "16g"  # memory of each virtual GPU
    memory_reserve: str = "1g"  # kept free on a shared device
    memory_enforcement: str = "kill"  # kill | warn: a job using more GPU memory than declared
    memory_tolerance: str = "256m"  # use above declared + this is a breach
    idle_after: str = "30m"  # a job's GPUs at (near) 0% this long: the job is idle
    idle_action: str = "warn"  # warn | cancel
    idle_utilisation: float = 5.0  # percent; at or below counts as idle
    sample_interval: float = 5.0  # seconds between GPU samples


@dataclass
class DockerSettings:
    base_url: str = "unix:///var/run/docker.sock"
    gpu_mode: str = "auto"  # auto | nvidia | env
    network: str = "none"
    stop_grace: float = 10.0  # seconds between SIGTERM and SIGKILL
    pids_limit: int = 4096
    log_max_bytes: str = "64m"  # per job, run log cap
    read_only_rootfs: bool = False
    cap_add: list[str] = field(default_factory=lambda: list(DEFAULT_CAPS))  # kept after drop-all
    name_prefix: str = "dopq"  # containers are <prefix>-<job-id>, labelled dopq.instance=<prefix>
    requeue_on_engine_restart: bool = False  # else such jobs fail with that reason
    remove_containers: bool = True  # remove a container once its exit and log are saved
    image_keep_days: float = 7.0  # remove DoPQ images unused for this long; 0: keep


@dataclass
class LimitSettings:
    default_memory: str = "20g"
    max_memory: str = "64g"
    default_cpus: float = 2.0
    max_cpus: float = 0.0  # 0: the host's CPU count
    default_shm: str = "64m"
    max_shm: str = "8g"
    max_time_limit: str = ""  # empty: no cap
    max_upload: str = "2g"
    max_unpacked: str = "8g"
    max_entries: int = 20000
    max_output: str = "50g"  # what one job may write to /outdir; "0": no limit


@dataclass
class BuildSettings:
    concurrency: int = 2
    timeout: float = 3600.0  # unused: replaced by time_limit; kept so older configs still load
    time_limit: str = "1h"  # a build running longer is stopped and fails
    network: bool = True  # RUN steps reach the network (to install packages)


@dataclass
class ImageSettings:
    # What a build may start from (FROM, COPY --from, RUN --mount from): these
    # names (shell patterns, e.g. "pytorch/pytorch:*"), scratch, and the
    # user's own earlier job images. Nothing else: not other users' images.
    allowed_bases: list[str] = field(default_factory=lambda: ["dopq/busybox:latest"])


@dataclass
class IntakeSettings:
    poll_interval: float = 0.2  # seconds between looks at the drop folder
    settle_seconds: float = 2.0  # a non-.part file must be unchanged this long
    upload_timeout: float = 60.0  # an upload without a chunk this long is discarded


@dataclass
class MountSettings:
    source: str = ""
    target: str = ""
    read_only: bool = True


@dataclass
class UserSettings:
    allowed: list[str] = field(default_factory=list)  # empty: anyone
    uid_map: dict[str, int] = field(default_factory=dict)  # user -> uid for the drop folder
    check_owner: bool = True
    logs_visible_to_all: bool = False
    token_ttl: float = 30 * 86400.0
    login_attempts: int = 5  # failures of one user from one address before that pair locks
    login_user_attempts: int = 30  # failures of one user from any address before it locks
    login_window: float = 300.0
    login_max_delay: float = 2.0  # an address with many failures waits up to this (no lock)
    login_concurrency: int = 2  # password hashes at once
    login_busy_wait: float = 5.0  # a sign-in waits this long for a hashing slot


@dataclass
class GuiSettings:
    poll_interval: float = 1.0
    style: str = ""  # path of a Qt style sheet; empty: the shipped dark theme


@dataclass
class MetricsSettings:
    listen: str = ""  # host:port of the Prometheus endpoint; empty: off


@dataclass
class NotifySettings:
    urls: list[str] = field(default_factory=list)  # apprise URLs for server events (admins')
    retries: int = 3  # more tries of a failed send, each after twice the wait
    log_lines: int = 20  # last lines of a job's log in its message
    disk_low: str = "5g"  # free space under state_dir that raises "disk low"; "0": off
    allow_schemes: list[str] = field(default_factory=list)  # users' URL schemes; empty: any


@dataclass
class Settings:
    state_dir: str = "/var/lib/dopq"
    inbox: str = ""  # empty: <state_dir>/inbox
    server: ServerSettings = field(default_factory=ServerSettings)
    nameserver: NameServerSettings = field(default_factory=NameServerSettings)
    gpus: GpuSettings = field(default_factory=GpuSettings)
    docker: DockerSettings = field(default_factory=DockerSettings)
    limits: LimitSettings = field(default_factory=LimitSettings)
    build: BuildSettings = field(default_factory=BuildSettings)
    images: ImageSettings = field(default_factory=ImageSettings)
    intake: IntakeSettings = field(default_factory=IntakeSettings)
    users: UserSettings = field(default_factory=UserSettings)
    policy: PolicyConfig = field(default_factory=PolicyConfig)  # dopq.core.fairshare
    gui: GuiSettings = field(default_factory=GuiSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    notify: NotifySettings = field(default_factory=NotifySettings)
    mounts: list[MountSettings] = field(default_factory=list)

    # -- derived paths ------------------------------------------------------
    @property
    def state_path(self) -> Path:
        return Path(self.state_dir)

    @property
    def inbox_path(self) -> Path:
        return Path(self.inbox) if self.inbox else self.state_path / "inbox"

    @property
    def db_path(self) -> Path:
        return self.state_path / "dopq.sqlite3"

    @property
    def server_name(self) -> str:
        return self.server.name or socket.gethostname().split(".")[0]

    @property
    def object_name(self) -> str:
        return f"dopq.{self.server_name}"

    def bytes_of(self, key: str) -> int:
        """A size key (``limits.max_memory``, ``gpus.memory_reserve``) in bytes."""
        section, name = key.split(".")
        return parse_size(getattr(getattr(self, section), name), key)

    def build_time_limit(self) -> float:
        return parse_duration(self.build.time_limit, "build.time_limit")

    def max_time_limit(self) -> float | None:
        text = self.limits.max_time_limit
        return parse_duration(text, "limits.max_time_limit") if text else None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> Settings:
        """Check values beyond their types; raise ConfigError naming the key."""
        _choice("nameserver.embedded", self.nameserver.embedded, ("auto", "yes", "no"))
        _choice("gpus.backend", self.gpus.backend, ("auto", "nvml", "virtual"))
        _choice("docker.gpu_mode", self.docker.gpu_mode, ("auto", "nvidia", "env"))
        if not 0 <= self.gpus.virtual_count <= 64:
            raise ConfigError("gpus.virtual_count", "must be between 0 and 64")
        self._validate_gpus()
        for key in ("server.port", "nameserver.port"):
            port = _get(self, key)
            if not 0 <= port <= 65535:
                raise ConfigError(key, "must be a port number (0-65535)")
        for key in ("server.tls_cert", "server.tls_key"):
            path = _get(self, key)
            if path and not Path(path).is_file():
                raise ConfigError(key, f"no such file: {path}")
        if bool(self.server.tls_cert) != bool(self.server.tls_key):
            raise ConfigError("server.tls_key", "set both server.tls_cert and server.tls_key")
        if self.nameserver.port == 0:
            raise ConfigError("nameserver.port", "must not be 0")
        if self.docker.network in ("host",) or self.docker.network.startswith("container:"):
            raise ConfigError("docker.network", "host and container networks are not allowed")
        for key in (
            "limits.default_memory", "limits.max_memory", "limits.default_shm",
            "limits.max_shm", "limits.max_upload", "limits.max_unpacked", "limits.max_output",
            "docker.log_max_bytes",
        ):
            try:
                self.bytes_of(key)
            except JobRejected as exc:
                raise ConfigError(key, exc.reason) from None
        if self.bytes_of("limits.default_memory") > self.bytes_of("limits.max_memory"):
            raise ConfigError("limits.default_memory", "is larger than limits.max_memory")
        try:
            self.max_time_limit()
        except JobRejected as exc:
            raise ConfigError("limits.max_time_limit", exc.reason) from None
        try:
            if self.build_time_limit() <= 0:
                raise ConfigError("build.time_limit", "must be positive")
        except JobRejected as exc:
            raise ConfigError("build.time_limit", exc.reason) from None
        for i, pattern in enumerate(self.images.allowed_bases):
            if not pattern.strip() or any(c.isspace() or ord(c) < 32 for c in pattern):
                raise ConfigError(f"images.allowed_bases[{i}]", "must be an image name or pattern")
        for key in ("build.concurrency", "limits.max_entries", "server.max_connections",
                    "server.max_connections_per_address", "users.login_attempts",
                    "users.login_user_attempts", "users.login_concurrency"):
            if _get(self, key) < 1:
                raise ConfigError(key, "must be at least 1")
        for key in (
            "intake.poll_interval", "docker.stop_grace", "build.timeout",
            "intake.upload_timeout", "server.idle_timeout", "server.handshake_timeout",
            "users.token_ttl", "users.login_window", "users.login_busy_wait", "gui.poll_interval",
            "limits.default_cpus",
        ):
            if _get(self, key) <= 0:
                raise ConfigError(key, "must be positive")
        self.policy.validate("policy.")
        self.metrics_address()
        for key in ("notify.retries", "notify.log_lines"):
            if not 0 <= _get(self, key) <= 1000:
                raise ConfigError(key, "must be between 0 and 1000")
        try:
            self.bytes_of("notify.disk_low")
        except JobRejected as exc:
            raise ConfigError("notify.disk_low", exc.reason) from None
        for i, mount in enumerate(self.mounts):
            if not mount.source.startswith("/") or not mount.target.startswith("/"):
                raise ConfigError(f"mounts[{i}]", "source and target must be absolute paths")
            if mount.target in ("/", "/outdir", "/proc", "/sys", "/dev"):
                raise ConfigError(f"mounts[{i}].target", f"{mount.target} may not be mounted over")
        if self.server_name and not all(c.isalnum() or c in "-_" for c in self.server_name):
            raise ConfigError("server.name", "only letters, digits, '-' and '_' are allowed")
        self.users.allowed = [u.lower() for u in self.users.allowed]
        return self

    def _validate_gpus(self) -> None:
        g = self.gpus
        _choice("gpus.memory_enforcement", g.memory_enforcement, ("kill", "warn"))
        _choice("gpus.idle_action", g.idle_action, ("warn", "cancel"))
        for key in ("gpus.virtual_memory", "gpus.memory_reserve", "gpus.memory_tolerance"):
            try:
                self.bytes_of(key)
            except JobRejected as exc:
                raise ConfigError(key, exc.reason) from None
        if self.bytes_of("gpus.virtual_memory") <= 0:
            raise ConfigError("gpus.virtual_memory", "must be positive")
        try:
            self.gpu_idle_after()
        except JobRejected as exc:
            raise ConfigError("gpus.idle_after", exc.reason) from None
        if not 0 <= g.idle_utilisation <= 100:
            raise ConfigError("gpus.idle_utilisation", "must be a percentage (0-100)")
        if g.sample_interval <= 0:
            raise ConfigError("gpus.sample_interval", "must be positive")

    def metrics_address(self) -> tuple[str, int] | None:
        """``metrics.listen`` as (host, port); None when empty (metrics off).

        ``[::1]:9400`` for IPv6; port 0 takes any free port (tests).
        """
        text = self.metrics.listen.strip()
        if not text:
            return None
        host, sep, port = text.rpartition(":")
        host = host.removeprefix("[").removesuffix("]")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535 or any(
                c.isspace() or c in "/[]" for c in host):
            raise ConfigError("metrics.listen", f"expected host:port, like 127.0.0.1:9400 "
                              f"(got {text!r})")
        return host, int(port)

    def gpu_idle_after(self) -> float:
        """``gpus.idle_after`` in seconds."""
        return parse_duration(self.gpus.idle_after, "gpus.idle_after")


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _choice(key: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ConfigError(key, f"must be one of {', '.join(options)} (got {value!r})")


def _convert(key: str, hint: Any, value: Any) -> Any:
    """Check ``value`` against the type ``hint``; build nested dataclasses."""
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(key, "expected a table")
        return _build(hint, value, key + ".")
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(key, "expected a list")
        return [_convert(f"{key}[{i}]", item, v) for i, v in enumerate(value)]
    if origin is dict:
        _, val_hint = typing.get_args(hint)
        if not isinstance(value, dict):
            raise ConfigError(key, "expected a table")
        return {str(k): _convert(f"{key}.{k}", val_hint, v) for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(key, "unsupported type")  # no optional keys: defaults instead
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, "expected true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, "expected an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(key, "expected a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(key, "expected a string")
        return value
    raise ConfigError(key, "unsupported type")


def _build(cls: Any, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in known:
            raise ConfigError(prefix + key, "unknown key")
        kwargs[key] = _convert(prefix + key, hints[key], value)
    return cls(**kwargs)


def from_dict(data: dict[str, Any]) -> Settings:
    settings: Settings = _build(Settings, data)
    return settings.validate()


def load(path: str | os.PathLike[str] | None = None) -> Settings:
    """Read settings from ``path``, else ``$DOPQ_CONFIG``, else defaults."""
    if path is None:
        path = os.environ.get(ENV_CONFIG) or None
    if path is None:
        return Settings().validate()
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(p), f"cannot read: {exc.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(p), f"not valid TOML: {exc}") from None
    return from_dict(data)


def effective(settings: Settings) -> dict[str, Any]:
    """Every key with the value in effect: ``inbox`` and ``server.name`` as derived."""
    data = settings.to_dict()
    data["inbox"] = str(settings.inbox_path)
    data["server"]["name"] = settings.server_name
    return data


def to_toml(settings: Settings) -> str:
    """Render the effective settings as TOML (for ``dopq config show``): every key,
    the derived ones as they take effect (``inbox``, ``server.name``), and
    ``[[mounts]]`` as a commented example when there are none. Reads back as the
    same settings."""
    data = effective(settings)
    lines: list[str] = []
    tables: list[tuple[str, dict[str, Any]]] = []
    for key, value in data.items():
        if isinstance(value, dict):
            tables.append((key, value))
        elif key != "mounts":
            lines.append(f"{key} = {_toml_value(value)}")
    for name, table in tables:
        lines.append(f"\n[{name}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in table.items()]
    for item in data["mounts"]:
        lines.append("\n[[mounts]]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in item.items()]
    if not data["mounts"]:
        lines.append("\n# [[mounts]]  none: a host folder every job sees, one table each")
        lines += [f"# {key} = {_toml_value(value)}"
                  for key, value in dataclasses.asdict(MountSettings()).items()]
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f'"{k}" = {_toml_value(v)}' for k, v in value.items()) + " }"
    raise TypeError(value)
