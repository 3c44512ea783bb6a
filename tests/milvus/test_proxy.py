"""`walden proxy` in a cluster (etcd, a coordinator, 2 streaming nodes, 2 proxies), driven by
pymilvus only: the same flows through either proxy, and a proxy killed (-9) during inserts."""

import os
import signal
import threading
import time

import numpy as np
import pytest
from pymilvus import DataType, MilvusClient

from cluster import Cluster

DIM = 16


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(nodes=2, proxies=2, pchannels=4)
    try:
        yield c
    except BaseException:
        print(c.logs())
        raise
    finally:
        c.stop()


def schema():
    s = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=True)
    s.add_field("id", DataType.INT64, is_primary=True)
    s.add_field("v", DataType.FLOAT_VECTOR, dim=DIM)
    return s


def batch(ids):
    return [
        {"id": int(i), "v": np.random.default_rng(int(i)).random(DIM, dtype=np.float32).tolist(), "tag": f"t{i % 7}"}
        for i in ids
    ]


def test_what_one_proxy_writes_the_other_reads_strongly(cluster):
    a, b = MilvusClient(cluster.uri(0)), MilvusClient(cluster.uri(1))
    a.create_collection("through_proxies", schema=schema(), num_shards=2)
    try:
        assert b.has_collection("through_proxies")
        assert b.describe_collection("through_proxies")["num_shards"] == 2
        res = a.insert("through_proxies", batch(range(200)))
        assert res["insert_count"] == 200
        got = b.query("through_proxies", filter="id < 5", output_fields=["id", "tag"], consistency_level="Strong")
        assert sorted((r["id"], r["tag"]) for r in got) == [(i, f"t{i}") for i in range(5)]
        hits = b.search("through_proxies", data=[batch([42])[0]["v"]], limit=3, consistency_level="Strong")
        assert hits[0][0]["id"] == 42 and hits[0][0]["distance"] < 1e-4
        b.delete("through_proxies", ids=[42])
        # A read through the other proxy right after, and again after a pause.
        for _ in range(2):
            assert a.get("through_proxies", ids=[42]) == [] or a.query(
                "through_proxies", filter="id == 42", consistency_level="Strong") == []
            assert a.query("through_proxies", filter="", output_fields=["count(*)"],
                           consistency_level="Strong")[0]["count(*)"] == 199
            time.sleep(1.5)
        b.create_alias("through_proxies", "tp")
        assert a.describe_alias("tp")["collection_name"] == "through_proxies"
        a.drop_alias("tp")
    finally:
        a.drop_collection("through_proxies")
    assert not b.has_collection("through_proxies")


