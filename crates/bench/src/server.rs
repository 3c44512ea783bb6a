//! The Walden server the bench starts and kills, and what it reads of it (CPU, node counters).

use super::*;

pub(super) struct WaldenServer {
    pub(super) child: Option<Child>,
    pub(super) addr: String,
    pub(super) metrics: String,
    pub(super) data: PathBuf,
    pub(super) config: PathBuf,
    /// Milvus's API: `None` off; `Some("")` on a port the server picks, then its address.
    pub(super) milvus: Option<String>,
}

impl Drop for WaldenServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl WaldenServer {
    pub(super) async fn start(config_text: &str, data: &Path) -> anyhow::Result<Self> {
        Self::start_as(config_text, data, false).await
    }

    /// A server that also serves Milvus's API (its address in `milvus`).
    pub(super) async fn start_with_milvus(config_text: &str, data: &Path) -> anyhow::Result<Self> {
        Self::start_as(config_text, data, true).await
    }

    async fn start_as(config_text: &str, data: &Path, milvus: bool) -> anyhow::Result<Self> {
        let config = data.with_extension("bench.toml");
        std::fs::write(&config, config_text)?;
        // Port 0 at first: the server's ready file says what it bound; restarts reuse it.
        let mut s = Self {
            child: None,
            addr: "127.0.0.1:0".into(),
            metrics: "127.0.0.1:0".into(),
            data: data.to_owned(),
            config,
            milvus: milvus.then(String::new),
        };
        s.spawn_and_wait().await?;
        Ok(s)
    }

    pub(super) async fn spawn_and_wait(&mut self) -> anyhow::Result<Duration> {
        let started = Instant::now();
        let child = Command::new(std::env::current_exe()?)
            .args([
                "standalone",
                "--listen",
                &self.addr,
                "--metrics-listen",
                &self.metrics,
                "--milvus-listen",
                if self.milvus.is_some() {
                    "127.0.0.1:0"
                } else {
                    ""
                },
            ])
            .arg("--data-dir")
            .arg(&self.data)
            .arg("--config")
            .arg(&self.config)
            .arg("--ready-file")
            .arg(self.data.with_extension("ready"))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .context("starting walden standalone")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(600);
        while self.addr.ends_with(":0") {
            if let Ok(t) = std::fs::read_to_string(self.data.with_extension("ready"))
                && let Ok(doc) = serde_json::from_str::<serde_json::Value>(&t)
            {
                self.addr = doc["grpc"].as_str().unwrap_or_default().to_owned();
                self.metrics = doc["http"].as_str().unwrap_or_default().to_owned();
                if self.milvus.is_some() {
                    self.milvus = doc["milvus"].as_str().map(str::to_owned);
                }
            }
            anyhow::ensure!(Instant::now() < deadline, "walden did not become ready");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        loop {
            if let Ok(c) = Client::connect(&self.addr).await
                && c.status().await.is_ok()
            {
                return Ok(started.elapsed());
            }
            anyhow::ensure!(Instant::now() < deadline, "walden did not become ready");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    pub(super) async fn kill_and_restart(&mut self) -> anyhow::Result<Duration> {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.spawn_and_wait().await
    }

    pub(super) fn pid(&self) -> Option<String> {
        self.child.as_ref().map(|c| c.id().to_string())
    }
}

/// CPU seconds (user + system) of a process, from /proc.
pub(super) fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// fdatasyncs from the server's metrics endpoint: the storage-wide count where pchannels
/// share them, else the sum over pchannels.
/// What the bench reads from a Walden server's `/metrics`.
#[derive(Clone, Copy)]
pub(super) struct NodeCounters {
    pub(super) syncs: u64,
    pub(super) append_sum_s: f64,
    pub(super) append_count: u64,
    /// Object-storage WAL: fragment uploads and their bytes.
    pub(super) puts: u64,
    pub(super) put_bytes: u64,
    /// Object-storage WAL: bytes read from the store (catch-up reads past the write-ahead
    /// buffer, recovery).
    pub(super) get_bytes: u64,
}

/// The text of a server's `/metrics`.
pub(super) async fn scrape(metrics_addr: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(metrics_addr).await.ok()?;
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .await
        .ok()?;
    let mut body = String::new();
    stream.read_to_string(&mut body).await.ok()?;
    Some(body)
}

pub(super) async fn scrape_node(metrics_addr: &str) -> Option<NodeCounters> {
    let body = scrape(metrics_addr).await?;
    let value = |l: &str| l.rsplit(' ').next()?.parse::<f64>().ok();
    let sum_of = |prefix: &str| -> f64 {
        body.lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(value)
            .sum()
    };
    let syncs = match body
        .lines()
        .find(|l| l.starts_with("walden_wal_storage_syncs "))
        .and_then(value)
        .filter(|v| *v > 0.0)
    {
        Some(shared) => shared as u64,
        None => sum_of("walden_wal_syncs{") as u64,
    };
    Some(NodeCounters {
        syncs,
        append_sum_s: sum_of("walden_append_latency_seconds_sum"),
        append_count: sum_of("walden_append_latency_seconds_count") as u64,
        puts: sum_of("walden_object_store_requests_total{op=\"put_if_absent\"}") as u64,
        put_bytes: sum_of("walden_object_store_bytes_total{op=\"put\"}") as u64,
        get_bytes: sum_of("walden_object_store_bytes_total{op=\"get\"}") as u64,
    })
}
