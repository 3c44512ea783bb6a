//! `walden bench`: throughput and latency of durable appends, reported beside the machine's own
//! fsync limit and a real peer measured in the same run.
//!
//! * `append`: N producers over M pchannels, a window of messages in flight in all, at max rate or
//!   a fixed rate. Latency runs from the *intended* send time (at a fixed rate the schedule says
//!   when each message should have gone, so a stalled system is charged for the wait: no
//!   coordinated omission) to the durable acknowledgement.
//! * `e2e`: append-to-consume latency of tailing consumers; each payload carries its intended send
//!   time.
//! * `catchup`: read throughput of consumers starting from the earliest message, after a preload.
//! * `recovery`: time from process start to serving after kill -9, after a preload.
//! * `disk`: `write` + `fdatasync` of one size in a loop: the limit any durable log lives under.
//! * `objstore`: raw create-if-absent PUTs and GETs of an object store, 1 and N in flight: the
//!   limit the object-storage WAL lives under. With `--wal-storage object`, the other workloads
//!   run on that WAL and are set beside it.
//!
//! * `flush`: sealed segments to Parquet under a steady insert load: rows/s, MiB/s, flush
//!   latency and lag, WAL bytes over time.
//!
//! `--peer redis` runs the same workload against Redis Streams with `appendfsync always` (a reply
//! means fsynced), alternating with Walden run by run. Without `--addr`, the bench starts
//! `walden standalone` itself on a fresh data dir.

mod disk;
mod failover;
mod flush;
mod milvus;
mod objstore;
mod redis;
mod report;
mod search;
mod server;

use disk::*;
use report::*;
use server::*;

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
use futures::future::BoxFuture;
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use walden_client::{Client, ClientError, ConsumerOptions, DeliverFrom, ProducerOptions};
use walden_message::{MessageType, MutableMessage};

use self::redis::RedisServer;

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    workload: Workload,
}

#[derive(clap::Subcommand, Debug)]
enum Workload {
    /// Durable append throughput and ack latency.
    Append(Args),
    /// Append-to-consume latency of tailing consumers.
    E2e(Args),
    /// Read throughput from the earliest message, after a preload.
    Catchup(Args),
    /// Time from process start to serving after kill -9, after a preload.
    Recovery(Args),
    /// Raw write + fdatasync rate of this machine's disk.
    Disk(DiskArgs),
    /// Raw create-if-absent PUTs (and GETs) of an object store, 1 and N in flight: the
    /// object-storage WAL's limit.
    Objstore(objstore::ObjStoreArgs),
    /// Time from a planned move or a node's kill -9 to the first append acknowledged by each
    /// moved pchannel's new owner, on a cluster the bench starts (etcd, a coordinator, nodes).
    Failover(failover::FailoverArgs),
    /// Rows/s and MiB/s flushed to Parquet, flush latency and lag under a steady insert load,
    /// and WAL bytes over time.
    Flush(flush::FlushArgs),
    /// Insert, search right after it (growing rows) and once indexed, beside milvus-lite and
    /// lancedb (--peer) on the same data.
    Search(search::SearchArgs),
    /// The search workload through pymilvus: Walden's Milvus API beside milvus-lite, and the
    /// server CPU the Milvus API adds per search over the native API.
    Milvus(search::SearchArgs),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Append,
    E2e,
    Catchup,
    Recovery,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Self::Append => "append",
            Self::E2e => "e2e",
            Self::Catchup => "catchup",
            Self::Recovery => "recovery",
        }
    }
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Peer {
    Redis,
}

