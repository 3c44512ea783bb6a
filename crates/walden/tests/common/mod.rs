//! Starts real `walden standalone` processes for integration tests.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use walden_client::Client;

pub mod cluster;
pub mod load;
pub mod netns;

pub const WALDEN: &str = env!("CARGO_BIN_EXE_walden");

/// Runs the CLI with no stdin.
pub fn walden(args: &[&str]) -> std::process::Output {
    Command::new(WALDEN)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run walden")
}

/// Runs a command that must succeed and print one JSON document.
pub fn ok_json(args: &[&str]) -> serde_json::Value {
    let out = walden(args);
    assert!(
        out.status.success(),
        "walden {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON document")
}

/// The pyarrow reader of flushed files (see the script's docs).
const PARQUET_ROWS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/parquet_rows.py");

/// What pyarrow finds in the files `walden segments --json` names: the live rows, sorted by
/// the primary key `pk`, and how often each key is in the data files.
pub fn parquet_rows(segments: &serde_json::Value, pk: &str) -> serde_json::Value {
    use std::io::Write as _;
    let mut child = Command::new("python3")
        .arg(PARQUET_ROWS)
        .arg(pk)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 (scripts/install-test-deps.sh installs pyarrow)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(segments.to_string().as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("python3");
    assert!(
        out.status.success(),
        "parquet_rows.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("its JSON")
}

/// A standalone server process on its own data dir and port.
pub struct Server {
    pub addr: String,
    /// The HTTP address of /metrics and /healthz, when enabled.
    pub metrics_addr: Option<String>,
    pub data_dir: PathBuf,
    pub config: Option<PathBuf>,
    /// How clients reach it (token, TLS); the readiness check uses it too.
    pub connect: walden_client::ConnectOptions,
    /// Where its stderr goes (inherited when none).
    pub log: Option<PathBuf>,
    child: Option<Child>,
}

impl Server {
    /// Starts a server on `data_dir` and waits until it answers.
    pub async fn start(data_dir: &Path, config: Option<&str>) -> Self {
        Self::start_with(data_dir, config, false).await
    }

    /// Like [`Server::start`], optionally serving /metrics and /healthz on a free port.
    pub async fn start_with(data_dir: &Path, config: Option<&str>, metrics: bool) -> Self {
        let config = config.map(|text| {
            let p = data_dir.with_extension("toml");
            std::fs::write(&p, text).expect("write config");
            p
        });
        // Port 0: the server binds what the kernel picks and says which in its ready file, so
        // no port is picked here, released, and lost to a race before the server binds it.
        let mut s = Self {
            addr: "127.0.0.1:0".into(),
            metrics_addr: metrics.then(|| "127.0.0.1:0".into()),
            data_dir: data_dir.to_owned(),
            config,
            connect: walden_client::ConnectOptions::default(),
            log: None,
            child: None,
        };
        s.restart().await;
        s
    }

    /// A server with TLS and/or tokens in its config, reached with `connect`, logging to
    /// `log`, with /metrics and /healthz on.
    pub async fn start_secure(
        data_dir: &Path,
        config: &str,
        connect: walden_client::ConnectOptions,
        log: PathBuf,
    ) -> Self {
        let p = data_dir.with_extension("toml");
        std::fs::write(&p, config).expect("write config");
        let mut s = Self {
            addr: "127.0.0.1:0".into(),
            metrics_addr: Some("127.0.0.1:0".into()),
            data_dir: data_dir.to_owned(),
            config: Some(p),
            connect,
            log: Some(log),
            child: None,
        };
        s.restart().await;
        s
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn spawn(&self) -> Child {
        let mut cmd = Command::new(WALDEN);
        let metrics = self.metrics_addr.clone().unwrap_or_default();
        cmd.args([
            "standalone",
            "--listen",
            &self.addr,
            "--metrics-listen",
            &metrics,
            // Milvus's API on a port of the kernel's choosing (its ready file names it).
            "--milvus-listen",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(&self.data_dir)
        .arg("--ready-file")
        .arg(self.ready_file())
        .env("RUST_LOG", if self.log.is_some() { "info" } else { "warn" })
        .stdout(Stdio::null())
        .stderr(match &self.log {
            Some(p) => Stdio::from(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .expect("log file"),
            ),
            None => Stdio::inherit(),
        });
        if let Some(c) = &self.config {
            cmd.arg("--config").arg(c);
        }
        cmd.spawn().expect("spawn walden")
    }

    fn ready_file(&self) -> PathBuf {
        self.data_dir.with_extension("ready")
    }

    /// (Re)starts the process and waits until its status call answers. A restart binds the
    /// ports the first start was given.
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let _ = std::fs::remove_file(self.ready_file());
        self.child = Some(self.spawn());
        let deadline = Instant::now() + Duration::from_secs(30);
        let ready = loop {
            if let Ok(text) = std::fs::read_to_string(self.ready_file())
                && let Ok(doc) = serde_json::from_str::<serde_json::Value>(&text)
            {
                break doc;
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!("walden exited during startup: {status}");
            }
            assert!(
                Instant::now() < deadline,
                "walden never wrote its ready file"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        self.addr = ready["grpc"].as_str().expect("grpc address").to_owned();
        if self.metrics_addr.is_some() {
            self.metrics_addr = ready["http"].as_str().map(str::to_owned);
        }
        loop {
            if let Ok(c) = Client::connect_with(&self.addr, &self.connect).await
                && c.status().await.is_ok()
            {
                return;
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!("walden exited during startup: {status}");
            }
            assert!(Instant::now() < deadline, "walden did not become ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// kill -9.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        c.wait().expect("wait")
    }

    pub async fn client(&self) -> Client {
        Client::connect_with(&self.addr, &self.connect)
            .await
            .expect("connect")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// GET `path` from an HTTP/1.0 server: (status, body).
pub async fn http_get(addr: &str, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let status = out.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = out
        .split_once("\r\n\r\n")
        .map(|x| x.1)
        .unwrap_or("")
        .to_owned();
    (status, body)
}

/// The sum of every sample whose line starts with `prefix` in a Prometheus exposition.
pub fn metric(body: &str, prefix: &str) -> f64 {
    body.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Every message of `pchannel` from the first through the last one its owner (a standalone
/// server, or a cluster node) reports in its status now, in delivery order.
pub async fn read_to_end(client: &Client, pchannel: &str) -> Vec<walden_message::ImmutableMessage> {
    let last = client
        .status_of(pchannel)
        .await
        .unwrap()
        .pchannels
        .into_iter()
        .find(|p| p.name == pchannel)
        .unwrap_or_else(|| panic!("{pchannel} is not in the status"))
        .last_message_id;
    let mut consumer = client.consumer(pchannel, walden_client::ConsumerOptions::default());
    let mut out = Vec::new();
    loop {
        let m = tokio::time::timeout(Duration::from_secs(20), consumer.next())
            .await
            .unwrap_or_else(|_| panic!("{pchannel}: no message within 20 s"))
            .expect("consumer open")
            .expect("message");
        let done = m.id.0 >= last;
        out.push(m);
        if done {
            return out;
        }
    }
}

/// Awaits `f`, failing the test after 30 s instead of hanging it.
pub async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(30), f)
        .await
        .expect("no answer within 30 s")
}

/// What `walden produce` did through a fault: one JSON line per input line, its stderr and exit
/// status, and how long it ran after the fault.
pub struct ProduceRun {
    /// Line `n` (from 1) carried the payload `{tag}-{n - 1}`.
    pub tag: String,
    pub outputs: Vec<serde_json::Value>,
    pub stderr: String,
    pub status: std::process::ExitStatus,
    pub after_fault: Duration,
}

impl ProduceRun {
    /// The payloads of the acknowledged lines.
    pub fn acknowledged(&self) -> Vec<String> {
        self.outputs
            .iter()
            .filter(|o| o.get("error").is_none())
            .map(|o| o["payload"].as_str().expect("payload").to_owned())
            .collect()
    }

    /// How many lines were not acknowledged (not written, or in doubt).
    pub fn refused(&self) -> usize {
        self.outputs
            .iter()
            .filter(|o| o.get("error").is_some())
            .count()
    }

    /// How many lines were sent and never acknowledged: they may be in the log.
    pub fn in_doubt(&self) -> usize {
        self.outputs
            .iter()
            .filter(|o| o["in_doubt"] == serde_json::json!(true))
            .count()
    }

    /// The payloads of the lines reported not written: none may be in the log.
    pub fn not_written(&self) -> Vec<String> {
        self.outputs
            .iter()
            .filter(|o| o.get("error").is_some() && o["in_doubt"] != serde_json::json!(true))
            .map(|o| {
                let n = o["line"].as_u64().expect("line");
                format!("{}-{}", self.tag, n - 1)
            })
            .collect()
    }
}

/// Pipes `lines` lines (`{tag}-{n}`) into `walden produce --json` with `args`; once `before` of
/// them are acknowledged, runs `fault`, then sends the rest and closes stdin. Fails the test if
/// the command is still running `limit` after the fault (it is killed).
pub fn produce_through(
    args: &[&str],
    tag: &str,
    lines: usize,
    before: usize,
    limit: Duration,
    fault: impl FnOnce(),
) -> ProduceRun {
    use std::io::{BufRead as _, Write as _};
    let mut child = Command::new(WALDEN)
        .arg("produce")
        .args(args)
        .arg("--json")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn walden produce");
    let mut stdin = child.stdin.take().expect("stdin");
    let stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            let doc: serde_json::Value = serde_json::from_str(&line).expect("a JSON line");
            if tx.send(doc).is_err() {
                return;
            }
        }
    });
    let errors = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut s);
        s
    });
    for n in 0..before {
        writeln!(stdin, "{tag}-{n}").expect("write a line");
    }
    stdin.flush().expect("flush");
    let mut outputs = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while outputs.len() < before {
        let left = deadline.saturating_duration_since(Instant::now());
        let doc = rx
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("only {} of {before} lines answered", outputs.len()));
        assert!(doc.get("error").is_none(), "before the fault: {doc}");
        outputs.push(doc);
    }
    fault();
    let faulted = Instant::now();
    // The rest may not all fit in the pipe while the command waits: write from a thread.
    let writer = {
        let tag = tag.to_owned();
        std::thread::spawn(move || {
            for n in before..lines {
                if writeln!(stdin, "{tag}-{n}").is_err() {
                    return;
                }
            }
        })
    };
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if faulted.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "walden produce still running {limit:?} after the fault ({} lines answered)",
                outputs.len() + rx.try_iter().count()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let after_fault = faulted.elapsed();
    let _ = writer.join();
    let _ = reader.join();
    outputs.extend(rx.try_iter());
    ProduceRun {
        tag: tag.to_owned(),
        outputs,
        stderr: errors.join().unwrap_or_default(),
        status,
        after_fault,
    }
}

/// Asserts what every outage run must show: one answer per line, in input order, the refused
/// ones counted in the closing line, a failed exit, and an end within `bound` of the fault.
pub fn assert_ended_honestly(run: &ProduceRun, lines: usize, bound: Duration, what: &str) {
    assert_eq!(run.outputs.len(), lines, "{what}: one answer per line");
    for (i, o) in run.outputs.iter().enumerate() {
        assert_eq!(
            o["line"],
            serde_json::json!(i + 1),
            "{what}: in input order"
        );
    }
    let refused = run.refused();
    assert!(refused > 0, "{what}: some lines must be refused");
    let doubt = run.in_doubt();
    let closing = if doubt == 0 {
        format!("{refused} of {lines} lines were not written")
    } else {
        format!(
            "{refused} of {lines} lines were not acknowledged: {} not written, {doubt} in doubt",
            refused - doubt
        )
    };
    assert!(
        run.stderr.contains(&closing),
        "{what}: {closing:?} in {}",
        run.stderr.lines().last().unwrap_or_default()
    );
    assert!(!run.status.success(), "{what}: exit status {}", run.status);
    assert!(
        run.after_fault <= bound,
        "{what}: exited {:?} after the fault (bound {bound:?})",
        run.after_fault
    );
}
