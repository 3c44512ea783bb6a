"""Starts a real `walden standalone` (the binary `cargo test` built) on ports the kernel picks
and gives the tests the address of its Milvus API. Tests talk to it with pymilvus only."""

import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
WALDEN = Path(os.environ.get("WALDEN_BIN", ROOT / "target" / "debug" / "walden"))


class Standalone:
    def __init__(self, workdir: Path, config: str = ""):
        self.workdir = workdir
        self.ready = workdir / "ready.json"
        self.log = open(workdir / "walden.log", "wb")
        extra = []
        if config:
            (workdir / "walden.toml").write_text(config)
            extra = ["--config", str(workdir / "walden.toml")]
        self.proc = subprocess.Popen(
            [
                str(WALDEN),
                "standalone",
                "--data-dir",
                str(workdir / "data"),
                "--listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "",
                "--milvus-listen",
                "127.0.0.1:0",
                "--ready-file",
                str(self.ready),
            ]
            + extra,
            stdout=subprocess.DEVNULL,
            stderr=self.log,
        )
        deadline = time.monotonic() + 60
        while not self.ready.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"walden exited with {self.proc.returncode}: {self.logs()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"walden not ready in 60 s: {self.logs()}")
            time.sleep(0.05)
        self.addr = json.loads(self.ready.read_text())["milvus"]
        self.uri = f"http://{self.addr}"

    def logs(self) -> str:
        return (self.workdir / "walden.log").read_text(errors="replace")[-4000:]

    def stop(self):
        self.proc.kill()
        self.proc.wait()
        self.log.close()


@pytest.fixture(scope="session")
def walden():
    if not WALDEN.exists():
        pytest.fail(f"{WALDEN} not built: run `cargo build -p walden` (scripts/test.sh does)")
    with tempfile.TemporaryDirectory(prefix="walden-milvus-") as d:
        server = Standalone(Path(d))
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture
def client(walden):
    from pymilvus import MilvusClient

    c = MilvusClient(walden.uri)
    yield c
    c.close()


@pytest.fixture(scope="session")
def walden_with_tokens():
    """A standalone whose every listener needs one of the tokens in its token file."""
    with tempfile.TemporaryDirectory(prefix="walden-milvus-auth-") as d:
        tokens = Path(d) / "tokens"
        tokens.write_text("s3cret-token\n")
        server = Standalone(Path(d), f'[server]\nauth_token_file = "{tokens}"\n')
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture(scope="session")
def walden_small_reads():
    """A standalone whose reads return at most 5 rows (query.max_rows)."""
    with tempfile.TemporaryDirectory(prefix="walden-milvus-small-") as d:
        server = Standalone(Path(d), "[query]\nmax_rows = 5\n")
        try:
            yield server
        finally:
            server.stop()
