"""Leases through a real `mlflow server` (issue 21): one holder at a time whatever the store's write
latency, a dead holder's claim lapses, a removed claim is noticed. Marked slow (a server starts)."""

import json
import subprocess
import sys
import textwrap
import time

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from detection import tracking
from tests.conftest import ROOT, tracking_server

pytestmark = pytest.mark.slow

# A contender: claims the lease, records when it held it, and holds it for a moment. With `slow`,
# every version write of its client lands 1.5 s late: the latency that let two holders in before.
CONTENDER = textwrap.dedent(
    """
    import json, sys, time
    import mlflow
    from mlflow.tracking import MlflowClient
    from detection import tracking

    uri, log, name, slow = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "slow"
    mlflow.set_tracking_uri(uri)
    if slow:
        create = MlflowClient.create_model_version
        def late(self, *args, **kwargs):
            version = create(self, *args, **kwargs)
            time.sleep(1.5)
            return version
        MlflowClient.create_model_version = late
    with tracking.Lease("promotion:race", ttl=30, poll=0.2).acquire(wait=300):
        with open(log, "a") as f:
            f.write(json.dumps({"who": name, "in": time.time()}) + "\\n")
        time.sleep(0.5)
        with open(log, "a") as f:
            f.write(json.dumps({"who": name, "out": time.time()}) + "\\n")
    """
)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with tracking_server(tmp_path_factory.mktemp("leases")) as s:
        yield s.uri


def test_one_holder_at_a_time_even_when_one_contenders_writes_land_late(server, tmp_path):
    log = tmp_path / "held.jsonl"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CONTENDER, server, str(log), f"c{k}", "slow" if k % 2 else "fast"], cwd=ROOT
        )
        for k in range(4)
    ]
    assert [p.wait(timeout=600) for p in procs] == [0, 0, 0, 0]
    events = [json.loads(line) for line in log.read_text().splitlines()]
    spans = {}
    for e in events:
        spans.setdefault(e["who"], {}).update(e)
    assert len(spans) == 4
    ordered = sorted(spans.values(), key=lambda s: s["in"])
    for a, b in zip(ordered, ordered[1:]):
        assert a["out"] <= b["in"], (a, b)  # the next one entered only after the last one left
    api = MlflowClient(tracking_uri=server)
    assert list(api.search_model_versions(f"name='{tracking.LEASES}'")) == []  # every claim withdrawn


def test_a_dead_holders_claim_lapses_and_a_removed_claim_is_noticed(server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
    mlflow.set_tracking_uri(server)
    now = [1000.0]
    clock = lambda: now[0]  # noqa: E731
    dead = tracking.Lease("run:abc", ttl=30, clock=clock).acquire()
    dead._stop.set()  # its process died: no more heartbeats
    with pytest.raises(tracking.LeaseHeld, match="run:abc is held by .* lapses within 30 s"):
        tracking.Lease("run:abc", ttl=30, clock=clock, poll=0.1).acquire(wait=0)
    now[0] += 31  # the dead holder's claim lapsed
    taker = tracking.Lease("run:abc", ttl=0.4, clock=clock).acquire(wait=5)
    assert not taker.lost.is_set()
    MlflowClient(tracking_uri=server).delete_model_version(tracking.LEASES, taker._version)  # taken away
    deadline = time.monotonic() + 30
    while not taker.lost.is_set():
        assert time.monotonic() < deadline, "the heartbeat never noticed"
        time.sleep(0.1)
    taker.release()


def test_a_claim_whose_process_on_this_machine_is_gone_is_taken_at_once(server, tmp_path, monkeypatch):
    """Issue 21: a training that lost its server exited 24 s after it died, without withdrawing its
    claim; its resume, once the server was back, was refused for up to a minute ('lapses within 17 s')."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
    mlflow.set_tracking_uri(server)
    holder = textwrap.dedent(
        """
        import os, sys, mlflow
        from detection import tracking
        mlflow.set_tracking_uri(sys.argv[1])
        tracking.Lease("run:gone", ttl=600).acquire()
        os._exit(1)  # dies holding it, as a process whose server went away
        """
    )
    assert subprocess.run([sys.executable, "-c", holder, server], cwd=ROOT, timeout=300).returncode == 1
    taker = tracking.Lease("run:gone", ttl=600).acquire(wait=0)  # not "lapses within 600 s"
    taker.release()
    elsewhere = tracking.Lease("run:elsewhere", ttl=600).acquire()
    elsewhere._stop.set()
    api = MlflowClient(tracking_uri=server)
    api.set_model_version_tag(tracking.LEASES, elsewhere._version, "lease.owner", "another-host:1:abcd")
    with pytest.raises(tracking.LeaseHeld, match="held by another-host:1:abcd"):  # another machine's waits
        tracking.Lease("run:elsewhere", ttl=600).acquire(wait=0)
    api.delete_model_version(tracking.LEASES, elsewhere._version)
