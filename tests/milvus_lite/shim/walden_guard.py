"""A pytest plugin (`-p walden_guard`): the run stops at once if `milvus_lite` is not the shim,
so milvus-lite's tests never pass by talking to milvus-lite itself."""

from pathlib import Path


def pytest_sessionstart(session):
    import milvus_lite

    shim = Path(__file__).resolve().parent
    if Path(milvus_lite.__file__).resolve().parent.parent != shim:
        raise SystemExit(f"milvus_lite is {milvus_lite.__file__}, not Walden's shim in {shim}")


import os

import pytest


@pytest.fixture(autouse=True)
def _drop_aliases_left_behind():
    """After each test, drops the aliases it left. milvus-lite's teardowns drop collections
    only, which Milvus (since 2.5.5, milvus-io/milvus#40142) and Walden refuse while a
    collection has aliases: one test's alias would fail every later teardown on the server."""
    yield
    from pymilvus import MilvusClient

    client = MilvusClient(uri=f"http://{os.environ['WALDEN_MILVUS_ADDR']}")
    try:
        for alias in client.list_aliases().get("aliases", []):
            client.drop_alias(alias)
    finally:
        client.close()
