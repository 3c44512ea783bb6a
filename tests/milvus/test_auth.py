"""Tokens on Milvus's API: pymilvus's `token=` (or `user=`/`password=` with the token as the
password) is let in; no token or a wrong one is refused on every call."""

import base64

import grpc
import pytest
from pymilvus import MilvusClient, MilvusException
from pymilvus.grpc_gen import milvus_pb2, milvus_pb2_grpc


def test_a_listed_token_is_let_in_as_a_token_or_as_a_password(walden_with_tokens):
    c = MilvusClient(walden_with_tokens.uri, token="s3cret-token")
    assert c.list_collections() == []
    c.close()
    c = MilvusClient(walden_with_tokens.uri, user="root", password="s3cret-token")
    assert c.list_databases() == ["default"]
    c.close()


@pytest.mark.parametrize("creds", [{}, {"token": "wrong"}, {"user": "root", "password": "nope"}])
def test_no_token_or_a_wrong_one_is_refused(walden_with_tokens, creds):
    # pymilvus reports a refused Connect as a failed connection...
    with pytest.raises(MilvusException):
        c = MilvusClient(walden_with_tokens.uri, timeout=5, **creds)
        c.list_collections()
    # ...so the cause is checked on the wire: UNAUTHENTICATED, naming the token, on every call.
    header = []
    if "token" in creds:
        header = [("authorization", base64.b64encode(creds["token"].encode()).decode())]
    elif "user" in creds:
        pair = f'{creds["user"]}:{creds["password"]}'.encode()
        header = [("authorization", base64.b64encode(pair).decode())]
    with grpc.insecure_channel(walden_with_tokens.addr) as ch:
        stub = milvus_pb2_grpc.MilvusServiceStub(ch)
        for call, req in [
            (stub.Connect, milvus_pb2.ConnectRequest()),
            (stub.ShowCollections, milvus_pb2.ShowCollectionsRequest()),
            (stub.Insert, milvus_pb2.InsertRequest(collection_name="c")),
        ]:
            with pytest.raises(grpc.RpcError) as e:
                call(req, metadata=header, timeout=5)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, e.value
            assert "token" in e.value.details(), e.value.details()
