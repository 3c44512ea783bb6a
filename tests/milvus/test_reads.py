"""Reads as Milvus answers them, through pymilvus against a real `walden standalone`: rows
sharing a primary key read as the one written last, queries come back in key order so that
pymilvus's query iterator pages over every row exactly once, and filters compute arithmetic."""

import random

from pymilvus import DataType, MilvusClient


def fresh(client, name, pk_type=DataType.INT64):
    if client.has_collection(name):
        client.drop_collection(name)
    schema = MilvusClient.create_schema()
    if pk_type == DataType.VARCHAR:
        schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=16)
    else:
        schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("vec", DataType.FLOAT_VECTOR, dim=4)
    schema.add_field("val", DataType.VARCHAR, max_length=16)
    schema.add_field("n", DataType.INT64)
    schema.add_field("score", DataType.FLOAT)
    index = client.prepare_index_params()
    index.add_index("vec", index_type="FLAT", metric_type="L2")
    client.create_collection(name, schema=schema, index_params=index)


def row(pk, val, n=0, score=0.0):
    return {"id": pk, "vec": [float(n), 1.0, 0.0, 0.0], "val": val, "n": n, "score": score}


def test_a_key_written_again_reads_as_its_last_write_in_growing_and_flushed_data(client):
    name = "reads_latest"
    fresh(client, name)
    client.insert(name, [row(1, "old"), row(2, "kept")])
    client.flush(name)  # the first writes are in a flushed segment now
    client.insert(name, [row(1, "newer")])
    client.insert(name, [row(3, "first"), row(3, "second")])  # one batch, one key twice
    got = client.query(name, filter="id in [1, 2, 3]", output_fields=["val"],
                       consistency_level="Strong")
    assert sorted((r["id"], r["val"]) for r in got) == [(1, "newer"), (2, "kept"), (3, "second")]
    assert [r["val"] for r in client.get(name, ids=[1])] == ["newer"]
    # An upsert is a delete and an insert: nothing of the old row is left to count.
    client.upsert(name, [row(2, "upserted")])
    got = client.query(name, filter="id == 2", output_fields=["val"], consistency_level="Strong")
    assert [r["val"] for r in got] == ["upserted"]
    client.drop_collection(name)


def test_the_query_iterator_pages_over_every_row_once_in_key_order(client):
    name = "reads_iterator"
    fresh(client, name, DataType.VARCHAR)
    keys = [f"k{i:03d}" for i in range(60)]
    random.Random(3).shuffle(keys)
    client.insert(name, [row(k, "a", i) for i, k in enumerate(keys[:30])])
    client.flush(name)
    client.insert(name, [row(k, "b", i) for i, k in enumerate(keys[30:])])
    # Written again after the flush: read once, as its last write.
    client.insert(name, [row(keys[0], "again", 0)])
    seen = []
    it = client.query_iterator(name, batch_size=7, filter='val != "none"', output_fields=["val"],
                               consistency_level="Strong")
    while batch := it.next():
        seen.extend(batch)
    it.close()
    assert [r["id"] for r in seen] == sorted(keys)
    assert {r["id"]: r["val"] for r in seen}[keys[0]] == "again"
    # A page with an offset starts at the offset'th key.
    got = client.query(name, filter="", limit=5, offset=10, output_fields=["id"],
                       consistency_level="Strong")
    assert [r["id"] for r in got] == sorted(keys)[10:15]
    client.drop_collection(name)


def test_filters_compute_arithmetic_on_scalars(client):
    name = "reads_arithmetic"
    fresh(client, name)
    client.insert(name, [row(i, "x", n=i, score=i / 10) for i in range(10)])
    q = lambda f: sorted(r["id"] for r in client.query(name, filter=f, output_fields=["id"],
                                                       consistency_level="Strong"))
    assert q("score * 100 > 50") == [6, 7, 8, 9]
    assert q("n + 10 > 17") == [8, 9]
    assert q("n / 3 == 2") == [6, 7, 8], "integers divide as integers, as in Milvus"
    assert q("n % 4 == 1 and (n - 1) * 2 >= 8") == [5, 9]
    assert q("id < n * n - 40") == [7, 8, 9]
    hits = client.search(name, data=[[9.0, 1.0, 0.0, 0.0]], limit=3, filter="n * 2 < 10",
                         consistency_level="Strong")
    assert [h["id"] for h in hits[0]] == [4, 3, 2]
    client.drop_collection(name)