#[derive(clap::Args, Debug, Clone)]
struct Args {
    /// Target a running server instead of starting one (not for `recovery`).
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
    /// How long each append/e2e run lasts, e.g. 10s, 500ms.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Load sent to each system before its first append/e2e run, not measured: a fresh server
    /// faults in fresh memory for everything it buffers until its buffers are full, which is not
    /// what a running one does (the OpenMessaging Benchmark warms up too). 0s to measure cold.
    #[arg(long, default_value = "2s", value_parser = parse_duration_or_zero)]
    warmup: Duration,
    /// Messages per second in all (0: as fast as possible). e2e defaults to 1000.
    #[arg(long)]
    rate: Option<u64>,
    /// MiB written before a catchup or recovery run.
    #[arg(long, default_value_t = 256)]
    preload_mib: u64,
    /// Runs per system; the report gives each and the median.
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// Also run the same workload against this peer, alternating.
    #[arg(long, value_enum)]
    peer: Option<Peer>,
    /// Also write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Where the servers the bench starts keep their data (default: a temp dir under `.`).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// The local WAL layout of the server the bench starts: `shared` (one log for every
    /// pchannel) or `per_pchannel`.
    #[arg(long, default_value = "shared")]
    wal_layout: String,
    /// Where the server the bench starts keeps its WAL.
    #[arg(long, value_enum, default_value = "local")]
    wal_storage: WalStorage,
    /// With `--wal-storage object`: file:///abs/dir or s3://bucket/prefix.
    #[arg(long)]
    object_store: Option<String>,
    /// An S3-compatible endpoint for `--object-store` (http:// allowed).
    #[arg(long)]
    object_store_endpoint: Option<String>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum WalStorage {
    Local,
    Object,
}

#[derive(clap::Args, Debug, Clone)]
struct DiskArgs {
    /// Bytes per write.
    #[arg(long, default_value_t = 4096)]
    size: usize,
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    duration: Duration,
    /// Directory to write in (default: `.`).
    #[arg(long)]
    dir: Option<PathBuf>,
    #[arg(long)]
    json: Option<PathBuf>,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = parse_duration_or_zero(s)?;
    if d.is_zero() {
        return Err(format!("duration {s:?} must be positive"));
    }
    Ok(d)
}

fn parse_duration_or_zero(s: &str) -> Result<Duration, String> {
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
    if !(secs.is_finite() && secs >= 0.0) {
        return Err(format!("duration {s:?} must not be negative"));
    }
    Ok(Duration::from_secs_f64(secs))
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    match args.workload {
        Workload::Append(a) => compare(a, Kind::Append).await,
        Workload::E2e(a) => compare(a, Kind::E2e).await,
        Workload::Catchup(a) => compare(a, Kind::Catchup).await,
        Workload::Recovery(a) => compare(a, Kind::Recovery).await,
        Workload::Objstore(o) => objstore::run(o).await,
        Workload::Failover(f) => failover::run(f).await,
        Workload::Flush(f) => flush::run(f).await,
        Workload::Search(s) => search::run(s).await,
        Workload::Milvus(s) => milvus::run(s).await,
        Workload::Disk(d) => {
            let dir = d.dir.clone().unwrap_or_else(|| PathBuf::from("."));
            let r = disk_probe(&dir, d.size, d.duration)?;
            println!("{TABLE_HEADER}");
            println!("{}", r.table_row("disk"));
            write_json(
                d.json.as_deref(),
                &json!({ "workload": "disk", "disk": r.to_json() }),
            )
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Systems under test.

enum System<'a> {
    Walden {
        addr: &'a str,
        server: Option<&'a mut WaldenServer>,
    },
    Redis(&'a mut RedisServer),
}

impl System<'_> {
    fn name(&self) -> &'static str {
        match self {
            Self::Walden { .. } => "walden",
            Self::Redis(_) => "redis",
        }
    }
}

fn channel_name(i: usize) -> String {
    format!("walden-dml-{i}")
}

/// One producer's sending side: queues a message and returns what its acknowledgement is
/// waited on with.
trait Lane: Send {
    type Pending: Send;
    fn send(
        &mut self,
        payload: Bytes,
    ) -> impl Future<Output = anyhow::Result<Self::Pending>> + Send;
}

/// One producer's acknowledging side: waits for the acknowledgements in send order.
trait Acks: Send {
    type Pending: Send;
    fn ack(&mut self, pending: Self::Pending) -> impl Future<Output = anyhow::Result<()>> + Send;
}

type AckFuture = BoxFuture<'static, Result<walden_client::AppendResult, ClientError>>;

struct WaldenLane {
    producer: walden_client::Producer,
    vchannel: String,
}

impl Lane for WaldenLane {
    type Pending = AckFuture;
    async fn send(&mut self, payload: Bytes) -> anyhow::Result<AckFuture> {
        let msg = MutableMessage::new(MessageType::Data, self.vchannel.clone(), payload);
        Ok(Box::pin(self.producer.send(msg).await?))
    }
}

struct WaldenAcks;

impl Acks for WaldenAcks {
    type Pending = AckFuture;
    async fn ack(&mut self, pending: AckFuture) -> anyhow::Result<()> {
        pending.await?;
        Ok(())
    }
}

struct RedisLane {
    conn: redis::ConnWriter,
    key: Vec<u8>,
}

impl Lane for RedisLane {
    type Pending = ();
    async fn send(&mut self, payload: Bytes) -> anyhow::Result<()> {
        self.conn.send_xadd(&self.key, &payload).await
    }
}

struct RedisAcks(redis::ConnReader);

impl Acks for RedisAcks {
    type Pending = ();
    async fn ack(&mut self, (): ()) -> anyhow::Result<()> {
        self.0.reply().await.map(|_| ())
    }
}

/// When each producer sends, and when it stops.
#[derive(Clone, Copy)]
struct Pace {
    origin: Instant,
    deadline: Option<Instant>,
    /// Stop after this many messages (preloads).
    budget: Option<u64>,
    interval: Option<Duration>,
    window: usize,
    size: usize,
    record: bool,
}

impl Pace {
    /// Until `deadline`, at `rate` messages per second in all (0: as fast as possible), each
    /// producer sending every `producers / rate` seconds; `produce_all` sets the window.
    fn timed(a: &Args, rate: u64, origin: Instant, deadline: Instant, record: bool) -> Self {
        let producers = a.producers.unwrap_or(a.pchannels as usize).max(1);
        Self {
            origin,
            deadline: Some(deadline),
            budget: None,
            interval: (rate > 0).then(|| Duration::from_secs_f64(producers as f64 / rate as f64)),
            window: 1,
            size: a.size,
            record,
        }
    }
}

/// Acknowledged messages so far, for the progress line.
static PROGRESS: AtomicU64 = AtomicU64::new(0);

/// Prints acknowledged messages and the rate once a second on stderr (in place on a terminal)
/// until dropped.
struct ProgressLine(tokio::task::JoinHandle<()>);

impl ProgressLine {
    fn start(label: &'static str) -> Self {
        use std::io::IsTerminal;
        let tty = std::io::stderr().is_terminal();
        let start = PROGRESS.load(Ordering::Relaxed);
        Self(tokio::spawn(async move {
            let mut last = start;
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            loop {
                tick.tick().await;
                let now = PROGRESS.load(Ordering::Relaxed);
                let line = format!(
                    "  {label}: {:>10} acked, {:>8} msg/s",
                    now - start,
                    now - last
                );
                if tty {
                    eprint!("\r{line}   ");
                } else {
                    eprintln!("{line}");
                }
                last = now;
            }
        }))
    }
}

impl Drop for ProgressLine {
    fn drop(&mut self) {
        self.0.abort();
        use std::io::IsTerminal;
        if std::io::stderr().is_terminal() {
            eprint!("\r{:60}\r", "");
        }
    }
}

fn payload(size: usize, sent_us: u64) -> Bytes {
    let mut b = BytesMut::with_capacity(size);
    b.put_u64_le(sent_us);
    b.resize(size, b'x');
    b.freeze()
}

/// Runs one producer; returns its latency and sender-lateness histograms, acknowledged and
/// failed counts. Sending and acknowledging run side by side (one task, joined), so that an
/// acknowledgement is recorded when it arrives: at a fixed rate, acks read only when the
/// window was full measured the window's length, not the latency.
async fn produce<L: Lane, A: Acks<Pending = L::Pending>>(
    mut lane: L,
    mut acks: A,
    pace: Pace,
) -> (Histogram<u64>, Histogram<u64>, u64, u64) {
    let window = tokio::sync::Semaphore::new(pace.window);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Instant, L::Pending)>();
    let sending = async {
        let tx = tx;
        let mut lateness = new_hist();
        let start = Instant::now();
        let mut n = 0u64;
        let mut failed = 0u64;
        loop {
            if pace.budget.is_some_and(|b| n >= b) {
                break;
            }
            let Ok(permit) = window.acquire().await else {
                break;
            };
            // Given back by the acknowledging side.
            permit.forget();
            let intended = match pace.interval {
                Some(iv) => {
                    let t = start + iv.mul_f64(n as f64);
                    if pace.deadline.is_some_and(|d| t >= d) {
                        break;
                    }
                    tokio::time::sleep_until(t.into()).await;
                    let _ = lateness.record((t.elapsed().as_micros() as u64).max(1));
                    t
                }
                None => {
                    let now = Instant::now();
                    if pace.deadline.is_some_and(|d| now >= d) {
                        break;
                    }
                    now
                }
            };
            n += 1;
            let sent_us = intended.duration_since(pace.origin).as_micros() as u64;
            match lane.send(payload(pace.size, sent_us)).await {
                Ok(p) => {
                    if tx.send((intended, p)).is_err() {
                        break;
                    }
                }
                Err(_) => {
                    failed += 1;
                    break;
                }
            }
        }
        (lateness, failed)
    };
    let acking = async {
        let mut hist = new_hist();
        let (mut acked, mut failed) = (0u64, 0u64);
        while let Some((intended, p)) = rx.recv().await {
            let ok = acks.ack(p).await.is_ok();
            window.add_permits(1);
            if !ok {
                failed += 1;
                continue;
            }
            if pace.record {
                let _ = hist.record((intended.elapsed().as_micros() as u64).max(1));
            }
            acked += 1;
            PROGRESS.fetch_add(1, Ordering::Relaxed);
        }
        (hist, acked, failed)
    };
    let ((lateness, send_failed), (hist, acked, ack_failed)) = tokio::join!(sending, acking);
    (hist, lateness, acked, send_failed + ack_failed)
}

/// Runs every producer of a workload against one system, with `pace`.
async fn produce_all(sys: &System<'_>, a: &Args, pace: Pace) -> anyhow::Result<RunResult> {
    let producers = a.producers.unwrap_or(a.pchannels as usize).max(1);
    let window = (a.inflight / producers).max(1);
    let pace = Pace { window, ..pace };
    let mut tasks = Vec::new();
    let _progress = ProgressLine::start(sys.name());
    for i in 0..producers {
        let ch = channel_name(i % a.pchannels as usize);
        // Each producer has a connection of its own, as each Redis producer does.
        let client = match sys {
            System::Walden { addr, .. } => Some(Client::connect(addr).await?),
            System::Redis(_) => None,
        };
        match (sys, &client) {
            (System::Walden { .. }, Some(c)) => {
                let lane = WaldenLane {
                    producer: c.producer(
                        &ch,
                        ProducerOptions {
                            max_in_flight: window,
                            ..ProducerOptions::default()
                        },
                    ),
                    vchannel: format!("bench-{i}"),
                };
                tasks.push(tokio::spawn(produce(lane, WaldenAcks, pace)));
            }
            (System::Redis(r), _) => {
                let (conn, replies) = redis::Conn::connect(&r.addr).await?.split();
                let lane = RedisLane {
                    conn,
                    key: ch.into_bytes(),
                };
                tasks.push(tokio::spawn(produce(lane, RedisAcks(replies), pace)));
            }
            _ => anyhow::bail!("no client"),
        }
    }
    let mut r = RunResult::new();
    for t in tasks {
        let (h, late, acked, errors) = t.await?;
        r.hist.add(&h).ok();
        r.lateness.add(&late).ok();
        r.msgs += acked;
        r.errors += errors;
    }
    r.bytes = r.msgs * a.size as u64;
    r.elapsed = pace.origin.elapsed();
    Ok(r)
}

/// A consumer of channel `p`'s Insert messages (what the bench writes), from `from`.
async fn insert_reader(
    addr: &str,
    p: usize,
    from: DeliverFrom,
) -> anyhow::Result<walden_client::Consumer> {
    let client = Client::connect(addr).await?;
    Ok(client.consumer(
        &channel_name(p),
        ConsumerOptions {
            from,
            types: Some(vec![MessageType::Data]),
            // Deep enough that a catching-up reader never waits on the application.
            buffer: 8192,
            ..ConsumerOptions::default()
        },
    ))
}

/// Tailing consumers on every channel record receive time minus intended send time.
async fn spawn_tail_readers(
    sys: &System<'_>,
    a: &Args,
    origin: Instant,
    hist: Arc<Mutex<Histogram<u64>>>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    let mut tasks = Vec::new();
    let record = move |hist: &Mutex<Histogram<u64>>, p: &[u8]| {
        if let Some(ts) = p.get(..8) {
            let sent = u64::from_le_bytes(ts.try_into().unwrap_or([0; 8]));
            let now = origin.elapsed().as_micros() as u64;
            if let Ok(mut h) = hist.lock() {
                let _ = h.record(now.saturating_sub(sent).max(1));
            }
        }
    };
    for p in 0..a.pchannels as usize {
        let (hist, stop) = (hist.clone(), stop.clone());
        match sys {
            System::Walden { addr, .. } => {
                let mut c = insert_reader(addr, p, DeliverFrom::Latest).await?;
                tasks.push(tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        let next = tokio::time::timeout(Duration::from_millis(100), c.next());
                        if let Ok(Some(Ok(m))) = next.await {
                            record(&hist, &m.payload);
                        }
                    }
                }));
            }
            System::Redis(r) => {
                let mut conn = redis::Conn::connect(&r.addr).await?;
                let key = channel_name(p).into_bytes();
                tasks.push(tokio::spawn(async move {
                    let mut last = b"$".to_vec();
                    let mut entries = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        let reply = conn
                            .command(&[
                                b"XREAD", b"COUNT", b"1000", b"BLOCK", b"100", b"STREAMS", &key,
                                &last,
                            ])
                            .await;
                        let Ok(v) = reply else { break };
                        entries.clear();
                        redis::xread_entries(v, &mut entries);
                        for (id, value) in entries.drain(..) {
                            record(&hist, &value);
                            last = id;
                        }
                    }
                }));
            }
        }
    }
    Ok(tasks)
}

