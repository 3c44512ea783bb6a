//! `walden bench`: throughput and latency, with the machine's own fsync limit measured in the
//! same run.
//!
//! * `append`: N producers over M pchannels, each with a window of messages in flight, at max
//!   rate or a fixed rate. Latency is from the *intended* send time at a fixed rate (no
//!   coordinated omission), from the send call at max rate, to the durable acknowledgement.
//! * `e2e`: append-to-consume latency: tailing consumers receive what producers send at a fixed
//!   rate; each payload carries its send time.
//! * `disk`: `write` + `fdatasync` of a given size in a loop on the data dir's file system: the
//!   limit any durable log on this machine lives under.
//!
//! Without `--addr`, the bench starts `walden standalone` itself on a fresh data dir.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use bytes::{BufMut, Bytes, BytesMut};
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use walden_client::{Client, ConsumerOptions, DeliverFrom, ProducerOptions};
use walden_message::{MessageType, MutableMessage};

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    workload: Workload,
}

#[derive(clap::Subcommand, Debug)]
enum Workload {
    /// Durable append throughput and ack latency.
    Append(AppendArgs),
    /// Append-to-consume latency of tailing consumers.
    E2e(AppendArgs),
    /// Raw write + fdatasync rate of this machine's disk.
    Disk(DiskArgs),
}

#[derive(clap::Args, Debug, Clone)]
struct AppendArgs {
    /// Target a running server instead of starting one.
    #[arg(long)]
    addr: Option<String>,
    /// Pchannels used (and served, when the bench starts the server).
    #[arg(long, default_value_t = 16)]
    pchannels: u32,
    /// Producers (default: one per pchannel).
    #[arg(long)]
    producers: Option<usize>,
    /// Messages in flight, in all.
    #[arg(long, default_value_t = 64)]
    inflight: usize,
    /// Payload bytes per message.
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// How long each run lasts, e.g. 10s, 500ms.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Messages per second in all (0: as fast as possible). e2e defaults to 1000.
    #[arg(long)]
    rate: Option<u64>,
    /// Runs; the report gives each and the median.
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// Also write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Data dir for the server the bench starts (default: a fresh temp dir).
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

#[derive(clap::Args, Debug, Clone)]
struct DiskArgs {
    /// Bytes per write.
    #[arg(long, default_value_t = 4096)]
    size: usize,
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    duration: Duration,
    /// Directory to write in (default: a temp dir).
    #[arg(long)]
    dir: Option<PathBuf>,
    #[arg(long)]
    json: Option<PathBuf>,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .map_or((s, "s"), |i| (&s[..i], &s[i..]));
    let n: f64 = num.parse().map_err(|_| format!("bad duration {s:?}"))?;
    let secs = match unit {
        "s" => n,
        "ms" => n / 1000.0,
        "m" => n * 60.0,
        _ => return Err(format!("bad duration unit in {s:?} (use ms, s or m)")),
    };
    if !(secs.is_finite() && secs > 0.0) {
        return Err(format!("duration {s:?} must be positive"));
    }
    Ok(Duration::from_secs_f64(secs))
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    match args.workload {
        Workload::Append(a) => run_workload(a, false).await,
        Workload::E2e(a) => run_workload(a, true).await,
        Workload::Disk(d) => {
            let dir = match &d.dir {
                Some(p) => p.clone(),
                None => std::env::temp_dir(),
            };
            let r = disk_probe(&dir, d.size, d.duration)?;
            println!("{}", r.table_row("disk"));
            write_json(
                d.json.as_deref(),
                &json!({ "workload": "disk", "disk": r.to_json() }),
            )
        }
    }
}

// ------------------------------------------------------------------------------------------------

/// Latencies in microseconds and counts of one run.
#[derive(Debug, Clone)]
struct RunResult {
    msgs: u64,
    bytes: u64,
    elapsed: Duration,
    hist: Histogram<u64>,
    errors: u64,
    cpu_server_s: Option<f64>,
    cpu_client_s: f64,
    syncs: Option<u64>,
}

impl RunResult {
    fn msgs_per_s(&self) -> f64 {
        self.msgs as f64 / self.elapsed.as_secs_f64()
    }
    fn mib_per_s(&self) -> f64 {
        self.bytes as f64 / self.elapsed.as_secs_f64() / (1 << 20) as f64
    }
    fn ms(&self, q: f64) -> f64 {
        self.hist.value_at_quantile(q) as f64 / 1000.0
    }
    fn to_json(&self) -> Value {
        json!({
            "msgs": self.msgs,
            "msgs_per_s": round(self.msgs_per_s()),
            "mib_per_s": round(self.mib_per_s()),
            "errors": self.errors,
            "latency_ms": {
                "p50": round(self.ms(0.5)), "p90": round(self.ms(0.9)), "p99": round(self.ms(0.99)),
                "p999": round(self.ms(0.999)), "max": round(self.hist.max() as f64 / 1000.0),
            },
            "cpu_server_s": self.cpu_server_s.map(round),
            "cpu_client_s": round(self.cpu_client_s),
            "fsyncs": self.syncs,
            "fsyncs_per_msg": self.syncs.map(|s| round(s as f64 / self.msgs.max(1) as f64)),
        })
    }
    fn table_row(&self, name: &str) -> String {
        format!(
            "{name:<10} {:>11.0} {:>9.1} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>7}",
            self.msgs_per_s(),
            self.mib_per_s(),
            self.ms(0.5),
            self.ms(0.9),
            self.ms(0.99),
            self.ms(0.999),
            self.hist.max() as f64 / 1000.0,
            self.errors
        )
    }
}

fn round(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

const TABLE_HEADER: &str =
    "system        msgs/s     MiB/s  p50 ms   p90 ms   p99 ms  p999 ms   max ms  errors";

fn new_hist() -> Histogram<u64> {
    // 1 us .. 60 s, 3 significant digits.
    Histogram::new_with_bounds(1, 60_000_000, 3)
        .unwrap_or_else(|_| Histogram::new(3).unwrap_or_else(|_| unreachable!()))
}

// ------------------------------------------------------------------------------------------------
// The server the bench starts.

struct BenchServer {
    child: Child,
    addr: String,
    metrics: String,
    _dir: Option<tempfile::TempDir>,
}

impl Drop for BenchServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_addr() -> anyhow::Result<String> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .to_string())
}

