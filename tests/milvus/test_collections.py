"""Collections through pymilvus's MilvusClient, against a real `walden standalone`."""

import pytest
from pymilvus import DataType, MilvusClient, MilvusException


def full_schema():
    s = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=True)
    s.add_field("id", DataType.INT64, is_primary=True)
    s.add_field("v", DataType.FLOAT_VECTOR, dim=8)
    s.add_field("flag", DataType.BOOL)
    s.add_field("i8", DataType.INT8, nullable=True)
    s.add_field("i16", DataType.INT16)
    s.add_field("i32", DataType.INT32)
    s.add_field("f", DataType.FLOAT)
    s.add_field("d", DataType.DOUBLE)
    s.add_field("title", DataType.VARCHAR, max_length=64, nullable=True)
    s.add_field("meta", DataType.JSON, nullable=True)
    return s


def test_the_server_answers_connect_and_says_its_version(client):
    assert client.get_server_version().startswith("v2.6")


def test_a_collection_with_every_supported_type_describes_as_it_was_created(client):
    client.create_collection("every_type", schema=full_schema())
    try:
        assert "every_type" in client.list_collections()
        assert client.has_collection("every_type")
        d = client.describe_collection("every_type")
        fields = {f["name"]: f for f in d["fields"]}
        # As Milvus: the dynamic field is not listed, only enabled.
        assert [f["name"] for f in d["fields"]] == [
            "id", "v", "flag", "i8", "i16", "i32", "f", "d", "title", "meta",
        ]
        assert [f["field_id"] for f in d["fields"]] == list(range(100, 110))
        assert fields["id"]["is_primary"]
        assert fields["v"]["type"] == DataType.FLOAT_VECTOR and fields["v"]["params"]["dim"] == 8
        assert fields["i8"]["type"] == DataType.INT8 and fields["i8"].get("nullable")
        assert fields["i16"]["type"] == DataType.INT16
        assert fields["title"]["params"]["max_length"] == 64
        assert d["enable_dynamic_field"]
    finally:
        client.drop_collection("every_type")
    assert not client.has_collection("every_type")
    assert "every_type" not in client.list_collections()


def test_a_missing_collection_is_code_100_and_has_collection_says_false(client):
    assert not client.has_collection("nowhere")
    with pytest.raises(MilvusException) as e:
        client.describe_collection("nowhere")
    assert e.value.code == 100, e.value
    # Dropping what is not there succeeds, as in Milvus.
    client.drop_collection("nowhere")
    # Milvus's proxy answers a load state for it: NotExist, not an error.
    assert client.get_load_state("nowhere")["state"].name == "NotExist"


@pytest.mark.parametrize(
    "dtype, extra, named",
    [
        (DataType.BINARY_VECTOR, {"dim": 16}, "BinaryVector"),
        (DataType.SPARSE_FLOAT_VECTOR, {}, "SparseFloatVector"),
        (DataType.ARRAY, {"element_type": DataType.INT64, "max_capacity": 4}, "Array"),
    ],
)
def test_an_unsupported_type_is_refused_naming_the_field_and_nothing_is_created(
    client, dtype, extra, named
):
    s = MilvusClient.create_schema(auto_id=False)
    s.add_field("id", DataType.INT64, is_primary=True)
    s.add_field("v", DataType.FLOAT_VECTOR, dim=4)
    s.add_field("odd", dtype, **extra)
    with pytest.raises(MilvusException) as e:
        client.create_collection("refused", schema=s)
    assert e.value.code == 105, e.value
    assert "odd" in e.value.message and named in e.value.message, e.value.message
    assert not client.has_collection("refused")


def test_a_varchar_without_max_length_and_a_vector_without_dim_are_refused(client):
    s = MilvusClient.create_schema(auto_id=False)
    s.add_field("id", DataType.INT64, is_primary=True)
    s.add_field("v", DataType.FLOAT_VECTOR)
    with pytest.raises(MilvusException) as e:
        client.create_collection("no_dim", schema=s)
    assert "dim" in e.value.message, e.value.message
    assert not client.has_collection("no_dim")


def test_only_the_default_database_exists(client):
    assert client.list_databases() == ["default"]
    with pytest.raises(MilvusException) as e:
        client.describe_database("other")
    assert e.value.code == 800, e.value


def test_an_rpc_walden_does_not_serve_is_unimplemented_naming_it(walden):
    import grpc
    from pymilvus.grpc_gen import milvus_pb2, milvus_pb2_grpc

    with grpc.insecure_channel(walden.addr) as ch:
        stub = milvus_pb2_grpc.MilvusServiceStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            stub.ListImportTasks(milvus_pb2.ListImportTasksRequest())
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "ListImportTasks" in e.value.details(), e.value.details()