/// Reads every channel from the start until `per_channel` inserts each were seen.
async fn read_from_start(sys: &System<'_>, a: &Args, per_channel: u64) -> anyhow::Result<u64> {
    let mut tasks: Vec<tokio::task::JoinHandle<anyhow::Result<u64>>> = Vec::new();
    for p in 0..a.pchannels as usize {
        match sys {
            System::Walden { addr, .. } => {
                let mut c = insert_reader(addr, p, DeliverFrom::All).await?;
                tasks.push(tokio::spawn(async move {
                    let mut bytes = 0u64;
                    for _ in 0..per_channel {
                        let m = c.next().await.context("consumer ended")??;
                        bytes += m.payload.len() as u64;
                    }
                    Ok(bytes)
                }));
            }
            System::Redis(r) => {
                let mut conn = redis::Conn::connect(&r.addr).await?;
                let key = channel_name(p).into_bytes();
                tasks.push(tokio::spawn(async move {
                    let (mut seen, mut bytes) = (0u64, 0u64);
                    let mut from = b"-".to_vec();
                    let mut entries = Vec::new();
                    while seen < per_channel {
                        let v = conn
                            .command(&[b"XRANGE", &key, &from, b"+", b"COUNT", b"10000"])
                            .await?;
                        entries.clear();
                        redis::xrange_entries(v, &mut entries);
                        anyhow::ensure!(!entries.is_empty(), "redis stream ended early");
                        for (id, value) in entries.drain(..) {
                            bytes += value.len() as u64;
                            seen += 1;
                            from = [b"(".as_slice(), &id].concat();
                        }
                    }
                    Ok(bytes)
                }));
            }
        }
    }
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    Ok(total)
}

