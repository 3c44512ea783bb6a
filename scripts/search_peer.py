#!/usr/bin/env python3
"""A peer for `walden bench search` and `walden bench milvus`: runs the same workload on Milvus
Lite or LanceDB, or through pymilvus on Walden's Milvus API (`--peer walden --uri URI`).

    search_peer.py --peer milvus-lite|lancedb|walden --data DATA.npy --queries Q.npy \
        --truth T.npy --dir SCRATCH [--k 10] [--batch 1000] [--concurrency 2] [--seconds 10] \
        [--uri http://HOST:PORT] [--server-pid PID]

With `--server-pid`, each phase also reports the server's CPU per operation (from /proc).

DATA.npy holds the rows' vectors (float32, N x dim; row i has id i), Q.npy the query vectors,
T.npy the exact top-k ids of each query (int64, computed by the bench). Prints one JSON object:
insert rows/s, search latency right after the insert (growing data) and after indexing, and
QPS at the first setting whose recall@k reaches 0.95 (each setting's recall is reported).
Needs `pip install pymilvus milvus-lite` or `pip install lancedb` (scripts/install-bench-peers.sh).
"""

import argparse
import json
import os
import sys
import threading
import time

import numpy as np


def percentiles(lat):
    a = np.sort(np.array(lat)) * 1000.0
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99))}


def recall(found, truth, k):
    hits = sum(len(set(f[:k]) & set(t[:k].tolist())) for f, t in zip(found, truth))
    return hits / float(k * len(truth))


def timed_searches(search, queries):
    """Searches one query at a time; returns the ids found and each latency."""
    found, lat = [], []
    for q in queries:
        t = time.perf_counter()
        found.append(search(q))
        lat.append(time.perf_counter() - t)
    return found, lat


def qps(search, queries, concurrency, seconds):
    """Queries per second with `concurrency` threads for `seconds`."""
    done = [0] * concurrency
    stop = time.perf_counter() + seconds

    def worker(w):
        i = w
        while time.perf_counter() < stop:
            search(queries[i % len(queries)])
            i += concurrency
            done[w] += 1

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(done) / (time.perf_counter() - start)


def sweep(make_search, settings, queries, truth, k, concurrency, seconds):
    """The first setting reaching recall 0.95 (or the last one), with its QPS and latency."""
    tried = []
    for s in settings:
        search = make_search(s)
        found, lat = timed_searches(search, queries)
        r = recall(found, truth, k)
        tried.append({"setting": s, "recall": r})
        if r >= 0.95 or s is settings[-1]:
            out = {"setting": s, "recall": r, "qps": qps(search, queries, concurrency, seconds)}
            out.update(percentiles(lat))
            out["tried"] = tried
            return out
    raise AssertionError("no settings")


def cpu_seconds(pid):
    """User + system CPU seconds of process `pid` (0 when not given)."""
    if not pid:
        return 0.0
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def milvus_lite(a, data, queries, truth):
    from pymilvus import MilvusClient

    return milvus_api(a, MilvusClient(os.path.join(a.dir, "milvus.db")), data, queries, truth,
                      "milvus-lite", "HNSW requested (Milvus Lite searches FLAT)")


def walden(a, data, queries, truth):
    from pymilvus import MilvusClient

    client = MilvusClient(a.uri)
    out = milvus_api(a, client, data, queries, truth, "pymilvus", "HNSW")
    out["insert_client_alone_rows_per_s"] = client_alone(client, data, a.batch)
    return out


def client_alone(client, data, batch):
    """Rows/s one pymilvus client makes of the same inserts with no server: its Insert call
    answered at once in process (the rows built, checked and encoded, nothing sent). The most
    any server can be given by one such client on this machine."""
    from pymilvus.grpc_gen import common_pb2, milvus_pb2, schema_pb2

    conn = client._get_connection()
    real = conn._stub

    class Answered:
        def __getattr__(self, name):
            return getattr(real, name)

        def Insert(self, request=None, timeout=None, metadata=None, **kw):  # noqa: N802
            ids = list(request.fields_data[0].scalars.long_data.data)
            return milvus_pb2.MutationResult(status=common_pb2.Status(), insert_cnt=request.num_rows,
                                             IDs=schema_pb2.IDs(int_id=schema_pb2.LongArray(data=ids)))

    conn._stub = Answered()
    try:
        start = time.perf_counter()
        for lo in range(0, len(data), batch):
            rows = [{"id": int(i), "emb": data[i].tolist()} for i in range(lo, min(lo + batch, len(data)))]
            client.insert("bench", rows)
        return len(data) / (time.perf_counter() - start)
    finally:
        conn._stub = real


