"""Partial upserts (`upsert(..., partial_update=True)`, Milvus 2.6) through pymilvus against a
real `walden standalone`: a stored row keeps the fields the upsert leaves out (also when it
was flushed), dynamic keys merge, and a new row that leaves out a required field is refused
with nothing written."""

import pytest
from pymilvus import DataType, MilvusClient, MilvusException


def make(client, name):
    if client.has_collection(name):
        client.drop_collection(name)
    s = MilvusClient.create_schema(enable_dynamic_field=True)
    s.add_field("id", DataType.INT64, is_primary=True)
    s.add_field("vec", DataType.FLOAT_VECTOR, dim=4)
    s.add_field("title", DataType.VARCHAR, max_length=32)
    s.add_field("note", DataType.VARCHAR, max_length=32, nullable=True)
    s.add_field("rank", DataType.INT64, default_value=7)
    index = client.prepare_index_params()
    index.add_index("vec", index_type="FLAT", metric_type="L2")
    client.create_collection(name, schema=s, index_params=index)


def stored(client, name, ids):
    got = client.query(name, filter=f"id in {list(ids)}", output_fields=["*"],
                       consistency_level="Strong")
    return {r["id"]: r for r in got}


def test_a_partial_upsert_keeps_what_it_leaves_out_and_merges_dynamic_keys(client):
    name = "partial"
    make(client, name)
    try:
        client.insert(name, [
            {"id": 1, "vec": [1, 0, 0, 0], "title": "one", "note": "n1", "rank": 1, "color": "red"},
            {"id": 2, "vec": [0, 1, 0, 0], "title": "two", "note": None, "rank": 2},
        ])
        client.flush(name)  # row 1 is read back from a flushed segment
        client.upsert(name, [{"id": 1, "title": "uno", "size": 3}, {"id": 2, "title": "dos"}],
                      partial_update=True)
        rows = stored(client, name, [1, 2])
        assert rows[1]["title"] == "uno" and rows[1]["note"] == "n1" and rows[1]["rank"] == 1
        assert rows[1]["vec"] == pytest.approx([1, 0, 0, 0])
        assert rows[1]["color"] == "red" and rows[1]["size"] == 3, "dynamic keys merge"
        assert rows[2]["title"] == "dos" and rows[2]["note"] is None and rows[2]["rank"] == 2
        # A vector alone, and a field set to null.
        client.upsert(name, [{"id": 2, "vec": [0, 0, 1, 0], "note": None}], partial_update=True)
        rows = stored(client, name, [2])
        assert rows[2]["vec"] == pytest.approx([0, 0, 1, 0]) and rows[2]["title"] == "dos"
        # A new key: what it leaves out takes the default or null, a required field refuses it.
        client.upsert(name, [{"id": 3, "vec": [0, 0, 0, 1], "title": "three"}],
                      partial_update=True)
        rows = stored(client, name, [3])
        assert rows[3]["rank"] == 7 and rows[3]["note"] is None
        with pytest.raises(MilvusException) as e:
            client.upsert(name, [{"id": 4, "title": "no vector"}, {"id": 1, "title": "x"}],
                          partial_update=True)
        assert e.value.code == 1100 and "vec" in str(e.value), e.value
        assert 4 not in stored(client, name, [4]) and stored(client, name, [1])[1]["title"] == "uno"
        count = client.query(name, filter="", output_fields=["count(*)"],
                             consistency_level="Strong")[0]["count(*)"]
        assert count == 3, "each upsert replaced its rows"
    finally:
        client.drop_collection(name)