async fn one_run(
    sys: &mut System<'_>,
    a: &Args,
    kind: Kind,
    rate: u64,
) -> anyhow::Result<RunResult> {
    let origin = Instant::now();
    match kind {
        Kind::Append => {
            let pace = Pace::timed(a, rate, origin, origin + a.duration, true);
            produce_all(sys, a, pace).await
        }
        Kind::E2e => {
            let hist = Arc::new(Mutex::new(new_hist()));
            let stop = Arc::new(AtomicBool::new(false));
            let readers = spawn_tail_readers(sys, a, origin, hist.clone(), stop.clone()).await?;
            // Let the readers attach before anything is sent.
            tokio::time::sleep(Duration::from_millis(300)).await;
            let start = Instant::now();
            let pace = Pace::timed(a, rate, origin, start + a.duration, false);
            let mut r = produce_all(sys, a, pace).await?;
            tokio::time::sleep(Duration::from_millis(300)).await;
            stop.store(true, Ordering::Relaxed);
            for t in readers {
                let _ = t.await;
            }
            r.elapsed = start.elapsed().saturating_sub(Duration::from_millis(300));
            r.hist = hist
                .lock()
                .map(|h| h.clone())
                .unwrap_or_else(|_| new_hist());
            Ok(r)
        }
        Kind::Catchup => {
            let per_channel = preload_per_channel(a);
            let start = Instant::now();
            let bytes = read_from_start(sys, a, per_channel).await?;
            let mut r = RunResult::new();
            r.elapsed = start.elapsed();
            r.msgs = per_channel * a.pchannels as u64;
            r.bytes = bytes;
            let _ = r.hist.record(r.elapsed.as_micros() as u64);
            Ok(r)
        }
        Kind::Recovery => {
            preload(sys, a).await?;
            let took = match sys {
                System::Walden {
                    server: Some(s), ..
                } => s.kill_and_restart().await?,
                System::Walden { server: None, .. } => {
                    anyhow::bail!("recovery needs a server the bench starts (no --addr)")
                }
                System::Redis(r) => r.kill_and_restart().await?,
            };
            let mut r = RunResult::new();
            r.elapsed = took;
            let _ = r.hist.record(took.as_micros() as u64);
            Ok(r)
        }
    }
}

