"""A real Walden cluster for pymilvus tests: etcd, a coordinator, streaming nodes and
`walden proxy` processes, each a process of its own on 127.0.0.1 (etcd on a loopback address
of its own, claimed as the Rust tests claim theirs: `walden_common::test_host`)."""

import fcntl
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

from conftest import WALDEN

LOCKS = Path(tempfile.gettempdir()) / "walden-test-hosts"


class TestHost:
    """A loopback address 127.77.x.y held by an exclusive lock (the same files and lock as
    the Rust suite's `TestHost`, so the two never share an address)."""

    def __init__(self):
        LOCKS.mkdir(parents=True, exist_ok=True)
        for hi in range(256):
            for lo in range(1, 255):
                ip = f"127.77.{hi}.{lo}"
                f = open(LOCKS / f"{ip}.lock", "a")
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    f.close()
                    continue
                self.ip, self._lock = ip, f
                return
        raise RuntimeError(f"every test address is held (locks in {LOCKS})")

    def release(self):
        self._lock.close()


class Proc:
    def __init__(self, role: str, args: list[str], workdir: Path, n: int):
        self.role = role
        self.ready = workdir / f"{role}{n}.ready"
        self.logfile = workdir / f"{role}{n}.log"
        self.proc = subprocess.Popen(
            [str(WALDEN), role, "--ready-file", str(self.ready), *args],
            stdout=subprocess.DEVNULL,
            stderr=open(self.logfile, "wb"),
            env={**os.environ, "RUST_LOG": "info"},
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                self.doc = json.loads(self.ready.read_text())
                break
            except (FileNotFoundError, json.JSONDecodeError):
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"walden {role} exited: {self.log()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"walden {role} not ready in 60 s: {self.log()}")
            time.sleep(0.05)

    def log(self) -> str:
        return self.logfile.read_text(errors="replace")[-4000:]

    def kill(self):
        """kill -9."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


class Cluster:
    """etcd, one coordinator, `nodes` streaming nodes (object WAL on a local directory) and
    `proxies` proxies."""

    def __init__(self, nodes: int = 2, proxies: int = 2, pchannels: int = 4):
        if not shutil.which("etcd"):
            raise RuntimeError("etcd not installed (scripts/install-test-deps.sh installs it)")
        self.dir = Path(tempfile.mkdtemp(prefix="walden-milvus-cluster-"))
        self.host = TestHost()
        self.etcd_url = f"http://{self.host.ip}:2379"
        self.etcd = subprocess.Popen(
            ["etcd", "--name", "e", "--data-dir", str(self.dir / "etcd"),
             "--listen-client-urls", self.etcd_url, "--advertise-client-urls", self.etcd_url,
             "--listen-peer-urls", f"http://{self.host.ip}:2380",
             "--initial-advertise-peer-urls", f"http://{self.host.ip}:2380",
             "--initial-cluster", f"e=http://{self.host.ip}:2380",
             "--log-level", "warn"],
            stdout=subprocess.DEVNULL, stderr=open(self.dir / "etcd.log", "wb"),
        )
        self._wait_etcd()
        (self.dir / "store").mkdir()
        self.config = self.dir / "cluster.toml"
        self.config.write_text(
            f"[node]\npchannels = {pchannels}\ntime_tick_interval_ms = 50\n"
            f"[wal]\nstorage = \"object\"\n"
            f"[object_store]\nurl = \"file://{self.dir / 'store'}\"\n"
            f"[cluster]\nnode_lease_ttl_ms = 2000\ncoord_lease_ttl_ms = 2000\n"
        )
        self.started = 0
        self.coord = self._spawn("coord")
        self.nodes = [self._spawn("node", "--data-dir", str(self.dir / f"node{i}")) for i in range(nodes)]
        self.proxies = [self._spawn("proxy") for _ in range(proxies)]
        self.standbys: list[Proc] = []

    def add_coordinator(self) -> Proc:
        """Another coordinator: a standby while the first leads (stopped with the cluster)."""
        p = self._spawn("coord")
        self.standbys.append(p)
        return p

    def _wait_etcd(self):
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.etcd_url}/health", timeout=1) as r:
                    if b'"health":"true"' in r.read():
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError("etcd not healthy in 30 s: " + (self.dir / "etcd.log").read_text()[-2000:])

    def _spawn(self, role: str, *extra: str) -> Proc:
        self.started += 1
        return Proc(
            role,
            ["--listen", "127.0.0.1:0", "--etcd", self.etcd_url, "--config", str(self.config),
             *([] if role == "proxy" else ["--metrics-listen", ""]), *extra],
            self.dir, self.started,
        )

    def uri(self, proxy: int) -> str:
        return f"http://{self.proxies[proxy].doc['milvus']}"

    def logs(self) -> str:
        every = [self.coord, *self.standbys, *self.nodes, *self.proxies]
        return "\n".join(f"--- {p.role}: {p.log()}" for p in every)

    def stop(self):
        for p in [*self.proxies, *self.nodes, self.coord, *self.standbys]:
            p.kill()
        self.etcd.kill()
        self.etcd.wait()
        self.host.release()
        shutil.rmtree(self.dir, ignore_errors=True)
