"""Writes and reads through pymilvus's MilvusClient, against a real `walden standalone`: the
quickstart of Milvus's docs, bad input refused with nothing written, consistency, and HNSW
recall against numpy's brute force."""

import random

import numpy as np
import pytest
from pymilvus import DataType, MilvusClient, MilvusException


def rows(n, dim=8, start=0, seed=7):
    rnd = random.Random(seed)
    return [
        {
            "id": i,
            "vector": [rnd.uniform(-1, 1) for _ in range(dim)],
            "text": f"doc {i}",
            "subject": "history" if i % 2 else "biology",
        }
        for i in range(start, start + n)
    ]


def count(client, name, **kw):
    return client.query(name, filter="", output_fields=["count(*)"], **kw)[0]["count(*)"]


def test_the_quickstart_inserts_searches_queries_gets_deletes_and_drops(client):
    name = "quickstart"
    if client.has_collection(name):
        client.drop_collection(name)
    # Quick setup: an id, a vector, AUTOINDEX on COSINE, loaded, dynamic fields on.
    client.create_collection(collection_name=name, dimension=8)
    assert client.get_load_state(name)["state"].name == "Loaded"
    data = rows(10)
    res = client.insert(collection_name=name, data=data)
    assert res["insert_count"] == 10 and list(res["ids"]) == list(range(10))

    hits = client.search(name, data=[data[3]["vector"]], limit=2, output_fields=["text", "subject"],
                         consistency_level="Strong")
    assert len(hits) == 1 and len(hits[0]) == 2
    assert hits[0][0]["id"] == 3 and hits[0][0]["distance"] == pytest.approx(1.0, abs=1e-5)
    assert hits[0][0]["entity"] == {"text": "doc 3", "subject": "history"}
    assert hits[0][0]["distance"] >= hits[0][1]["distance"], "COSINE: larger is nearer"

    # As Milvus's docs write it: a filter on a dynamic field.
    hits = client.search(name, data=[data[3]["vector"]], filter="subject == 'history'", limit=3,
                         output_fields=["text", "subject"], consistency_level="Strong")
    assert [h["entity"]["subject"] for h in hits[0]] == ["history"] * 3
    got = client.query(name, filter="subject == 'history'", output_fields=["text", "subject"])
    assert sorted(r["id"] for r in got) == [1, 3, 5, 7, 9]
    got = client.query(name, filter="id in [1, 3, 5]", output_fields=["text", "subject"])
    assert sorted(r["id"] for r in got) == [1, 3, 5]
    assert {r["id"]: r["subject"] for r in got} == {1: "history", 3: "history", 5: "history"}

    got = client.get(name, ids=[0, 2], output_fields=["vector", "text"])
    assert sorted(r["id"] for r in got) == [0, 2]
    by_id = {r["id"]: r for r in got}
    assert by_id[2]["vector"] == pytest.approx(data[2]["vector"], rel=1e-6)
    assert by_id[0]["text"] == "doc 0"

    assert count(client, name) == 10
    assert client.get_collection_stats(name)["row_count"] == 10
    res = client.delete(name, ids=[0, 2])
    assert sorted(res) == [0, 2]
    res = client.delete(name, filter="id >= 8")
    assert sorted(res) == [8, 9]
    res = client.delete(name, filter="subject == 'biology' and id < 5")
    assert sorted(res) == [4], "0 and 2 are gone already"
    assert count(client, name, consistency_level="Strong") == 5
    assert client.get(name, ids=[0, 8]) == []
    client.drop_collection(name)
    assert not client.has_collection(name)


def typed_collection(client, name):
    s = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    s.add_field("id", DataType.INT64, is_primary=True)
    s.add_field("v", DataType.FLOAT_VECTOR, dim=4)
    s.add_field("small", DataType.INT8)
    s.add_field("title", DataType.VARCHAR, max_length=8)
    s.add_field("note", DataType.VARCHAR, max_length=16, nullable=True)
    s.add_field("score", DataType.FLOAT, default_value=0.5)
    if client.has_collection(name):
        client.drop_collection(name)
    client.create_collection(name, schema=s)


def test_nullable_and_default_fields_take_their_null_and_default(client):
    typed_collection(client, "typed")
    client.insert("typed", [{"id": 1, "v": [0, 0, 0, 1], "small": -5, "title": "a"}])
    [row] = client.query("typed", filter="id == 1", output_fields=["*"], consistency_level="Strong")
    assert row["small"] == -5 and row["title"] == "a"
    assert row["note"] is None
    assert row["score"] == pytest.approx(0.5)
    client.drop_collection("typed")


