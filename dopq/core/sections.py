"""The tables of the settings file, one dataclass each (``[server]``, ``[docker]``...).

Only the types and defaults live here; :class:`dopq.core.settings.Settings`
puts them together, reads the file and validates the values.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
    local_uploads: bool = True  # clients on this host may send bytes via <state>/local/upload.sock


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
class RuntimeSettings:
    backend: str = "docker"  # docker: this host's engine | slurm: jobs go to a Slurm cluster


@dataclass
class SlurmSettings:
    conf: str = ""  # slurm.conf for every Slurm command (SLURM_CONF); empty: Slurm's default
    bin_dir: str = ""  # folder of sbatch, squeue, scancel, scontrol; empty: PATH
    partition: str = ""  # sbatch --partition; empty: the cluster's default
    extra_args: list[str] = field(default_factory=list)  # more sbatch arguments
    shared_dir: str = ""  # a folder every node sees (NFS): job folders and /outdir
    poll_interval: float = 2.0  # seconds between reads of Slurm's jobs and nodes
    node_docker: str = "docker"  # the docker command on the nodes
    requeue_on_node_failure: bool = False  # else a job on a node that died fails, saying so


@dataclass
class RegistrySettings:
    url: str = ""  # host:port of the registry images go through (slurm backend)
