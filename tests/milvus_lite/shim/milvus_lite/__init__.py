"""Stands in for milvus-lite when its own pymilvus-driven tests run against Walden
(tests/milvus_lite/run.py): only what those tests import to start a server is here."""
