"""Encode once, send many: the delta snapshot's shared part is encoded once per version.

Against a real server: pollers that hold the same version share the same
bytes (encodes counted), deltas are shared, the client still sees the plain
dicts, and one user's private fields never reach another through the cache.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from conftest import Running, wait_for
from hostile import good_job

from dopq.client.remote import SnapshotFollower
from dopq.server.viewcache import EncodedReplies
from dopq.wire.protocol import ENCODED, decode_reply, encode_reply

SECRET = "s3cr3t-token-of-alice"


def test_replies_are_encoded_once_and_the_lru_is_bounded() -> None:
    cache = EncodedReplies(keep=2)
    made: list[int] = []

    def make(n: int) -> Any:
        made.append(n)
        return {"n": n, "rows": [{"id": n}]}

    blobs = {cache.get(("shared", 0, 1, 200), lambda: make(1)) for _ in range(10)}
    assert len(blobs) == 1 and made == [1] and cache.encodes == 1
    cache.get(("shared", 1, 2, 200), lambda: make(2))
    cache.get(("shared", 2, 3, 200), lambda: make(3))  # the first falls out
    cache.get(("shared", 0, 1, 200), lambda: make(1))
    assert made == [1, 2, 3, 1] and cache.encodes == 4
    assert decode_reply(encode_reply({"a": [1, None, "x"], "b": b"\x00"})) == \
        {"a": [1, None, "x"], "b": b"\x00"}


def _queue_job(run: Running, tmp_path: Path) -> int:
    """Alice queues a job, with a secret in its environment, and holds it (it waits)."""
    folder = good_job(tmp_path / "jobs", "alice", "private", "true",
                      config={"run_params": {"environment": {"TOKEN": SECRET}}})
    jid = int(run["alice"].submit(folder)["id"])
    run["alice"].call("edit", [jid], "hold")
    return jid


def test_one_encode_for_many_polls_and_the_client_sees_plain_dicts(
        server: Running, tmp_path: Path) -> None:
    jid = _queue_job(server, tmp_path)
    views = server.server.platform.views
    followers = [SnapshotFollower(server[u], 200) for u in ("root", "alice", "bob")]
    first = [f.update() for f in followers]
    assert all(jid in {q["id"] for q in s["queued"]} for s in first)
    assert all(s["whoami"]["user"] == u for s, u in zip(first, ("root", "alice", "bob"),
                                                        strict=True))
    plain = server["root"].call("snapshot", 200)
    assert set(first[0]) == set(plain)  # the follower's shape is the plain snapshot's

    def quiet_round() -> bool:
        """Twenty polls of every follower on one unchanged version: how many encodes."""
        version = views.view(None).number
        before = views.encoded.encodes
        for _ in range(20):
            for f in followers:
                f.update()
        return views.view(None).number == version and views.encoded.encodes - before <= 1

    # Every follower holds the same version: one encode (the shared no-change
    # delta) serves all 60 polls, or none when it was already kept.
    wait_for(quiet_round, timeout=20, interval=0.1)
    # The server sends bytes; the caller never sees them.
    raw = server["bob"].call("snapshot", 200, followers[2].version)
    assert isinstance(raw[ENCODED], bytes) and "now" in raw and raw["whoami"]["user"] == "bob"
    assert all(ENCODED not in f.update() for f in followers)


def test_cached_bytes_never_carry_one_users_private_fields_to_another(
        server: Running, tmp_path: Path) -> None:
    jid = _queue_job(server, tmp_path)
    # Alice's own view of her job shows the secret (once built): it exists to leak.
    wait_for(lambda: SECRET in repr(server["alice"].call("job", jid)["spec"]), timeout=60)
    alice = SnapshotFollower(server["alice"], 200)
    alice.update()
    alice.update()  # alice's polls fill the cache first
    bob = server["bob"]
    raw = bob.call("snapshot", 200, alice.version)  # bob asks for the bytes alice got
    assert SECRET.encode() not in raw[ENCODED]
    assert SECRET not in repr(decode_reply(raw[ENCODED]))
    assert SECRET.encode() not in bob.call("snapshot", 200, 0)[ENCODED]
    assert bob.call("job", jid)["spec"] is None  # and bob still cannot read it directly