@pytest.mark.parametrize(
    "row, named",
    [
        ({"id": 1, "v": [0, 0, 1], "small": 1, "title": "a"}, "dim"),
        ({"id": 1, "v": [0, 0, 0, 1], "small": 300, "title": "a"}, "small"),
        ({"id": 1, "v": [0, 0, 0, 1], "small": 1, "title": "far too long"}, "title"),
        ({"id": 1, "v": [0, 0, 0, 1], "title": "a"}, "small"),
    ],
)
def test_bad_rows_are_refused_naming_the_field_and_nothing_is_written(client, row, named):
    typed_collection(client, "bad_rows")
    good = {"id": 2, "v": [0, 0, 0, 1], "small": 1, "title": "ok"}
    with pytest.raises(MilvusException) as e:
        client.insert("bad_rows", [good, row])
    assert named in e.value.message, e.value.message
    assert count(client, "bad_rows", consistency_level="Strong") == 0, "nothing written"
    client.drop_collection("bad_rows")


def test_a_strong_read_after_an_insert_finds_the_row_and_a_session_read_sees_its_own_writes(client):
    name = "fresh"
    if client.has_collection(name):
        client.drop_collection(name)
    client.create_collection(name, dimension=8, consistency_level="Session")
    for i in range(5):
        [r] = rows(1, start=i, seed=i)
        client.insert(name, [r])
        hits = client.search(name, data=[r["vector"]], limit=1, consistency_level="Strong")
        assert hits[0][0]["id"] == i
        assert client.get(name, ids=[i])[0]["id"] == i, "session sees its own write"
    client.drop_collection(name)


@pytest.mark.parametrize("metric", ["L2", "IP", "COSINE"])
def test_hnsw_keeps_recall_at_10_over_095_against_numpy_through_a_flush_and_a_reload(client, metric):
    n, dim, nq = 20_000, 32, 50
    rng = np.random.default_rng(11)
    base = rng.standard_normal((n, dim)).astype(np.float32)
    queries = rng.standard_normal((nq, dim)).astype(np.float32)
    name = f"recall_{metric.lower()}"
    if client.has_collection(name):
        client.drop_collection(name)
    s = MilvusClient.create_schema(auto_id=False)
    s.add_field("id", DataType.INT64, is_primary=True)
    s.add_field("v", DataType.FLOAT_VECTOR, dim=dim)
    index = client.prepare_index_params()
    index.add_index("v", index_type="HNSW", metric_type=metric, params={"M": 16, "efConstruction": 128})
    client.create_collection(name, schema=s, index_params=index)
    for start in range(0, n, 5_000):
        chunk = base[start:start + 5_000]
        client.insert(name, [{"id": start + i, "v": v.tolist()} for i, v in enumerate(chunk)])
    client.flush(name)
    client.release_collection(name)
    client.load_collection(name)
    if metric == "L2":
        d = ((queries[:, None, :] - base[None, :, :]) ** 2).sum(-1)
        truth = np.argsort(d, axis=1)[:, :10]
    else:
        a = base / np.linalg.norm(base, axis=1, keepdims=True) if metric == "COSINE" else base
        truth = np.argsort(-(queries @ a.T), axis=1)[:, :10]
    res = client.search(name, data=[q.tolist() for q in queries], limit=10,
                        search_params={"metric_type": metric, "params": {"ef": 200}},
                        consistency_level="Strong")
    found = sum(len({h["id"] for h in hits} & set(t.tolist())) for hits, t in zip(res, truth))
    recall = found / (nq * 10)
    assert recall >= 0.95, f"{metric}: recall@10 {recall:.3f}"
    desc = client.describe_index(name, "v")
    assert desc["index_type"] == "HNSW" and desc["metric_type"] == metric
    client.drop_collection(name)