def milvus_api(a, client, data, queries, truth, package, index_note):
    """The workload through pymilvus's MilvusClient; reads are Strong (fresh rows included)."""
    import importlib.metadata as md

    cpu = {}
    dim = data.shape[1]
    client.create_collection("bench", dimension=dim, metric_type="L2", auto_id=False,
                             primary_field_name="id", vector_field_name="emb")
    start, c0 = time.perf_counter(), cpu_seconds(a.server_pid)
    for lo in range(0, len(data), a.batch):
        rows = [{"id": int(i), "emb": data[i].tolist()} for i in range(lo, min(lo + a.batch, len(data)))]
        client.insert("bench", rows)
    insert_s = time.perf_counter() - start
    cpu["insert_us_per_row"] = (cpu_seconds(a.server_pid) - c0) * 1e6 / len(data)

    def search(q, params=None):
        r = client.search("bench", data=[q.tolist()], limit=a.k, search_params=params or {},
                          consistency_level="Strong")
        return [h["id"] for h in r[0]]

    c0 = cpu_seconds(a.server_pid)
    found, lat = timed_searches(search, queries)
    cpu["growing_us_per_search"] = (cpu_seconds(a.server_pid) - c0) * 1e6 / len(queries)
    growing = percentiles(lat)
    growing["recall"] = recall(found, truth, a.k)
    # Milvus Lite builds FLAT whatever index is asked for; ask for HNSW anyway. Flushing first
    # seals the growing rows, so the load searches sealed segments.
    start = time.perf_counter()
    client.flush("bench")
    client.release_collection("bench")
    client.drop_index("bench", "emb")
    params = client.prepare_index_params()
    params.add_index(field_name="emb", index_type="HNSW", metric_type="L2",
                     params={"M": 16, "efConstruction": 128})
    client.create_index("bench", params)
    client.load_collection("bench")
    build_s = time.perf_counter() - start
    indexed = sweep(lambda ef: (lambda q: search(q, {"params": {"ef": ef}})), [32, 64, 128, 256, 512],
                    queries, truth, a.k, a.concurrency, a.seconds)
    ef = indexed["setting"]
    c0 = cpu_seconds(a.server_pid)
    timed_searches(lambda q: search(q, {"params": {"ef": ef}}), queries)
    cpu["indexed_us_per_search"] = (cpu_seconds(a.server_pid) - c0) * 1e6 / len(queries)
    out = {"version": md.version(package), "insert_s": insert_s, "growing": growing,
           "index": index_note, "index_build_s": build_s, "indexed": indexed}
    if a.server_pid:
        out["server_cpu"] = cpu
    return out


def lancedb_peer(a, data, queries, truth):
    import lancedb
    import pyarrow as pa
    import importlib.metadata as md

    db = lancedb.connect(os.path.join(a.dir, "lancedb"))
    dim = data.shape[1]
    table = None
    start = time.perf_counter()
    for lo in range(0, len(data), a.batch):
        hi = min(lo + a.batch, len(data))
        emb = pa.FixedSizeListArray.from_arrays(pa.array(data[lo:hi].reshape(-1)), dim)
        batch = pa.table({"id": pa.array(np.arange(lo, hi, dtype=np.int64)), "vector": emb})
        if table is None:
            table = db.create_table("bench", batch)
        else:
            table.add(batch)
    insert_s = time.perf_counter() - start

    def search(q, nprobes=None, refine=None):
        s = table.search(q).metric("l2").limit(a.k).select(["id"])
        if nprobes:
            s = s.nprobes(nprobes)
        if refine:
            s = s.refine_factor(refine)
        return s.to_arrow()["id"].to_pylist()

    found, lat = timed_searches(search, queries)
    growing = percentiles(lat)
    growing["recall"] = recall(found, truth, a.k)
    start = time.perf_counter()
    table.create_index(metric="l2", index_type="IVF_HNSW_SQ", vector_column_name="vector",
                       num_partitions=max(1, len(data) // 4096))
    build_s = time.perf_counter() - start
    indexed = sweep(lambda s: (lambda q: search(q, s[0], s[1])), [(4, None), (8, None), (16, 4), (32, 10)],
                    queries, truth, a.k, a.concurrency, a.seconds)
    return {"version": md.version("lancedb"), "insert_s": insert_s, "growing": growing,
            "index": "IVF_HNSW_SQ", "index_build_s": build_s, "indexed": indexed}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--peer", required=True, choices=["milvus-lite", "lancedb", "walden"])
    p.add_argument("--uri", help="walden: the Milvus API's address, http://HOST:PORT")
    p.add_argument("--server-pid", type=int, default=0, help="report this process's CPU per operation")
    p.add_argument("--data", required=True)
    p.add_argument("--queries", required=True)
    p.add_argument("--truth", required=True)
    p.add_argument("--dir", required=True)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--seconds", type=float, default=10.0)
    a = p.parse_args()
    data = np.load(a.data).astype(np.float32)
    queries = np.load(a.queries).astype(np.float32)
    truth = np.load(a.truth)
    run = {"milvus-lite": milvus_lite, "lancedb": lancedb_peer, "walden": walden}[a.peer]
    out = run(a, data, queries, truth)
    out["peer"] = a.peer
    out["insert_rows_per_s"] = len(data) / out["insert_s"]
    json.dump(out, sys.stdout)
    print()


if __name__ == "__main__":
    main()
