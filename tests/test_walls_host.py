"""What jobs and users write on the host raises nobody's rights (issue 10: 1, 7, 9, 11).

Written as the attacks: a job plants a setuid-root busybox, a setgid one, a
FIFO, a device and links in ``/outdir``; a lab member swaps symlinks, FIFOs
and hard links into the drop folder; another Unix user tries to read the state
folder and other people's outputs; a job writes without end. Unix users are
plain numeric uids without a passwd entry (nothing to add or remove); commands
run as them through ``setpriv``.
"""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Running, cleanup_docker, make_config, release_outputs, wait_for
from hostile import good_job, zip_it

from dopq.core import settings as settings_mod
from dopq.server import hostfs, outputs
from dopq.server import inbox as inbox_mod
from dopq.server.store import Store

UA, UB = 45101, 45102  # alice's and bob's Unix uids on this host


def _free_uid(uid: int) -> int:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return uid
    raise RuntimeError(f"uid {uid} is taken on this host; pick others")


def as_user(uid: int, *cmd: str) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` as an ordinary Unix user (no groups, no capabilities)."""
    return subprocess.run(
        ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--inh-caps=-all",
         *cmd], capture_output=True, text=True, timeout=30,
    )


@pytest.fixture
def base() -> Iterator[Path]:
    """A folder other Unix users can pass through (pytest's tmp folders are 0700)."""
    _free_uid(UA), _free_uid(UB)
    path = Path(tempfile.mkdtemp(prefix="dopq-walls-", dir="/tmp"))
    path.chmod(0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def walled(base: Path, engine: None) -> Iterator[Running]:
    cfg = make_config(base, users={"uid_map": {"alice": UA, "bob": UB}},
                      limits={"max_output": "8m"})
    run = Running(cfg)
    try:
        yield run
    finally:
        try:
            run.stop()
        finally:
            cleanup_docker(run.settings.docker.name_prefix)
            release_outputs(run.settings)
    assert not hostfs._mounts_at(run.settings.state_path / "outputs"), "outputs left mounted"


def _victim(base: Path) -> Path:
    victim = base / "victim"
    victim.write_text("root's secret\n")
    victim.chmod(0o600)
    return victim


def _sealed(outdir: Path) -> bool:
    return outdir.is_dir() and outdir.stat().st_uid == UA


# -- 1. host root through /outdir --------------------------------------------------------------
@pytest.mark.docker
def test_setuid_binary_from_outdir_gives_no_root(
    walled: Running, jobs_dir: Path, base: Path
) -> None:
    victim = _victim(base)
    before = victim.stat()
    script = "; ".join([
        "cp /bin/busybox /outdir/busybox-u && chmod 4755 /outdir/busybox-u",
        "cp /bin/busybox /outdir/busybox-g && chmod 2755 /outdir/busybox-g",
        "mkdir -p /outdir/sub/deeper && cp /bin/busybox /outdir/sub/deeper/busybox-x && "
        "chmod 6755 /outdir/sub/deeper/busybox-x && chmod 2777 /outdir/sub",
        f"ln -s {victim} /outdir/link-to-host",
        "ln /outdir/busybox-u /outdir/busybox-twin",
        "mkfifo /outdir/fifo",
        "echo mknod:$(mknod /outdir/null c 1 3 2>/dev/null && echo made || echo refused)",
        "echo hardlink:$(ln /bin/busybox /outdir/hard 2>/dev/null && echo made || echo refused)",
        "echo result > /outdir/result.txt",
    ])
    job = walled.wait_job(walled["alice"].submit(good_job(jobs_dir, "alice", "suid", script))["id"])
    assert job["state"] == "succeeded", job
    log = walled["alice"].call("logs", job["id"])["data"]
    assert "mknod:refused" in log  # no CAP_MKNOD in a job
    assert "hardlink:refused" in log  # /outdir is another mount: no link to the image's files
    outdir = walled.settings.state_path / "outputs" / "alice" / str(job["id"])
    wait_for(lambda: _sealed(outdir) and not (outdir / "fifo").exists(), 30)
    # everything is alice's, no setuid/setgid bit is left, the FIFO is gone
    for path in [outdir, *outdir.rglob("*")]:
        st = path.lstat()
        assert st.st_uid == UA, path
        assert not stat.S_IMODE(st.st_mode) & 0o6000, (path, oct(st.st_mode))
        assert stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode) or stat.S_ISLNK(st.st_mode)
    assert (outdir / "busybox-twin").exists()  # both links inside the folder: kept, fixed
    # the planted symlink was changed itself, never what it points to
    assert os.readlink(outdir / "link-to-host") == str(victim)
    after = victim.stat()
    assert (after.st_uid, after.st_gid, after.st_mode) == (before.st_uid, before.st_gid,
                                                           before.st_mode)
    # alice runs the "setuid" busybox: she stays herself
    for name in ("busybox-u", "busybox-g", "sub/deeper/busybox-x"):
        got = as_user(UA, str(outdir / name), "id", "-u")
        assert got.returncode == 0 and got.stdout.strip() == str(UA), got
    assert as_user(UA, "cat", str(outdir / "result.txt")).stdout == "result\n"
    # bob can neither list nor read alice's outputs, nor the state folder
    for cmd in (["ls", str(outdir)], ["cat", str(outdir / "result.txt")],
                ["ls", str(walled.settings.state_path / "outputs" / "alice")],
                ["ls", str(walled.settings.state_path)]):
        got = as_user(UB, *cmd)
        assert got.returncode != 0 and "ermission denied" in got.stderr, (cmd, got)


@pytest.mark.docker
def test_a_running_job_hands_out_no_root_either(walled: Running, jobs_dir: Path) -> None:
    outputs = walled.settings.state_path / "outputs"
    opts = hostfs._mounts_at(outputs)[-1][1]
    assert {"nosuid", "nodev"} <= opts  # the whole outputs tree, mounted by the server
    # setuid-root on the mount is inert whoever put it there (here: root itself)
    planted = outputs / "busybox-planted"
    shutil.copy("/bin/busybox" if Path("/bin/busybox").exists() else "/usr/bin/busybox", planted)
    try:
        planted.chmod(0o4755)
        got = as_user(UA, str(planted), "id", "-u")
        assert got.stdout.strip() == str(UA), got
    finally:
        planted.unlink()
    script = ("cp /bin/busybox /outdir/busybox-u && chmod 4755 /outdir/busybox-u && "
              "touch /outdir/ready; sleep 60")
    alice = walled["alice"]
    job_id = alice.submit(good_job(jobs_dir, "alice", "sleeper", script))["id"]
    outdir = outputs / "alice" / str(job_id)
    wait_for(lambda: (outdir / "ready").exists(), 60)
    got = as_user(UA, str(outdir / "busybox-u"), "id", "-u")
    assert got.returncode == 0 and got.stdout.strip() == str(UA), got
    # within about a second the watcher has cleared the bit as well
    wait_for(lambda: not (outdir / "busybox-u").stat().st_mode & 0o4000, 10)
    assert as_user(UB, "ls", str(outdir)).returncode != 0
    alice.call("cancel", job_id)
    assert walled.wait_job(job_id)["state"] == "cancelled"


# -- 11. limits.max_output -------------------------------------------------------------------
@pytest.mark.docker
def test_a_job_that_writes_without_end_is_stopped_at_max_output(
    walled: Running, jobs_dir: Path
) -> None:
    # 1 MiB about every 0.1 s, for ever, next to a job that writes a little
    script = ("i=0; while :; do dd if=/dev/zero of=/outdir/f$i bs=1M count=1 2>/dev/null; "
              "i=$((i+1)); sleep 0.1; done")
    alice = walled["alice"]
    hog = alice.submit(good_job(jobs_dir, "alice", "writer", script))["id"]
    small = alice.submit(good_job(jobs_dir, "alice", "small",
                                  "head -c 4000000 /dev/zero > /outdir/ok; sleep 2"))["id"]
    job = walled.wait_job(hog, 60)
    assert job["state"] == "failed", job
    assert job["error"].startswith("wrote more than limits.max_output=8m"), job
    outdir = walled.settings.state_path / "outputs" / "alice" / str(hog)
    used = sum(p.lstat().st_blocks * 512 for p in outdir.rglob("*"))
    slack = used - 8 * 2**20
    print(f"max_output 8m: {used / 2**20:.1f} MiB on disk, slack {slack / 2**20:.1f} MiB")
    assert slack < 4 * 2**20  # at ~10 MiB/s: well under half a second of writing
    assert walled.wait_job(small)["state"] == "succeeded"
    # the same through a file deleted at once but kept open: no name left to measure
    hidden = ("exec 3>/outdir/hidden; rm /outdir/hidden; while :; do "
              "dd if=/dev/zero bs=1M count=1 >&3 2>/dev/null; sleep 0.1; done")
    job = walled.wait_job(alice.submit(good_job(jobs_dir, "alice", "hider", hidden))["id"], 60)
    assert job["state"] == "failed", job
    assert job["error"].startswith("wrote more than limits.max_output=8m"), job


# -- 9. the state folder ------------------------------------------------------------------------
@pytest.mark.docker
def test_state_folder_is_the_servers_alone(walled: Running, jobs_dir: Path) -> None:
    secret = "hunter2-walls"
    alice = walled["alice"]
    job = walled.wait_job(alice.submit(good_job(
        jobs_dir, "alice", "env", "echo done > /outdir/out.txt",
        config={"env": {"API_KEY": secret}}))["id"])
    assert job["state"] == "succeeded", job
    state = walled.settings.state_path
    wait_for(lambda: (state / "jobs" / str(job["id"]) / "run.log").exists(), 30)
    wait_for(lambda: _sealed(state / "outputs" / "alice" / str(job["id"])), 30)
    passable = {state, state / "outputs", state / "outputs" / "alice",
                state / "outputs" / "bob", state / "inbox", state / "local"}
    for path in [state, *state.rglob("*")]:
        st = path.lstat()
        others = stat.S_IMODE(st.st_mode) & 0o007
        if path == state / "local" / "upload.sock":  # anyone connects; the upload id is the key
            assert stat.S_ISSOCK(st.st_mode) and st.st_uid == os.geteuid(), path
        elif path in passable:
            assert others == 0o001, (path, oct(st.st_mode))  # pass through, no listing
        elif path.is_relative_to(state / "outputs" / "alice" / str(job["id"])):
            assert st.st_uid == UA and (path.parent != state / "outputs" / "alice"
                                        or stat.S_IMODE(st.st_mode) == 0o700), path
        else:
            assert others == 0, (path, oct(st.st_mode))
    db = walled.settings.db_path
    for suffix in ("", "-wal", "-shm"):
        p = Path(str(db) + suffix)
        if p.exists():
            assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    for log in ("build.log", "run.log"):
        p = state / "jobs" / str(job["id"]) / log
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    inbox_alice = state / "inbox" / "alice"
    wait_for(inbox_alice.exists, 15)
    st = inbox_alice.stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (UA, 0o700)
    # another Unix user reads nothing: not the database, not a log, not the secret
    for target in (db, state / "jobs" / str(job["id"]) / "run.log", inbox_alice):
        got = as_user(UB, "cat", str(target))
        assert got.returncode != 0 and secret not in got.stdout
    got = as_user(UB, "grep", "-r", secret, str(state))
    assert secret not in got.stdout


# -- 7. the drop folder ---------------------------------------------------------------------------
@pytest.fixture
def watcher(base: Path) -> Iterator[tuple[inbox_mod.InboxWatcher, Any]]:
    cfg = make_config(base, users={"uid_map": {"alice": UA, "bob": UB}})
    s = settings_mod.from_dict(cfg)
    hostfs.secure_state(s)
    store = Store(s.db_path)
    try:
        yield inbox_mod.InboxWatcher(s, store), s
    finally:
        store.close()


def _bobs_zip(base: Path, jobs_dir: Path) -> Path:
    """Bob's private archive: the thing an attacker wants built as their own job."""
    z = zip_it(good_job(jobs_dir, "bob", "bobs-work", "echo bob's code"))
    os.chown(z, UB, UB)
    z.chmod(0o600)
    return z


def _refusals(store: Store) -> list[str]:
    return [r["error"] for r in store.read("SELECT error FROM jobs WHERE state = 'failed'")]


def _incoming(s: Any) -> list[Path]:
    return list((s.state_path / "incoming").iterdir())


def test_inbox_refuses_symlinks_fifos_and_hard_links(
    watcher: tuple[inbox_mod.InboxWatcher, Any], base: Path, tmp_path: Path
) -> None:
    w, s = watcher
    jobs_dir = tmp_path / "jobs"
    victim = _bobs_zip(base, jobs_dir)
    before = victim.stat()
    w.scan(time.time())  # makes inbox/alice, alice's, 0700
    inbox = s.inbox_path / "alice"
    assert (inbox.stat().st_uid, stat.S_IMODE(inbox.stat().st_mode)) == (UA, 0o700)
    assert stat.S_IMODE(s.inbox_path.stat().st_mode) == 0o711
    (inbox / "link.zip").symlink_to(victim)
    os.mkfifo(inbox / "pipe.zip")
    os.link(victim, inbox / "twin.zip")
    (inbox / "folder.zip").mkdir()
    started = time.monotonic()
    assert w.scan(time.time()) == []
    assert time.monotonic() - started < 2  # the FIFO blocked nothing
    reasons = " | ".join(_refusals(w.store))
    assert "link.zip is a symbolic link" in reasons
    assert "pipe.zip is a FIFO" in reasons
    assert "twin.zip has 2 hard links" in reasons
    assert sorted(p.name for p in inbox.iterdir()) == ["folder.zip"]  # a folder is left alone
    assert not w.store.read("SELECT id FROM jobs WHERE source IS NOT NULL")
    assert not _incoming(s)
    after = victim.stat()
    assert (after.st_uid, after.st_mode, after.st_nlink) == (before.st_uid, before.st_mode, 1)


def test_inbox_symlink_swapped_in_after_the_scan_gains_nothing(
    watcher: tuple[inbox_mod.InboxWatcher, Any], base: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    w, s = watcher
    jobs_dir = tmp_path / "jobs"
    victim = _bobs_zip(base, jobs_dir)
    w.scan(time.time())
    inbox = s.inbox_path / "alice"
    decoy = inbox / "mine.zip"
    shutil.copy(zip_it(good_job(jobs_dir, "alice", "decoy")), decoy)
    os.chown(decoy, UA, UA)
    real_check = inbox_mod._complete_zip

    def swap_after_check(path: Path) -> bool:
        ok = real_check(path)  # the scan saw alice's own complete zip ...
        path.unlink()
        path.symlink_to(victim)  # ... and now the name points at bob's
        return ok

    monkeypatch.setattr(inbox_mod, "_complete_zip", swap_after_check)
    assert w.scan(time.time()) == []
    assert any("mine.zip is a symbolic link" in r for r in _refusals(w.store))
    assert not _incoming(s) and victim.read_bytes()[:2] == b"PK"
    assert victim.stat().st_uid == UB
    # the take step by itself, with the symlink already in place
    (inbox / "again.zip").symlink_to(victim)
    assert w._take(inbox / "again.zip", "alice") is None
    assert not _incoming(s) and not (inbox / "again.zip").exists()
    # and a regular file of bob's in alice's folder is judged by its own owner
    other = inbox / "bobs.zip"
    shutil.copy(victim, other)
    os.chown(other, UB, UB)
    assert w._take(other, "alice") is None
    assert any(f"file owner uid {UB}" in r for r in _refusals(w.store))


def test_inbox_takes_alices_own_archive(
    watcher: tuple[inbox_mod.InboxWatcher, Any], tmp_path: Path
) -> None:
    w, s = watcher
    w.scan(time.time())
    inbox = s.inbox_path / "alice"
    z = inbox / "good.zip"
    shutil.copy(zip_it(good_job(tmp_path / "jobs", "alice", "good")), z)
    os.chown(z, UA, UA)
    (new,) = w.scan(time.time())
    (row,) = w.store.read("SELECT user, source FROM jobs WHERE id = ?", (new,))
    assert row["user"] == "alice" and Path(row["source"]).read_bytes()[:2] == b"PK"
    assert stat.S_IMODE((s.state_path / "incoming").stat().st_mode) == 0o700


# -- the mount itself ----------------------------------------------------------------------------
def test_outputs_mount_is_idempotent_adopted_and_undone(
    base: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    s = settings_mod.from_dict(make_config(base))
    hostfs.secure_state(s)
    root = s.state_path / "outputs"
    first = hostfs.OutputMount(s)
    try:
        assert first.mount() and first.mount()  # twice: one mount
        assert len(hostfs._mounts_at(root)) == 1
        assert {"nosuid", "nodev"} <= hostfs._mounts_at(root)[-1][1]
        again = hostfs.OutputMount(s)  # a server started after a kill -9 adopts it
        assert again.mount() and again.ours == first.ours
        again.unmount()
        assert not hostfs._mounts_at(root)
        # where mounting is impossible, the server says so and goes on (sealing still works)
        monkeypatch.setattr(hostfs, "_mount", lambda *a: (_ for _ in ()).throw(
            PermissionError(1, "Operation not permitted")))
        assert not hostfs.OutputMount(s).mount()
        assert "falling back" in caplog.text and not hostfs._mounts_at(root)
    finally:
        hostfs.OutputMount(s).unmount(force=True)


def test_seal_never_follows_a_link_or_keeps_a_foreign_hard_link(base: Path) -> None:
    s = settings_mod.from_dict(make_config(base, users={"uid_map": {"alice": UA}}))
    hostfs.secure_state(s)
    folders = outputs.OutputFolders(s)
    victim = _victim(base)
    host_dir = base / "host-dir"
    host_dir.mkdir()
    host_dir.chmod(0o755)
    (host_dir / "f").write_text("host")
    out = folders.prepare("alice", 7)
    os.link(victim, out / "foreign")  # as a job on an unprotected host could
    (out / "a").write_text("x")
    os.link(out / "a", out / "b")  # both links inside: kept
    (out / "dir-link").symlink_to(host_dir)
    (out / "file-link").symlink_to(victim)
    os.mkfifo(out / "fifo")
    os.chmod(out / "a", 0o6755)
    report = folders.seal("alice", 7)
    assert report is not None
    assert not (out / "foreign").exists() and victim.stat().st_nlink == 1
    assert victim.stat().st_uid == 0 and stat.S_IMODE(victim.stat().st_mode) == 0o600
    assert host_dir.stat().st_uid == 0 and (host_dir / "f").stat().st_uid == 0
    assert stat.S_IMODE(host_dir.stat().st_mode) == 0o755
    assert (out / "a").stat().st_uid == UA and not (out / "a").stat().st_mode & 0o6000
    assert (out / "dir-link").lstat().st_uid == UA and not (out / "fifo").exists()
    # a job folder swapped for a symlink (only root could: outputs/alice is root's) is not sealed
    shutil.rmtree(out)
    out.symlink_to(host_dir)
    assert folders.seal("alice", 7) is None
    assert host_dir.stat().st_uid == 0 and (host_dir / "f").stat().st_uid == 0
    assert stat.S_IMODE(s.state_path.joinpath("outputs", "alice").stat().st_mode) == 0o711