async fn start_server(pchannels: u32, data_dir: Option<&Path>) -> anyhow::Result<BenchServer> {
    let (dir, path) = match data_dir {
        Some(p) => (None, p.to_owned()),
        None => {
            let d = tempfile::Builder::new()
                .prefix("walden-bench-")
                .tempdir_in(".")?;
            let p = d.path().to_owned();
            (Some(d), p)
        }
    };
    let addr = free_addr()?;
    let metrics = free_addr()?;
    let config = path.with_extension("bench.toml");
    std::fs::write(&config, format!("[node]\npchannels = {pchannels}\n"))?;
    let child = Command::new(std::env::current_exe()?)
        .args([
            "standalone",
            "--listen",
            &addr,
            "--metrics-listen",
            &metrics,
        ])
        .arg("--data-dir")
        .arg(&path)
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .context("starting walden standalone")?;
    let server = BenchServer {
        child,
        addr: addr.clone(),
        metrics,
        _dir: dir,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(c) = Client::connect(&addr).await
            && c.status().await.is_ok()
        {
            return Ok(server);
        }
        anyhow::ensure!(Instant::now() < deadline, "walden did not become ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// CPU seconds (user + system) of a process, from /proc.
fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// Sum of `walden_wal_syncs` from the server's metrics endpoint.
async fn scrape_syncs(metrics_addr: &str) -> Option<u64> {
    let mut stream = tokio::net::TcpStream::connect(metrics_addr).await.ok()?;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .await
        .ok()?;
    let mut body = String::new();
    stream.read_to_string(&mut body).await.ok()?;
    Some(
        body.lines()
            .filter(|l| l.starts_with("walden_wal_syncs{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64,
    )
}

// ------------------------------------------------------------------------------------------------
// append and e2e.

async fn run_workload(a: AppendArgs, e2e: bool) -> anyhow::Result<()> {
    anyhow::ensure!(
        a.pchannels > 0 && a.inflight > 0 && a.runs > 0,
        "counts must be positive"
    );
    anyhow::ensure!(
        a.size >= 16,
        "--size must be at least 16 (the payload carries a timestamp)"
    );
    let rate = a.rate.unwrap_or(if e2e { 1000 } else { 0 });
    let server = match &a.addr {
        Some(_) => None,
        None => Some(start_server(a.pchannels, a.data_dir.as_deref()).await?),
    };
    let addr = a
        .addr
        .clone()
        .or_else(|| server.as_ref().map(|s| s.addr.clone()))
        .context("no server address")?;
    let name = if e2e { "e2e" } else { "append" };
    eprintln!(
        "walden bench {name}: {} pchannels, {} producers, {} in flight, {} B messages, {}, {:?} x {} runs",
        a.pchannels,
        a.producers.unwrap_or(a.pchannels as usize),
        a.inflight,
        a.size,
        if rate == 0 {
            "max rate".to_owned()
        } else {
            format!("{rate} msg/s")
        },
        a.duration,
        a.runs
    );
    let mut runs = Vec::new();
    for i in 0..a.runs {
        let syncs_before = match &server {
            Some(s) => scrape_syncs(&s.metrics).await,
            None => None,
        };
        let cpu_before = server
            .as_ref()
            .and_then(|s| cpu_seconds(&s.child.id().to_string()));
        let client_before = cpu_seconds("self").unwrap_or(0.0);
        let mut r = one_run(&addr, &a, rate, e2e).await?;
        r.cpu_client_s = cpu_seconds("self").unwrap_or(0.0) - client_before;
        r.cpu_server_s = match (&server, cpu_before) {
            (Some(s), Some(b)) => cpu_seconds(&s.child.id().to_string()).map(|x| x - b),
            _ => None,
        };
        if let (Some(s), Some(b)) = (&server, syncs_before) {
            r.syncs = scrape_syncs(&s.metrics).await.map(|x| x.saturating_sub(b));
        }
        eprintln!(
            "run {}: {}",
            i + 1,
            r.table_row("walden").trim_start_matches("walden").trim()
        );
        runs.push(r);
    }
    let mut sorted = runs.clone();
    sorted.sort_by(|x, y| x.msgs_per_s().total_cmp(&y.msgs_per_s()));
    let median = sorted[sorted.len() / 2].clone();

    // The machine's limit at the commit size Walden used.
    let disk = if e2e {
        None
    } else {
        let commit = match median.syncs {
            Some(s) if s > 0 => ((median.bytes / s) as usize).max(512),
            _ => a.size * a.inflight,
        };
        let dir = a.data_dir.clone().unwrap_or_else(|| PathBuf::from("."));
        Some(disk_probe(&dir, commit, Duration::from_secs(2))?)
    };
    println!("{TABLE_HEADER}");
    println!("{}", median.table_row("walden"));
    if let Some(d) = &disk {
        println!("{}", d.table_row("disk"));
        println!(
            "walden/disk bandwidth: {:.2} (disk: {} B write + fdatasync)",
            median.mib_per_s() / d.mib_per_s().max(1e-9),
            d.size
        );
    }
    if let (Some(s), true) = (median.syncs, median.msgs > 0) {
        println!(
            "fsyncs per message: {:.4}; CPU s: server {}, client {:.2}",
            s as f64 / median.msgs as f64,
            median
                .cpu_server_s
                .map_or("n/a".into(), |c| format!("{c:.2}")),
            median.cpu_client_s
        );
    }
    let report = json!({
        "workload": name,
        "params": {
            "pchannels": a.pchannels, "producers": a.producers.unwrap_or(a.pchannels as usize),
            "inflight": a.inflight, "size": a.size, "rate": rate,
            "duration_s": a.duration.as_secs_f64(), "runs": a.runs,
        },
        "walden": median.to_json(),
        "runs": runs.iter().map(RunResult::to_json).collect::<Vec<_>>(),
        "disk": disk.as_ref().map(DiskResult::to_json),
        "ratio_to_disk": disk.as_ref().map(|d| round(median.mib_per_s() / d.mib_per_s().max(1e-9))),
        "ratio_to_peer": Value::Null,
    });
    write_json(a.json.as_deref(), &report)
}

fn write_json(path: Option<&Path>, v: &Value) -> anyhow::Result<()> {
    if let Some(p) = path {
        let mut f =
            std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?;
        writeln!(f, "{}", serde_json::to_string_pretty(v)?)?;
    }
    Ok(())
}

fn payload(size: usize, sent_us: u64) -> Bytes {
    let mut b = BytesMut::with_capacity(size);
    b.put_u64_le(sent_us);
    b.resize(size, b'x');
    b.freeze()
}

async fn one_run(addr: &str, a: &AppendArgs, rate: u64, e2e: bool) -> anyhow::Result<RunResult> {
    let client = Client::connect(addr).await?;
    let producers = a.producers.unwrap_or(a.pchannels as usize).max(1);
    let window = (a.inflight / producers).max(1);
    let origin = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let hist = Arc::new(Mutex::new(new_hist()));
    let acked = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));

    // e2e: one tailing consumer per pchannel measures receive time minus send time.
    let mut consumers = Vec::new();
    if e2e {
        for p in 0..a.pchannels {
            let mut c = client.consumer(
                &format!("walden-dml-{p}"),
                ConsumerOptions {
                    from: DeliverFrom::Latest,
                    types: Some(vec![MessageType::Insert]),
                    ..ConsumerOptions::default()
                },
            );
            let hist = hist.clone();
            let stop = stop.clone();
            consumers.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let Ok(Some(Ok(m))) =
                        tokio::time::timeout(Duration::from_millis(200), c.next()).await
                    else {
                        continue;
                    };
                    if m.payload.len() >= 8 {
                        let sent = u64::from_le_bytes(m.payload[..8].try_into().unwrap_or([0; 8]));
                        let now = origin.elapsed().as_micros() as u64;
                        let _ = hist
                            .lock()
                            .map(|mut h| h.record(now.saturating_sub(sent).max(1)));
                    }
                }
            }));
        }
        // Let the consumers attach before anything is sent.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    let per_producer_interval =
        (rate > 0).then(|| Duration::from_secs_f64(producers as f64 / rate as f64));
    let deadline = origin + Duration::from_millis(if e2e { 300 } else { 0 }) + a.duration;
    let mut tasks = Vec::new();
    for i in 0..producers {
        let p = client.producer(
            &format!("walden-dml-{}", i % a.pchannels as usize),
            ProducerOptions {
                max_in_flight: window,
                ..ProducerOptions::default()
            },
        );
        let (hist, acked, errors) = (hist.clone(), acked.clone(), errors.clone());
        let size = a.size;
        let vchannel = format!("bench-{i}");
        tasks.push(tokio::spawn(async move {
            let mut local = new_hist();
            let mut pending = std::collections::VecDeque::new();
            let start = Instant::now();
            let mut n = 0u64;
            loop {
                // At a fixed rate the clock says when each message should go.
                let intended = match per_producer_interval {
                    Some(iv) => {
                        let t = start + iv.mul_f64(n as f64);
                        if t >= deadline {
                            break;
                        }
                        tokio::time::sleep_until(t.into()).await;
                        t
                    }
                    None => {
                        let now = Instant::now();
                        if now >= deadline {
                            break;
                        }
                        now
                    }
                };
                n += 1;
                let sent_us = intended.duration_since(origin).as_micros() as u64;
                let msg = MutableMessage::new(
                    MessageType::Insert,
                    vchannel.clone(),
                    payload(size, sent_us),
                );
                let Ok(fut) = p.send(msg).await else { break };
                pending.push_back((intended, fut));
                while pending.len() >= window {
                    settle(&mut pending, &mut local, &acked, &errors, e2e).await;
                }
            }
            while !pending.is_empty() {
                settle(&mut pending, &mut local, &acked, &errors, e2e).await;
            }
            if !e2e && let Ok(mut h) = hist.lock() {
                let _ = h.add(&local);
            }
        }));
    }
    let progress = {
        let acked = acked.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut last = 0;
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let now = acked.load(Ordering::Relaxed);
                eprint!("\r  {:>10} acked, {:>9} msg/s   ", now, now - last);
                last = now;
            }
            eprint!("\r{:60}\r", "");
        })
    };
    for t in tasks {
        t.await?;
    }
    let elapsed = origin
        .elapsed()
        .saturating_sub(Duration::from_millis(if e2e { 300 } else { 0 }));
    if e2e {
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for c in consumers {
        let _ = c.await;
    }
    let _ = progress.await;
    let msgs = acked.load(Ordering::Relaxed);
    let hist = hist
        .lock()
        .map(|h| h.clone())
        .unwrap_or_else(|_| new_hist());
    Ok(RunResult {
        msgs,
        bytes: msgs * a.size as u64,
        elapsed,
        hist,
        errors: errors.load(Ordering::Relaxed),
        cpu_server_s: None,
        cpu_client_s: 0.0,
        syncs: None,
    })
}