/// Sends the workload's load for `--warmup`, recording nothing.
async fn warm_up(sys: &mut System<'_>, a: &Args, rate: u64) -> anyhow::Result<()> {
    let origin = Instant::now();
    let pace = Pace::timed(a, rate, origin, origin + a.warmup, false);
    produce_all(sys, a, pace).await.map(drop)
}

fn preload_per_channel(a: &Args) -> u64 {
    ((a.preload_mib << 20) / a.size as u64 / a.pchannels as u64).max(1)
}

async fn preload(sys: &System<'_>, a: &Args) -> anyhow::Result<()> {
    let per_channel = preload_per_channel(a);
    // One producer per channel so each gets exactly its share.
    let args = Args {
        producers: Some(a.pchannels as usize),
        inflight: a.inflight.max(a.pchannels as usize * 16),
        ..a.clone()
    };
    let t = Instant::now();
    let pace = Pace {
        origin: Instant::now(),
        deadline: None,
        budget: Some(per_channel),
        interval: None,
        window: 1,
        size: a.size,
        record: false,
    };
    let r = produce_all(sys, &args, pace).await?;
    anyhow::ensure!(r.errors == 0, "preload had {} errors", r.errors);
    eprintln!(
        "  preloaded {} into {}: {} messages, {:.1} s",
        human_mib(r.bytes),
        sys.name(),
        r.msgs,
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

fn human_mib(b: u64) -> String {
    format!("{:.0} MiB", b as f64 / (1 << 20) as f64)
}

/// The config of the server the bench starts.
fn server_config(a: &Args) -> anyhow::Result<String> {
    let mut c = format!(
        "[node]\npchannels = {}\n[wal_local]\nlayout = \"{}\"\n",
        a.pchannels, a.wal_layout
    );
    if a.wal_storage == WalStorage::Object {
        let url = a
            .object_store
            .as_deref()
            .context("--wal-storage object needs --object-store URL")?;
        let s = objstore::store_config(url, a.object_store_endpoint.as_deref());
        c.push_str(&format!(
            "[wal]\nstorage = \"object\"\n[object_store]\nurl = {:?}\nendpoint = {:?}\nallow_http = {}\n",
            s.url, s.endpoint, s.allow_http
        ));
    }
    Ok(c)
}

async fn compare(a: Args, kind: Kind) -> anyhow::Result<()> {
    anyhow::ensure!(
        a.pchannels > 0 && a.inflight > 0 && a.runs > 0,
        "counts must be positive"
    );
    anyhow::ensure!(
        a.size >= 16,
        "--size must be at least 16 (the payload carries a timestamp)"
    );
    let rate = a.rate.unwrap_or(if kind == Kind::E2e { 1000 } else { 0 });
    let base = a.data_dir.clone().unwrap_or_else(|| PathBuf::from("."));
    std::fs::create_dir_all(&base)?;
    let scratch = tempfile::Builder::new()
        .prefix("walden-bench-")
        .tempdir_in(&base)?;
    let mut walden = match &a.addr {
        Some(_) => None,
        None => {
            Some(WaldenServer::start(&server_config(&a)?, &scratch.path().join("walden")).await?)
        }
    };
    let walden_addr = a
        .addr
        .clone()
        .or_else(|| walden.as_ref().map(|s| s.addr.clone()))
        .context("no server address")?;
    let mut redis = match a.peer {
        Some(Peer::Redis) => Some(RedisServer::start(scratch.path()).await?),
        None => None,
    };
    eprintln!(
        "walden bench {}: {} pchannels, {} producers, {} in flight, {} B messages, {}{}, {} run(s){}",
        kind.name(),
        a.pchannels,
        a.producers.unwrap_or(a.pchannels as usize),
        a.inflight,
        a.size,
        if rate == 0 {
            "max rate".to_owned()
        } else {
            format!("{rate} msg/s")
        },
        if matches!(kind, Kind::Append | Kind::E2e) {
            format!(", {:?} each", a.duration)
        } else {
            format!(", {} MiB preload", a.preload_mib)
        },
        a.runs,
        if redis.is_some() {
            ", alternating with redis"
        } else {
            ""
        },
    );
    // Catchup reads one preload again and again; recovery preloads before every run (in
    // `one_run`), so each restart has the same amount of log to recover.
    if kind == Kind::Catchup {
        preload(
            &System::Walden {
                addr: &walden_addr,
                server: None,
            },
            &a,
        )
        .await?;
        if let Some(r) = redis.as_mut() {
            preload(&System::Redis(r), &a).await?;
        }
    }

    if matches!(kind, Kind::Append | Kind::E2e) && !a.warmup.is_zero() {
        let mut sys = System::Walden {
            addr: &walden_addr,
            server: walden.as_mut(),
        };
        warm_up(&mut sys, &a, rate).await?;
        if let Some(rs) = redis.as_mut() {
            warm_up(&mut System::Redis(rs), &a, rate).await?;
        }
    }

    let mut walden_runs = Vec::new();
    let mut peer_runs = Vec::new();
    for i in 0..a.runs {
        let addr = walden_addr.clone();
        let (pid, metrics) = match &walden {
            Some(s) => (s.pid(), Some(s.metrics.clone())),
            None => (None, None),
        };
        let node_before = match &metrics {
            Some(m) => scrape_node(m).await,
            None => None,
        };
        let cpu_before = pid.as_deref().and_then(cpu_seconds);
        let client_before = cpu_seconds("self").unwrap_or(0.0);
        let mut sys = System::Walden {
            addr: &addr,
            server: walden.as_mut(),
        };
        let mut r = one_run(&mut sys, &a, kind, rate).await?;
        r.cpu_client_s = cpu_seconds("self").unwrap_or(0.0) - client_before;
        if kind != Kind::Recovery {
            r.cpu_server_s = match (pid.as_deref(), cpu_before) {
                (Some(p), Some(b)) => cpu_seconds(p).map(|x| x - b),
                _ => None,
            };
            if let (Some(m), Some(b)) = (&metrics, node_before)
                && let Some(a) = scrape_node(m).await
            {
                r.syncs = Some(a.syncs.saturating_sub(b.syncs));
                r.node_append = Some((
                    a.append_sum_s - b.append_sum_s,
                    a.append_count.saturating_sub(b.append_count),
                ));
                r.puts = Some((
                    a.puts.saturating_sub(b.puts),
                    a.put_bytes.saturating_sub(b.put_bytes),
                ));
                r.store_read_bytes = Some(a.get_bytes.saturating_sub(b.get_bytes));
            }
        }
        eprintln!("  run {} walden: {}", i + 1, r.table_row("").trim());
        walden_runs.push(r);
        if let Some(rs) = redis.as_mut() {
            let pid = rs.pid();
            let cpu_before = cpu_seconds(&pid);
            let client_before = cpu_seconds("self").unwrap_or(0.0);
            let mut r = one_run(&mut System::Redis(rs), &a, kind, rate).await?;
            r.cpu_client_s = cpu_seconds("self").unwrap_or(0.0) - client_before;
            if kind != Kind::Recovery {
                r.cpu_server_s = cpu_before.and_then(|b| cpu_seconds(&rs.pid()).map(|x| x - b));
            }
            eprintln!("  run {} redis:  {}", i + 1, r.table_row("").trim());
            peer_runs.push(r);
        }
    }
    let w = median(&walden_runs, kind);
    let p = (!peer_runs.is_empty()).then(|| median(&peer_runs, kind));

    // The machine's own limit at the commit size Walden used (the store's, for the object WAL).
    let disk = if kind == Kind::Append && a.wal_storage == WalStorage::Local {
        let commit = match w.syncs {
            Some(s) if s > 0 => ((w.bytes / s) as usize).max(512),
            _ => a.size,
        };
        Some(disk_probe(scratch.path(), commit, Duration::from_secs(3))?)
    } else {
        None
    };
    // With one message in flight, a round trip over loopback is part of every acknowledgement:
    // the floor is the disk's sync plus that.
    let loopback = if disk.is_some() && a.inflight == 1 {
        Some(loopback_probe(a.size, Duration::from_secs(2))?)
    } else {
        None
    };

    let store = objstore::objstore_limit(&a, kind, &w, walden.as_ref()).await?;

    println!("\n{} (median of {} run(s))", kind.name(), a.runs);
    println!("{TABLE_HEADER}");
    println!("{}", w.table_row("walden"));
    if let Some(p) = &p {
        println!("{}", p.table_row("redis"));
    }
    if let Some(d) = &disk {
        println!("{}", d.table_row("disk"));
    }
    let ratio_to_peer = p.as_ref().map(|p| match kind {
        Kind::Append | Kind::Catchup => w.msgs_per_s() / p.msgs_per_s().max(1e-9),
        Kind::E2e => p.ms(0.99) / w.ms(0.99).max(1e-9),
        Kind::Recovery => p.ms(0.5) / w.ms(0.5).max(1e-9),
    });
    let ratio_to_disk = disk
        .as_ref()
        .map(|d| w.mib_per_s() / d.mib_per_s().max(1e-9));
    if let Some(r) = ratio_to_peer {
        let what = match kind {
            Kind::Append | Kind::Catchup => "throughput",
            Kind::E2e => "p99 latency, peer/walden",
            Kind::Recovery => "time to ready, peer/walden",
        };
        println!("walden/redis ({what}): {r:.2}x");
    }
    if let (Some(r), Some(d)) = (ratio_to_disk, &disk) {
        println!(
            "walden/disk bandwidth: {r:.2}x (disk: {} B write + fdatasync per commit)",
            d.size
        );
    }
    if let (Some(rtt), Some(d)) = (&loopback, &disk) {
        let floor = d.ms(0.5) + ms(rtt, 0.5);
        println!(
            "one in flight: disk sync p50 {:.3} ms + loopback round trip p50 {:.3} ms = {floor:.3} ms; \
             walden p50 is {:.2}x that",
            d.ms(0.5),
            ms(rtt, 0.5),
            w.ms(0.5) / floor.max(1e-9)
        );
    }
    let ratio_to_store = store.as_ref().map(|s| {
        let (what, r) = match (kind, a.inflight) {
            (Kind::Append, 1) => ("ack p50 / raw PUT p50", w.ms(0.5) / s.ms(0.5).max(1e-9)),
            (Kind::Catchup, _) => (
                "catch-up MiB/s / raw GET MiB/s",
                w.mib_per_s() / s.mib_per_s().max(1e-9),
            ),
            _ => (
                "MiB/s / raw PUT MiB/s",
                w.mib_per_s() / s.mib_per_s().max(1e-9),
            ),
        };
        println!("{}", s.table_row());
        println!("walden/objstore ({what}, {}): {r:.2}x", s.label());
        if let Some(read) = w.store_read_bytes.filter(|_| kind == Kind::Catchup) {
            println!(
                "walden read {} of the {} it delivered from the store (the rest from its write-ahead buffer)",
                human_mib(read),
                human_mib(w.bytes)
            );
        }
        (what, round(r))
    });
    for (name, r) in std::iter::once(("walden", &w)).chain(p.as_ref().map(|p| ("redis", p))) {
        if !r.lateness.is_empty() {
            println!(
                "{name}: the bench sent {:.3} ms late at p50, {:.3} ms at p99 (included above)",
                r.lateness.value_at_quantile(0.5) as f64 / 1000.0,
                r.lateness.value_at_quantile(0.99) as f64 / 1000.0
            );
        }
    }
    if let Some(s) = w.syncs.filter(|_| w.msgs > 0) {
        println!(
            "walden {} per message: {:.4}; CPU s: server {}, client {:.2}",
            match a.wal_storage {
                WalStorage::Local => "fsyncs",
                WalStorage::Object => "fragment PUTs",
            },
            s as f64 / w.msgs as f64,
            w.cpu_server_s.map_or("n/a".into(), |c| format!("{c:.2}")),
            w.cpu_client_s
        );
    }
    // Appends made during a catchup or recovery run are the node's own (time ticks): no line.
    if let (Some((sum, n)), Some(s)) = (w.node_append, w.syncs)
        && matches!(kind, Kind::Append | Kind::E2e)
        && n > 0
        && s > 0
    {
        println!(
            "walden node: enqueue to durable {:.3} ms on average (of the {:.3} ms p50 above); \
             a group commit every {:.3} ms",
            sum * 1000.0 / n as f64,
            w.ms(0.5),
            w.elapsed.as_secs_f64() * 1000.0 / s as f64
        );
    }
    let mut systems = serde_json::Map::new();
    systems.insert("walden".into(), w.to_json());
    if let Some(p) = &p {
        systems.insert("redis".into(), p.to_json());
    }
    let report = json!({
        "workload": kind.name(),
        "params": {
            "pchannels": a.pchannels, "producers": a.producers.unwrap_or(a.pchannels as usize),
            "inflight": a.inflight, "size": a.size, "rate": rate,
            "warmup_s": a.warmup.as_secs_f64(),
            "duration_s": a.duration.as_secs_f64(), "preload_mib": a.preload_mib, "runs": a.runs,
        },
        "walden": systems.get("walden"),
        "redis": systems.get("redis"),
        "runs": {
            "walden": walden_runs.iter().map(RunResult::to_json).collect::<Vec<_>>(),
            "redis": peer_runs.iter().map(RunResult::to_json).collect::<Vec<_>>(),
        },
        "disk": disk.as_ref().map(DiskResult::to_json),
        "loopback_rtt_ms": loopback.as_ref().map(|h| json!({
            "p50": round(ms(h, 0.5)), "p99": round(ms(h, 0.99)),
        })),
        "ratio_to_peer": ratio_to_peer.map(round),
        "ratio_to_disk": ratio_to_disk.map(round),
        "objstore": store.as_ref().map(objstore::ProbeResult::to_json),
        "ratio_to_objstore": ratio_to_store.map(|(what, r)| json!({ "what": what, "ratio": r })),
    });
    write_json(a.json.as_deref(), &report)
}

/// A latency quantile in ms from a histogram of µs.
fn ms(hist: &Histogram<u64>, q: f64) -> f64 {
    hist.value_at_quantile(q) as f64 / 1000.0
}

/// One line of the human table (the header is printed once per report).
fn table_row(name: &str, per_s: f64, mib_per_s: f64, hist: &Histogram<u64>, errors: u64) -> String {
    format!(
        "{name:<10} {:>11.0} {:>9.1} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>7}",
        per_s,
        mib_per_s,
        ms(hist, 0.5),
        ms(hist, 0.9),
        ms(hist, 0.99),
        ms(hist, 0.999),
        hist.max() as f64 / 1000.0,
        errors
    )
}