def test_a_proxy_killed_during_inserts_loses_nothing_acknowledged(cluster):
    setup = MilvusClient(cluster.uri(1))
    setup.create_collection("proxy_kill", schema=schema(), num_shards=2)
    acked: list[int] = []
    failed: list[tuple[range, Exception]] = []
    state = {"in_flight": None, "stop": False}
    inspected = threading.Event()
    durations: list[float] = []
    per_batch = 2000

    def write():
        # A client of proxy 0 until a call fails, then of proxy 1: what a user would do.
        client = MilvusClient(cluster.uri(0))
        start = 0
        while not state["stop"] and start < 200 * per_batch:
            ids = range(start, start + per_batch)
            state["in_flight"], state["since"] = ids, time.monotonic()
            try:
                client.upsert("proxy_kill", batch(ids)) if failed else client.insert("proxy_kill", batch(ids))
                acked.extend(ids)
                durations.append(time.monotonic() - state["since"])
                start += per_batch
            except Exception as e:  # the proxy died under this call
                failed.append((ids, e))
                client = MilvusClient(cluster.uri(1))
                inspected.wait(timeout=60)
                # The batch is in doubt: upserted again through the other proxy, so it is
                # there exactly once whether or not the first send landed.
            finally:
                state["in_flight"] = None

    t = threading.Thread(target=write)
    t.start()
    try:
        while len(acked) < 5 * per_batch:
            assert t.is_alive(), failed
            time.sleep(0.01)
        # Freeze proxy 0 (SIGSTOP) during an insert, late in the call (its rows reach the log
        # at its end, after pymilvus has encoded and sent them), and make sure the call is
        # stuck on it; then kill it (-9). A call that slipped through before the freeze is
        # let go, and the next one is tried.
        typical = sorted(durations)[len(durations) // 2]
        proxy = cluster.proxies[0].proc
        for attempt in range(20):
            while state["in_flight"] is None:
                time.sleep(0.001)
            cut, since = state["in_flight"], state["since"]
            time.sleep(max(0.0, since + (0.95 - attempt % 5 * 0.1) * typical - time.monotonic()))
            os.kill(proxy.pid, signal.SIGSTOP)
            time.sleep(0.3)
            if state["in_flight"] == cut and state["since"] == since:
                break
            os.kill(proxy.pid, signal.SIGCONT)
        else:
            pytest.fail("no insert was caught in flight in 20 tries")
        cluster.proxies[0].kill()
        # How much of the batch cut by the kill reached the log (the writer waits): none, part
        # (one shard's message) or all of it. Either way it must end up there exactly once.
        probe = MilvusClient(cluster.uri(1))
        landed = probe.query("proxy_kill", filter=f"id >= {cut.start} and id < {cut.stop}",
                             output_fields=["count(*)"], consistency_level="Strong")[0]["count(*)"]
        print(f"the kill cut a batch of {len(cut)} rows; {landed} of them had reached the log")
        inspected.set()
        # The writer moved to proxy 1 and goes on; let it write a few more batches.
        target = len(acked) + 5 * per_batch
        while len(acked) < target:
            assert t.is_alive()
            time.sleep(0.01)
    finally:
        state["stop"] = True
        t.join(timeout=120)
    # The fault landed: the call in flight at the kill failed.
    assert failed and failed[0][0] == cut, (cut, failed)
    assert len(failed) == 1, failed
    # Nothing acknowledged is lost, and nothing is there twice, read through the survivor.
    check = MilvusClient(cluster.uri(1))
    count = check.query("proxy_kill", filter="", output_fields=["count(*)"], consistency_level="Strong")[0]["count(*)"]
    assert count == len(acked) == len(set(acked)), (count, len(acked))
    lo, hi = min(acked), max(acked)
    got = check.query("proxy_kill", filter=f"id >= {hi - 99}", output_fields=["id"], consistency_level="Strong")
    assert sorted(r["id"] for r in got) == list(range(hi - 99, hi + 1))
    assert set(acked) == set(range(lo, hi + 1))
    setup.drop_collection("proxy_kill")


def test_a_proxy_follows_a_new_coordinator_leader_after_the_old_is_killed():
    """DDL goes to the leading coordinator; a proxy finds the new one when the old dies."""
    c = Cluster(nodes=1, proxies=1, pchannels=2)
    try:
        standby = c.add_coordinator()
        client = MilvusClient(c.uri(0))
        client.create_collection("before_failover", schema=schema())
        client.insert("before_failover", batch(range(10)))
        c.coord.kill()  # the leader (the first coordinator took the leadership)
        # The standby takes over once the dead leader's lease (2 s) runs out; DDL through the
        # same proxy, with no client change, must then reach it. A call already under way
        # stays on the proxy's old connection (it fails once the client's retries run out),
        # so each try is cut after 5 s and the next goes through the connection to the new
        # leader.
        deadline, attempts, last = time.monotonic() + 30, 0, None
        while time.monotonic() < deadline:
            attempts += 1
            try:
                client.create_collection("after_failover", schema=schema(), timeout=5)
                break
            except Exception as e:  # noqa: BLE001 - the leader is missing until the takeover
                last = e
                time.sleep(0.5)
        else:
            pytest.fail(f"no DDL reached the new leader in 30 s ({attempts} tries): {last}")
        # The fault landed: the first DDL after the kill failed (no leader was there yet).
        assert attempts > 1, "the kill changed nothing: was the killed coordinator the leader?"
        assert c.coord.proc.poll() is not None and standby.proc.poll() is None
        client.insert("after_failover", batch(range(5)))
        got = client.query("after_failover", filter="", output_fields=["count(*)"],
                           consistency_level="Strong")[0]["count(*)"]
        assert got == 5
        got = client.query("before_failover", filter="", output_fields=["count(*)"],
                           consistency_level="Strong")[0]["count(*)"]
        assert got == 10, "what was written before the failover is read after it"
        assert sorted(client.list_collections()) == ["after_failover", "before_failover"]
    except BaseException:
        print(c.logs())
        raise
    finally:
        c.stop()
