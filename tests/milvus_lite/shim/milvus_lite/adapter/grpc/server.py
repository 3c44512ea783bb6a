"""`start_server_in_thread` as milvus-lite's tests call it, answering with the address of the
Walden server that tests/milvus_lite/run.py started (WALDEN_MILVUS_ADDR) instead of starting
milvus-lite. Every test module shares that one server; the tests drop what they create."""

import os


class _Nothing:
    def stop(self, grace=None):
        return None

    def close(self):
        return None


def start_server_in_thread(data_dir=None, host="127.0.0.1", port=0, max_workers=None):
    addr = os.environ["WALDEN_MILVUS_ADDR"]
    return _Nothing(), _Nothing(), int(addr.rsplit(":", 1)[1])
