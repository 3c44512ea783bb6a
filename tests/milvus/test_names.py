"""Aliases, renames, properties, autoID, statistics and index progress through pymilvus."""

import time

import numpy as np
import pytest
from pymilvus import DataType, MilvusClient, MilvusException


def make(client, name, dim=4, auto_id=False):
    s = MilvusClient.create_schema(auto_id=auto_id, enable_dynamic_field=False)
    s.add_field("id", DataType.INT64, is_primary=True, auto_id=auto_id)
    s.add_field("v", DataType.FLOAT_VECTOR, dim=dim)
    s.add_field("n", DataType.INT64)
    client.create_collection(name, schema=s)


def rows(ids, dim=4):
    return [
        {"id": int(i), "v": np.random.default_rng(int(i)).random(dim).tolist(), "n": int(i) * 10}
        for i in ids
    ]


def strong_ids(client, name, **kw):
    got = client.query(name, filter="id >= 0", output_fields=["id"], consistency_level="Strong", **kw)
    return sorted(r["id"] for r in got)


def test_an_alias_reads_and_writes_its_collection_and_moves_to_another(client):
    make(client, "alias_a")
    make(client, "alias_b")
    try:
        client.insert("alias_a", rows([1, 2]))
        client.insert("alias_b", rows([7]))
        client.create_alias("alias_a", "current")
        assert client.describe_alias("current")["collection_name"] == "alias_a"
        assert client.list_aliases("alias_a")["aliases"] == ["current"]
        assert client.describe_collection("current")["collection_name"] == "alias_a"
        assert "current" in client.describe_collection("alias_a")["aliases"]
        client.insert("current", rows([3]))
        assert strong_ids(client, "current") == [1, 2, 3]
        assert strong_ids(client, "alias_a") == [1, 2, 3]
        hits = client.search("current", data=[rows([3])[0]["v"]], limit=1, consistency_level="Strong")
        assert hits[0][0]["id"] == 3
        # An alias is not a collection: it is not listed, and takes no collection's name.
        assert "current" not in client.list_collections()
        with pytest.raises(MilvusException) as e:
            client.create_alias("alias_b", "alias_a")
        assert e.value.code == 1602, e.value
        with pytest.raises(MilvusException):
            make(client, "current")
        # A collection with an alias is not dropped, nor one named by its alias.
        with pytest.raises(MilvusException) as e:
            client.drop_collection("alias_a")
        assert "alias" in str(e.value)
        with pytest.raises(MilvusException):
            client.drop_collection("current")
        assert client.has_collection("alias_a")

        client.alter_alias("alias_b", "current")
        assert client.describe_alias("current")["collection_name"] == "alias_b"
        assert strong_ids(client, "current") == [7]
        client.insert("current", rows([8]))
        assert strong_ids(client, "alias_b") == [7, 8]
        assert strong_ids(client, "alias_a") == [1, 2, 3]

        client.drop_alias("current")
        client.drop_alias("current")  # gone already: success, as in Milvus
        with pytest.raises(MilvusException) as e:
            client.describe_alias("current")
        assert e.value.code == 1600, e.value
        assert not client.has_collection("current")
    finally:
        client.drop_alias("current")
        client.drop_collection("alias_a")
        client.drop_collection("alias_b")


def test_a_renamed_collection_keeps_its_rows_index_and_aliases_under_the_new_name(client):
    make(client, "before_rename")
    try:
        client.insert("before_rename", rows(range(50)))
        client.flush("before_rename")
        client.insert("before_rename", rows(range(50, 60)))
        idx = client.prepare_index_params()
        idx.add_index("v", index_type="HNSW", metric_type="L2", index_name="v_graph", params={"M": 8})
        client.release_collection("before_rename")
        client.create_index("before_rename", idx)
        client.load_collection("before_rename")
        client.create_alias("before_rename", "renamed_alias")

        client.rename_collection("before_rename", "after_rename")
        assert not client.has_collection("before_rename")
        assert "after_rename" in client.list_collections()
        assert client.describe_alias("renamed_alias")["collection_name"] == "after_rename"
        # Pauses between steps: the shards keep serving under the new name.
        time.sleep(2.5)
        assert strong_ids(client, "after_rename") == list(range(60))
        assert strong_ids(client, "renamed_alias") == list(range(60))
        client.insert("after_rename", rows([60]))
        assert client.query("after_rename", filter="id == 60", consistency_level="Strong")[0]["n"] == 600
        with pytest.raises(MilvusException) as e:
            client.insert("before_rename", rows([61]))
        assert e.value.code == 100, e.value
        assert client.describe_index("after_rename", "v_graph")["index_type"] == "HNSW"
        # Delegators that start again after the rename find the record by the collection's id.
        client.release_collection("renamed_alias")
        client.load_collection("after_rename", timeout=30)
        assert strong_ids(client, "after_rename") == list(range(61))
        assert client.describe_index("after_rename", "v_graph")["indexed_rows"] == 50
        assert client.list_indexes("after_rename") == ["v_graph"]
        # The old name is free again.
        make(client, "before_rename")
        assert strong_ids(client, "before_rename") == []
    finally:
        client.drop_alias("renamed_alias")
        client.drop_collection("after_rename")
        client.drop_collection("before_rename")