def test_filters_read_json_paths_and_dynamic_keys_as_milvus_does(client):
    name = "json_paths"
    s = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=True)
    s.add_field("id", DataType.INT64, is_primary=True)
    s.add_field("v", DataType.FLOAT_VECTOR, dim=2)
    s.add_field("meta", DataType.JSON, nullable=True)
    if client.has_collection(name):
        client.drop_collection(name)
    client.create_collection(name, schema=s)
    client.insert(name, [
        {"id": 1, "v": [0, 1], "meta": {"a": {"b": 1}, "tags": ["x", "y"]}, "color": "red"},
        {"id": 2, "v": [1, 0], "meta": {"a": {"b": 2.5}, "tags": ["y"]}, "color": "blue", "n": 7},
        {"id": 3, "v": [1, 1], "meta": None},
    ])
    def ids(f):
        return sorted(r["id"] for r in client.query(name, filter=f, output_fields=["id"],
                                                    consistency_level="Strong"))
    assert ids('meta["a"]["b"] == 1') == [1]
    assert ids('meta["a"]["b"] > 1') == [2]
    assert ids('meta["tags"][0] == "x"') == [1]
    assert ids('color in ["red", "blue"] and n >= 7') == [2]
    assert ids('$meta["color"] == "red"') == [1]
    assert ids('color like "r%" or meta["a"]["b"] == 2.5') == [1, 2]
    [row] = client.query(name, filter="id == 2", output_fields=["*"], consistency_level="Strong")
    assert row["meta"] == {"a": {"b": 2.5}, "tags": ["y"]}
    assert row["color"] == "blue" and row["n"] == 7
    with pytest.raises(MilvusException) as e:
        client.query(name, filter="meta == 1", output_fields=["id"])
    assert e.value.code == 1100 and "JSON" in e.value.message, e.value.message
    client.drop_collection(name)


def test_partitions_hold_their_rows_and_reads_can_name_them(client):
    name = "parts"
    if client.has_collection(name):
        client.drop_collection(name)
    client.create_collection(name, dimension=2)
    client.create_partition(name, "p2026")
    assert client.has_partition(name, "p2026") and not client.has_partition(name, "nope")
    assert sorted(client.list_partitions(name)) == ["_default", "p2026"]
    client.insert(name, [{"id": 1, "vector": [0, 1]}], partition_name="p2026")
    client.insert(name, [{"id": 2, "vector": [1, 0]}])

    def ids(**kw):
        return sorted(r["id"] for r in client.query(name, filter="id > 0", output_fields=["id"],
                                                    consistency_level="Strong", **kw))
    assert ids() == [1, 2]
    assert ids(partition_names=["p2026"]) == [1]
    assert ids(partition_names=["_default"]) == [2]
    hits = client.search(name, data=[[1, 0]], limit=5, partition_names=["p2026"],
                         consistency_level="Strong")
    assert [h["id"] for h in hits[0]] == [1]
    client.load_partitions(name, ["p2026"])
    with pytest.raises(MilvusException) as e:
        client.release_partitions(name, ["p2026"])
    assert "whole collections" in e.value.message, e.value.message
    with pytest.raises(MilvusException) as e:
        client.insert(name, [{"id": 3, "vector": [1, 1]}], partition_name="nope")
    assert count(client, name, consistency_level="Strong") == 2, "nothing written"
    client.drop_partition(name, "p2026")
    assert client.list_partitions(name) == ["_default"]
    client.drop_collection(name)


def test_a_delete_by_filter_matching_more_than_one_read_returns_deletes_nothing(walden_small_reads):
    c = MilvusClient(walden_small_reads.uri)
    c.create_collection("many", dimension=2)
    c.insert("many", [{"id": i, "vector": [1, i]} for i in range(8)])
    with pytest.raises(MilvusException) as e:
        c.delete("many", filter="id >= 0")
    assert "nothing was deleted" in e.value.message, e.value.message
    assert c.query("many", filter="", output_fields=["count(*)"],
                   consistency_level="Strong")[0]["count(*)"] == 8
    assert sorted(c.delete("many", filter="id < 3")) == [0, 1, 2]
    c.close()


def test_reads_at_the_default_level_see_what_was_just_written_and_the_collection_level_is_kept(client):
    """Milvus's default level is Bounded; Walden's bounded reads also see the writer's own
    writes, and a collection created Strong reads Strong when a request names no level."""
    import numpy as np
    from pymilvus import DataType, MilvusClient

    for name, level in [("rw_bounded", "Bounded"), ("rw_strong", "Strong")]:
        s = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        s.add_field("id", DataType.INT64, is_primary=True)
        s.add_field("v", DataType.FLOAT_VECTOR, dim=4)
        client.create_collection(name, schema=s, consistency_level=level)
        try:
            assert client.describe_collection(name)["consistency_level"] == {"Bounded": 2, "Strong": 0}[level]
            for round_ in range(20):
                ids = list(range(round_ * 10, round_ * 10 + 10))
                vecs = np.random.default_rng(round_).random((10, 4)).tolist()
                client.insert(name, [{"id": i, "v": v} for i, v in zip(ids, vecs)])
                # No level named: the collection's, and each read right after the write.
                got = client.query(name, filter=f"id >= {ids[0]}", output_fields=["id"])
                assert sorted(r["id"] for r in got) == ids, (level, round_, got)
                hits = client.search(name, data=[vecs[3]], limit=1)
                assert hits[0][0]["id"] == ids[3], (level, round_, hits)
        finally:
            client.drop_collection(name)
