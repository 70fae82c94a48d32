"""The one validated settings object, read from a TOML file.

Every key has a typed default in :mod:`dopq.core.sections` and nowhere else. Unknown keys and bad
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
from dopq.core.sections import (  # noqa: F401 - the tables, importable from here too
    DEFAULT_CAPS,
    BuildSettings,
    DockerSettings,
    GpuSettings,
    GuiSettings,
    ImageSettings,
    IntakeSettings,
    LimitSettings,
    MetricsSettings,
    MountSettings,
    NameServerSettings,
    NotifySettings,
    RegistrySettings,
    RuntimeSettings,
    ServerSettings,
    SlurmSettings,
    UserSettings,
)

ENV_CONFIG = "DOPQ_CONFIG"


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
    runtime: RuntimeSettings = field(default_factory=RuntimeSettings)
    slurm: SlurmSettings = field(default_factory=SlurmSettings)
    registry: RegistrySettings = field(default_factory=RegistrySettings)
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
        self._validate_slurm()
        return self

    def _validate_slurm(self) -> None:
        _choice("runtime.backend", self.runtime.backend, ("docker", "slurm"))
        if self.slurm.poll_interval <= 0:
            raise ConfigError("slurm.poll_interval", "must be positive")
        for key in ("slurm.conf", "slurm.bin_dir", "slurm.shared_dir"):
            path = _get(self, key)
            if path and not path.startswith("/"):
                raise ConfigError(key, f"must be an absolute path (got {path!r})")
        url = self.registry.url
        if url and (any(c.isspace() or c in "/@" for c in url) or ":" not in url):
            raise ConfigError("registry.url", f"expected host:port, like 127.0.0.1:5000 "
                              f"(got {url!r})")
        if self.runtime.backend == "slurm":
            if not self.slurm.shared_dir:
                raise ConfigError("slurm.shared_dir", "is needed with runtime.backend = "
                                  '"slurm": a folder every node sees')
            if not url:
                raise ConfigError("registry.url", 'is needed with runtime.backend = "slurm":'
                                  " the nodes pull the images from it")

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
