//! A real cluster for integration tests: etcd (Debian's `etcd-server`), `walden coord` and
//! `walden node` processes on 127.0.0.1, and a WAL on a `file://` object store they share.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use walden_client::Client;
use walden_metastore_etcd::testing::EtcdServer;
use walden_proto::v1::{AssignmentState, ClusterStatusResponse};

use super::WALDEN;

/// One `walden coord` or `walden node` process.
pub struct Proc {
    pub role: &'static str,
    pub addr: String,
    /// Its /metrics and /healthz address, when the cluster serves them.
    pub http: Option<String>,
    pub node_id: Option<u64>,
    dir: PathBuf,
    child: Option<Child>,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// kill -9.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn signal(&self, sig: &str) {
        let _ = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status();
    }

    /// SIGTERM; waits at most `within` for the exit.
    pub fn stop(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        self.signal("TERM");
        let mut c = self.child.take()?;
        let deadline = Instant::now() + within;
        loop {
            if let Ok(Some(s)) = c.try_wait() {
                return Some(s);
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.with_extension("log")).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// etcd, coordinators and nodes.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub etcd: EtcdServer,
    pub coords: Vec<Proc>,
    pub nodes: Vec<Proc>,
    pub query_nodes: Vec<Proc>,
    pub config: PathBuf,
    /// How clients reach it (a token, when the config turns tokens on).
    pub connect: walden_client::ConnectOptions,
    /// Processes started from now on serve /metrics and /healthz on a port of their own.
    pub metrics: bool,
    /// The address processes started from now on listen on (127.0.0.1 by default; a test
    /// network's host address for partition tests).
    pub host: String,
    started: usize,
}

/// The cluster's config: `pchannels` pchannels, short leases (2 s) so that tests are quick.
pub fn config(dir: &std::path::Path, pchannels: usize, extra: &str) -> String {
    format!(
        "[node]\npchannels = {pchannels}\ntime_tick_interval_ms = 50\n\
         [wal]\nstorage = \"object\"\n\
         [object_store]\nurl = \"file://{}\"\n\
         [cluster]\nnode_lease_ttl_ms = 2000\ncoord_lease_ttl_ms = 2000\n{extra}",
        dir.join("store").display()
    )
}

impl Cluster {
    /// Starts etcd, `coords` coordinators and `nodes` nodes, and waits until every pchannel is
    /// served.
    pub async fn start(coords: usize, nodes: usize, pchannels: usize, extra: &str) -> Self {
        Self::start_with(coords, nodes, pchannels, extra, Default::default()).await
    }

    /// Like [`Cluster::start`], with clients connecting as `connect` says.
    pub async fn start_with(
        coords: usize,
        nodes: usize,
        pchannels: usize,
        extra: &str,
        connect: walden_client::ConnectOptions,
    ) -> Self {
        let etcd = EtcdServer::start().expect("etcd (scripts/install-test-deps.sh installs it)");
        Self::start_on(etcd, coords, nodes, pchannels, extra, connect).await
    }

    /// Like [`Cluster::start_with`], on `etcd` (a cluster of several members, say).
    pub async fn start_on(
        etcd: EtcdServer,
        coords: usize,
        nodes: usize,
        pchannels: usize,
        extra: &str,
        connect: walden_client::ConnectOptions,
    ) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("store")).expect("store dir");
        let config = dir.path().join("cluster.toml");
        std::fs::write(&config, self::config(dir.path(), pchannels, extra)).expect("config");
        let mut c = Self {
            dir,
            etcd,
            coords: Vec::new(),
            nodes: Vec::new(),
            query_nodes: Vec::new(),
            config,
            connect,
            metrics: false,
            host: "127.0.0.1".into(),
            started: 0,
        };
        for _ in 0..coords {
            c.add_coord().await;
        }
        for _ in 0..nodes {
            c.add_node().await;
        }
        if coords > 0 && nodes > 0 {
            c.converged(pchannels, Duration::from_secs(30)).await;
        }
        c
    }

    async fn spawn(&mut self, role: &'static str) -> Proc {
        self.spawn_in(role, None).await
    }

    /// Starts a `walden node` inside `netns`, listening on its address and reaching etcd on
    /// the host address etcd listens on there.
    pub async fn add_node_in(&mut self, netns: &super::netns::Netns) -> usize {
        let p = self.spawn_in("node", Some(netns)).await;
        self.nodes.push(p);
        self.nodes.len() - 1
    }

    async fn spawn_in(&mut self, role: &'static str, netns: Option<&super::netns::Netns>) -> Proc {
        self.started += 1;
        let dir = self.dir.path().join(format!("{role}{}", self.started));
        let ready = dir.with_extension("ready");
        let log = std::fs::File::create(dir.with_extension("log")).expect("log");
        let (host, etcd) = match netns {
            Some(n) => (n.inside.clone(), self.etcd.endpoints_on(&n.etcd)),
            None => (self.host.clone(), self.etcd.endpoints()),
        };
        let mut cmd = match netns {
            Some(n) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &n.name, WALDEN]);
                c
            }
            None => Command::new(WALDEN),
        };
        let metrics = if self.metrics {
            format!("{host}:0")
        } else {
            String::new()
        };
        cmd.arg(role)
            .args([
                "--listen",
                &format!("{host}:0"),
                "--metrics-listen",
                &metrics,
            ])
            .args(["--etcd", &etcd])
            .arg("--config")
            .arg(&self.config)
            .arg("--ready-file")
            .arg(&ready)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::from(log));
        if role == "node" {
            cmd.arg("--data-dir").arg(&dir);
        }
        let mut child = cmd.spawn().expect("spawn walden");
        let deadline = Instant::now() + Duration::from_secs(30);
        let doc = loop {
            if let Ok(text) = std::fs::read_to_string(&ready)
                && let Ok(doc) = serde_json::from_str::<serde_json::Value>(&text)
            {
                break doc;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "walden {role} exited at start ({status}): {}",
                    std::fs::read_to_string(dir.with_extension("log")).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "walden {role} never got ready");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        Proc {
            role,
            addr: doc["grpc"].as_str().expect("grpc").to_owned(),
            http: doc["http"].as_str().map(str::to_owned),
            node_id: doc["node_id"].as_u64().or(doc["query_node_id"].as_u64()),
            dir,
            child: Some(child),
        }
    }

    pub async fn add_coord(&mut self) -> usize {
        let p = self.spawn("coord").await;
        self.coords.push(p);
        self.coords.len() - 1
    }

    pub async fn add_node(&mut self) -> usize {
        let p = self.spawn("node").await;
        self.nodes.push(p);
        self.nodes.len() - 1
    }

    /// Starts a `walden query-node`.
    pub async fn add_query_node(&mut self) -> usize {
        let p = self.spawn("query-node").await;
        self.query_nodes.push(p);
        self.query_nodes.len() - 1
    }

    /// Every coordinator's address, as `--addr` takes them.
    pub fn addrs(&self) -> String {
        self.coords
            .iter()
            .map(|c| c.addr.clone())
            .collect::<Vec<_>>()
            .join(",")
    }

    pub async fn client(&self) -> Client {
        Client::connect_with(&self.addrs(), &self.connect)
            .await
            .expect("connect to the coordinators")
    }

    /// The cluster as a live coordinator sees it.
    pub async fn status(&self) -> Option<ClusterStatusResponse> {
        for c in self.coords.iter().filter(|c| c.child.is_some()) {
            if let Ok(client) = Client::connect_with(&c.addr, &self.connect).await
                && let Ok(s) = client.cluster_status().await
            {
                return Some(s);
            }
        }
        None
    }

    /// Waits until `pchannels` pchannels are assigned and confirmed; returns the status.
    pub async fn converged(&self, pchannels: usize, within: Duration) -> ClusterStatusResponse {
        let deadline = Instant::now() + within;
        loop {
            if let Some(s) = self.status().await
                && s.pchannels.len() == pchannels
                && s.pchannels
                    .iter()
                    .all(|p| p.state() == AssignmentState::Assigned)
            {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "the cluster did not converge: {:?}",
                self.status().await
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The node process whose registration id is `id`.
    pub fn node_by_id(&mut self, id: u64) -> &mut Proc {
        self.nodes
            .iter_mut()
            .find(|n| n.node_id == Some(id))
            .expect("node with that id")
    }
}