def test_properties_are_kept_and_ones_walden_cannot_honour_are_refused(client):
    make(client, "props")
    try:
        client.alter_collection_properties("props", properties={"owner": "team-a", "tier": "gold"})
        assert client.describe_collection("props")["properties"] == {"owner": "team-a", "tier": "gold"}
        client.drop_collection_properties("props", property_keys=["tier"])
        assert client.describe_collection("props")["properties"] == {"owner": "team-a"}
        for key in ["collection.ttl.seconds", "mmap.enabled"]:
            with pytest.raises(MilvusException) as e:
                client.alter_collection_properties("props", properties={key: "1"})
            assert e.value.code == 1100 and key in str(e.value), e.value
        assert client.describe_collection("props")["properties"] == {"owner": "team-a"}
    finally:
        client.drop_collection("props")


def test_auto_ids_are_chosen_by_the_server_unique_and_returned(client):
    make(client, "auto", auto_id=True)
    try:
        first = client.insert("auto", [{"v": [0.1, 0.2, 0.3, 0.4], "n": i} for i in range(100)])
        second = client.insert("auto", [{"v": [0.4, 0.3, 0.2, 0.1], "n": 100}])
        ids = list(first["ids"]) + list(second["ids"])
        assert len(ids) == 101 and len(set(ids)) == 101
        assert all(isinstance(i, int) and i > 0 for i in ids)
        got = client.query("auto", filter="n >= 0", output_fields=["id", "n"], consistency_level="Strong")
        assert sorted(r["id"] for r in got) == sorted(ids)
        by_id = {r["id"]: r["n"] for r in got}
        assert [by_id[i] for i in first["ids"]] == list(range(100))
        # Ids the user gives to an autoID key are refused, and nothing is written.
        with pytest.raises(MilvusException) as e:
            client.insert("auto", [{"id": 5, "v": [0.0] * 4, "n": 5}])
        assert e.value.code == 1100 and "autoID" in str(e.value), e.value
        assert client.query("auto", filter="", output_fields=["count(*)"], consistency_level="Strong")[0]["count(*)"] == 101
    finally:
        client.drop_collection("auto")


def test_partition_and_collection_statistics_count_live_rows(client):
    make(client, "stats")
    try:
        client.create_partition("stats", "p1")
        client.insert("stats", rows(range(10)))
        client.insert("stats", rows(range(10, 13)), partition_name="p1")
        client.delete("stats", ids=[0, 1])
        time.sleep(1)
        assert client.get_collection_stats("stats")["row_count"] == 11
        assert client.get_partition_stats("stats", "p1")["row_count"] == 3
        assert client.get_partition_stats("stats", "_default")["row_count"] == 8
        assert client.query("stats", filter="", output_fields=["count(*)"], partition_names=["p1"],
                            consistency_level="Strong")[0]["count(*)"] == 3
        with pytest.raises(MilvusException):
            client.get_partition_stats("stats", "nope")
    finally:
        client.drop_collection("stats")


def test_index_progress_counts_flushed_rows_in_graphs(client):
    make(client, "progress", dim=8)
    try:
        client.insert("progress", rows(range(300), dim=8))
        client.flush("progress")
        idx = client.prepare_index_params()
        idx.add_index("v", index_type="IVF_FLAT", metric_type="L2", params={"nlist": 16})
        client.release_collection("progress")
        client.create_index("progress", idx)
        client.load_collection("progress")
        d = client.describe_index("progress", "v")
        # IVF_FLAT is served by an HNSW graph, and DescribeIndex says so.
        assert d["index_type"] == "HNSW" and d["requested_index_type"] == "IVF_FLAT", d
        assert d["total_rows"] == 300 and d["indexed_rows"] == 300 and d["pending_index_rows"] == 0, d
        assert d["state"] == "Finished", d
        assert client.list_indexes("progress") == ["v"]
    finally:
        client.drop_collection("progress")


def test_a_scalar_index_is_accepted_described_and_dropped_and_filters_answer_the_same(client):
    make(client, "scalar_idx")
    try:
        client.insert("scalar_idx", rows(range(20)))
        before = strong_ids(client, "scalar_idx")
        idx = client.prepare_index_params()
        # As Milvus's docs have users index scalar fields beside the vector field.
        idx.add_index("n", index_type="STL_SORT", index_name="n_sorted")
        idx.add_index("id", index_type="INVERTED")
        client.create_index("scalar_idx", idx)
        assert sorted(client.list_indexes("scalar_idx")) == ["id", "n_sorted"]
        d = client.describe_index("scalar_idx", "n_sorted")
        assert d["index_type"] == "STL_SORT" and d["field_name"] == "n" and d["state"] == "Finished", d
        got = client.query("scalar_idx", filter="n >= 150", output_fields=["n"],
                           consistency_level="Strong")
        assert sorted(r["id"] for r in got) == [15, 16, 17, 18, 19]
        assert strong_ids(client, "scalar_idx") == before
        # A vector index type on a scalar field, or an unknown field, is refused.
        bad = client.prepare_index_params()
        bad.add_index("n", index_type="HNSW", metric_type="L2")
        with pytest.raises(MilvusException) as e:
            client.create_index("scalar_idx", bad)
        assert "scalar field n" in str(e.value)
        client.drop_index("scalar_idx", "n_sorted")
        assert client.list_indexes("scalar_idx") == ["id"]
    finally:
        client.drop_collection("scalar_idx")


def test_alloc_timestamp_is_a_hybrid_timestamp_after_the_last_write(client):
    make(client, "ts")
    try:
        w = client.insert("ts", rows([1]))
        # pymilvus exposes AllocTimestamp through its handler.
        t = client._get_connection().alloc_timestamp()
        assert t > w["timestamp"] if "timestamp" in w else t > 0
        physical_ms = t >> 18
        assert abs(physical_ms - time.time() * 1000) < 60_000
    finally:
        client.drop_collection("ts")
