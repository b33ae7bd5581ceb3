"""The refresh lease on local disk and on a real S3-protocol server (moto's standalone server)."""

import json
import multiprocessing as mp
import os
import time

import pytest

from selector.errors import ThresherError
from selector.data.lease import Lease, LeaseHeldError, LeaseLostError, list_leases

CONFIRM = 0.3  # object-store read-back delay: short for tests, well above moto's write latency


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    """``(root, storage_options)`` on local disk or in a fresh S3 bucket."""
    if request.param == "local":
        return str(tmp_path / "work"), None
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket['bucket']}/thresher", bucket["storage_options"]


def lease(store, holder, ttl=60.0, **kw):
    root, so = store
    return Lease(root, "c4-nightly", holder_id=holder, ttl_s=ttl, storage_options=so, confirm_delay_s=CONFIRM, **kw)


def test_second_acquire_refuses_naming_holder(store):
    first = lease(store, "refresh-a").acquire()
    record = first.read()
    assert record["holder"] == "refresh-a" and record["pid"] == os.getpid() and record["ttl"] == 60.0
    assert set(record) >= {"holder", "host", "pid", "acquired_at", "heartbeat_at", "ttl"}
    with pytest.raises(LeaseHeldError) as info:
        lease(store, "refresh-b").acquire()
    msg = str(info.value)
    assert "held by refresh-a" in msg and f"pid {os.getpid()}" in msg and " since " in msg
    assert "another refresh of this corpus is running" in msg
    assert isinstance(info.value, ThresherError)
    assert first.read()["holder"] == "refresh-a", "the refused acquire left the lease alone"
    first.release()
    assert first.read() is None
    second = lease(store, "refresh-b").acquire()  # free again
    assert second.read()["holder"] == "refresh-b"
    second.release()


def test_stale_lease_is_taken_over_and_logged(store):
    dead = lease(store, "refresh-dead", ttl=2.5).acquire()  # never heartbeats again: as if it died
    messages = []
    with pytest.raises(LeaseHeldError):
        lease(store, "refresh-new", log_fn=messages.append).acquire()
    time.sleep(max(0.0, dead.read()["heartbeat_at"] + 2.6 - time.time()))
    new = lease(store, "refresh-new", log_fn=messages.append).acquire()
    assert new.read()["holder"] == "refresh-new"
    assert any("taking over a stale lease from refresh-dead" in m for m in messages), messages
    # the old holder learns it lost the lease at its next heartbeat and cannot release it
    with pytest.raises(LeaseLostError, match="taken over by refresh-new"):
        dead.heartbeat()
    with pytest.raises(LeaseHeldError, match="only its holder may release it"):
        dead.release()
    assert new.read()["holder"] == "refresh-new"
    new.release()


def test_same_holder_id_takes_its_own_lease_back(store):
    """A retried job that names itself the same way need not wait for its old lease's ttl."""
    old = lease(store, "refresh-job-42").acquire()
    messages = []
    retry = lease(store, "refresh-job-42", log_fn=messages.append).acquire()
    assert any("re-acquires its own lease" in m for m in messages), messages
    with pytest.raises(LeaseLostError):
        old.heartbeat()  # the earlier attempt, if somehow alive, learns it must stop
    retry.release()


def test_release_by_non_holder_is_refused(store):
    holder = lease(store, "refresh-a").acquire()
    other = lease(store, "refresh-b")
    with pytest.raises(LeaseHeldError, match="cannot release lease 'c4-nightly' as refresh-b: it is held by refresh-a"):
        other.release()
    assert holder.read()["holder"] == "refresh-a"
    holder.release()


def test_heartbeat_keeps_a_lease_fresh_and_context_manager_releases(store):
    root, so = store
    with Lease(root, "c4-nightly", holder_id="refresh-a", ttl_s=1.5, storage_options=so,
               confirm_delay_s=CONFIRM) as held:
        first_beat = held.read()["heartbeat_at"]
        time.sleep(1.8)  # longer than the ttl: only the heartbeat thread (every ttl/3) keeps it fresh
        record = held.read()
        assert record["heartbeat_at"] > first_beat and record["acquired_at"] < record["heartbeat_at"]
        with pytest.raises(LeaseHeldError, match="held by refresh-a"):
            lease(store, "refresh-b").acquire()
        held.check()
        assert [entry["name"] for entry in list_leases(root, so)] == ["c4-nightly"]
        assert list_leases(root, so)[0]["stale"] is False
    assert held.read() is None, "leaving the with-block released the lease"


def test_lease_of_a_dead_process_is_refused_until_stale(store):
    """A holder that dies without releasing: the lease stays until its ttl passes."""
    root, so = store
    proc = mp.get_context("fork").Process(target=_acquire_and_die, args=(root, so, 3.0))
    proc.start()
    proc.join(60)
    assert proc.exitcode == 0
    with pytest.raises(LeaseHeldError, match=rf"held by dying-holder \(host \S+, pid {proc.pid}\)"):
        lease(store, "refresh-b").acquire()
    deadline = time.time() + 10
    while True:
        try:
            taken = lease(store, "refresh-b").acquire()
            break
        except LeaseHeldError:
            assert time.time() < deadline, "a stale lease must be taken over"
            time.sleep(0.3)
    assert taken.read()["holder"] == "refresh-b"
    taken.release()


def test_racing_processes_exactly_one_wins(store):
    root, so = store
    # fork is cheap; fsspec drops its cached filesystems and event loop in a forked child
    ctx = mp.get_context("fork")
    start, results = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(root, so, f"racer-{i}", start, results)) for i in range(4)]
    for p in procs:
        p.start()
    time.sleep(0.5)
    start.set()
    outcomes = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(60)
    winners = [who for who, outcome in outcomes if outcome == "won"]
    losers = [outcome for _, outcome in outcomes if outcome != "won"]
    assert len(winners) == 1, outcomes
    assert all(o.startswith("held:") for o in losers), outcomes
    record = Lease(root, "c4-nightly", storage_options=so).read()
    assert record["holder"] == winners[0]


def test_bad_lease_file_and_name_give_clear_errors(tmp_path):
    with pytest.raises(ThresherError, match="lease name must be"):
        Lease(str(tmp_path), "../escape")
    path = tmp_path / "runs" / "_leases" / "x.json"
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    with pytest.raises(ThresherError, match="is not valid JSON"):
        Lease(str(tmp_path), "x").acquire()
    path.write_text(json.dumps({"holder": "h", "host": "n", "pid": 1, "acquired_at": 0, "heartbeat_at": 0,
                                "ttl": 1, "nonce": "n"}))
    assert Lease(str(tmp_path), "x", holder_id="me").acquire().read()["holder"] == "me"  # stale: taken over


# -- child processes --------------------


def _acquire_and_die(root, so, ttl):
    Lease(root, "c4-nightly", holder_id="dying-holder", ttl_s=ttl, storage_options=so,
          confirm_delay_s=CONFIRM).acquire()
    os._exit(0)  # no release, no cleanup: as if killed


def _race(root, so, holder, start, results):
    candidate = Lease(root, "c4-nightly", holder_id=holder, ttl_s=120, storage_options=so, confirm_delay_s=CONFIRM)
    start.wait(30)
    try:
        candidate.acquire()
        results.put((holder, "won"))
    except LeaseHeldError as exc:
        results.put((holder, f"held: {exc}"))
    # the winner exits without releasing: its lease (ttl 120 s) stays fresh for the assertions