async fn settle(
    pending: &mut std::collections::VecDeque<(
        Instant,
        impl Future<Output = Result<walden_client::AppendResult, walden_client::ClientError>>,
    )>,
    hist: &mut Histogram<u64>,
    acked: &AtomicU64,
    errors: &AtomicU64,
    e2e: bool,
) {
    let Some((intended, fut)) = pending.pop_front() else {
        return;
    };
    match fut.await {
        Ok(_) => {
            acked.fetch_add(1, Ordering::Relaxed);
            if !e2e {
                let _ = hist.record((intended.elapsed().as_micros() as u64).max(1));
            }
        }
        Err(_) => {
            errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}

// ------------------------------------------------------------------------------------------------
// disk.

#[derive(Debug, Clone)]
struct DiskResult {
    size: usize,
    ops: u64,
    elapsed: Duration,
    hist: Histogram<u64>,
}

impl DiskResult {
    fn mib_per_s(&self) -> f64 {
        (self.ops * self.size as u64) as f64 / self.elapsed.as_secs_f64() / (1 << 20) as f64
    }
    fn to_json(&self) -> Value {
        let ms = |q: f64| round(self.hist.value_at_quantile(q) as f64 / 1000.0);
        json!({
            "write_bytes": self.size,
            "syncs_per_s": round(self.ops as f64 / self.elapsed.as_secs_f64()),
            "mib_per_s": round(self.mib_per_s()),
            "latency_ms": { "p50": ms(0.5), "p99": ms(0.99), "p999": ms(0.999), "max": round(self.hist.max() as f64 / 1000.0) },
        })
    }
    fn table_row(&self, name: &str) -> String {
        let ms = |q: f64| self.hist.value_at_quantile(q) as f64 / 1000.0;
        format!(
            "{name:<10} {:>11.0} {:>9.1} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>7}",
            self.ops as f64 / self.elapsed.as_secs_f64(),
            self.mib_per_s(),
            ms(0.5),
            ms(0.9),
            ms(0.99),
            ms(0.999),
            self.hist.max() as f64 / 1000.0,
            0
        )
    }
}

/// Appends `size` bytes and `fdatasync`s, in a loop, for `duration`: what a log that syncs every
/// commit of that size can do at best on this file system.
fn disk_probe(dir: &Path, size: usize, duration: Duration) -> anyhow::Result<DiskResult> {
    let path = dir.join(format!(".walden-disk-probe-{}", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    let buf = vec![0xa5u8; size];
    let mut hist = new_hist();
    let start = Instant::now();
    let mut ops = 0u64;
    let mut written = 0u64;
    while start.elapsed() < duration {
        let t = Instant::now();
        f.write_all(&buf)?;
        f.sync_data()?;
        let _ = hist.record((t.elapsed().as_micros() as u64).max(1));
        ops += 1;
        written += size as u64;
        // Keep the file bounded, like a log that rolls segments.
        if written > 256 << 20 {
            f.set_len(0)?;
            written = 0;
        }
    }
    let elapsed = start.elapsed();
    drop(f);
    let _ = std::fs::remove_file(&path);
    Ok(DiskResult {
        size,
        ops,
        elapsed,
        hist,
    })
}
