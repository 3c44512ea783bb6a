//! `walden bench failover`: how long a moved pchannel is without a serving owner. The bench
//! starts etcd, a coordinator and `--nodes` nodes (WAL on a shared object store), keeps an
//! idempotent producer appending to every pchannel, and measures, for each pchannel that moves,
//! the time from the cause (an operator's move, or a kill -9 of its node) to the first append
//! acknowledged by its new owner.
//!
//! "By its new owner": the first acknowledgement received after the coordinator's record shows
//! the pchannel assigned to the new node under the new term (the new owner fences the storage
//! before that, so no later acknowledgement can come from the old one). Records are polled every
//! 10 ms, so a sample may be up to that much late.

use std::{
    collections::HashMap,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
};

use walden_client::ProducerOptions;
use walden_metastore_etcd::testing::EtcdServer;
use walden_proto::v1::{AssignmentState, ClusterStatusResponse};

use super::*;

#[derive(clap::Args, Debug, Clone)]
pub struct FailoverArgs {
    /// Streaming nodes to start.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Pchannels in the cluster.
    #[arg(long, default_value_t = 16)]
    pchannels: u32,
    /// Planned moves to measure (`walden balance move`), at least 10.
    #[arg(long, default_value_t = 20)]
    moves: usize,
    /// Nodes to kill -9 (each moves all its pchannels); enough for 10 samples by default.
    #[arg(long, default_value_t = 3)]
    kills: usize,
    /// The nodes' lease TTL in ms (`cluster.node_lease_ttl_ms`): a crash's target is this
    /// plus 1 s.
    #[arg(long, default_value_t = 10_000)]
    lease_ttl_ms: u64,
    /// The WAL's object store (default: file:// in the scratch directory).
    #[arg(long)]
    object_store: Option<String>,
    /// An S3-compatible endpoint for `--object-store`.
    #[arg(long)]
    object_store_endpoint: Option<String>,
    /// Where the processes keep their data (default: a temp dir under `.`).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    #[arg(long)]
    json: Option<PathBuf>,
}

struct Proc {
    child: Option<Child>,
    node_id: Option<u64>,
    addr: String,
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

async fn spawn(role: &str, dir: &Path, etcd: &str, config: &Path) -> anyhow::Result<Proc> {
    let ready = dir.with_extension("ready");
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.arg(role)
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", ""])
        .args(["--etcd", etcd])
        .arg("--config")
        .arg(config)
        .arg("--ready-file")
        .arg(&ready)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(
            dir.with_extension("log"),
        )?));
    if role == "node" {
        cmd.arg("--data-dir").arg(dir);
    }
    let child = cmd
        .spawn()
        .with_context(|| format!("starting walden {role}"))?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(t) = std::fs::read_to_string(&ready)
            && let Ok(doc) = serde_json::from_str::<serde_json::Value>(&t)
        {
            return Ok(Proc {
                child: Some(child),
                node_id: doc["node_id"].as_u64(),
                addr: doc["grpc"].as_str().unwrap_or_default().to_owned(),
            });
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "walden {role} did not become ready"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Every acknowledgement's arrival, per pchannel.
type Acks = Arc<Mutex<HashMap<String, Vec<Instant>>>>;

/// The first acknowledgement on `pchannel` at or after `t`, waiting up to `within`.
async fn first_ack_after(
    acks: &Acks,
    pchannel: &str,
    t: Instant,
    within: Duration,
) -> Option<Instant> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = acks.lock().unwrap_or_else(|e| e.into_inner()).get(pchannel)
            && let Some(&a) = v.iter().rev().take_while(|a| **a >= t).last()
        {
            return Some(a);
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Polls until `pchannel` is assigned under a term above `term`; returns when it was seen.
async fn assigned_above(
    client: &Client,
    pchannel: &str,
    term: u64,
    within: Duration,
) -> anyhow::Result<(Instant, u64)> {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(s) = client.cluster_status().await
            && let Some(r) = s.pchannels.iter().find(|r| r.pchannel == pchannel)
            && r.term > term
            && r.state() == AssignmentState::Assigned
        {
            return Ok((Instant::now(), r.term));
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{pchannel} was not assigned again within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn converged(client: &Client, pchannels: usize) -> anyhow::Result<ClusterStatusResponse> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(s) = client.cluster_status().await
            && s.pchannels.len() == pchannels
            && s.pchannels
                .iter()
                .all(|p| p.state() == AssignmentState::Assigned)
        {
            return Ok(s);
        }
        anyhow::ensure!(Instant::now() < deadline, "the cluster did not converge");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

pub async fn run(a: FailoverArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        a.nodes >= 2,
        "--nodes must be at least 2 (a pchannel needs somewhere to go)"
    );
    anyhow::ensure!(a.pchannels > 0, "--pchannels must be at least 1");
    let base = a.data_dir.clone().unwrap_or_else(|| PathBuf::from("."));
    std::fs::create_dir_all(&base)?;
    let scratch = tempfile::Builder::new()
        .prefix("walden-bench-")
        .tempdir_in(&base)?;
    let store = match &a.object_store {
        Some(u) => u.clone(),
        None => {
            let d = std::fs::canonicalize(scratch.path())?.join("store");
            std::fs::create_dir(&d)?;
            format!("file://{}", d.display())
        }
    };
    let s = objstore::store_config(&store, a.object_store_endpoint.as_deref());
    let config = scratch.path().join("cluster.toml");
    std::fs::write(
        &config,
        format!(
            "[node]\npchannels = {}\n[wal]\nstorage = \"object\"\n\
             [object_store]\nurl = {:?}\nendpoint = {:?}\nallow_http = {}\n\
             [cluster]\nnode_lease_ttl_ms = {}\n",
            a.pchannels, s.url, s.endpoint, s.allow_http, a.lease_ttl_ms
        ),
    )?;
    let etcd = EtcdServer::start().context("starting etcd (Debian package etcd-server)")?;
    let coord = spawn(
        "coord",
        &scratch.path().join("coord"),
        &etcd.endpoints(),
        &config,
    )
    .await?;
    let mut nodes = Vec::new();
    for i in 0..a.nodes {
        nodes.push(
            spawn(
                "node",
                &scratch.path().join(format!("node{i}")),
                &etcd.endpoints(),
                &config,
            )
            .await?,
        );
    }
    let client = Client::connect(&coord.addr).await?;
    converged(&client, a.pchannels as usize).await?;
    eprintln!(
        "walden bench failover: {} nodes, {} pchannels, lease TTL {} ms, WAL on {}",
        a.nodes, a.pchannels, a.lease_ttl_ms, store
    );

    // One idempotent producer per pchannel, appending all the time.
    let acks: Acks = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for i in 0..a.pchannels {
        let name = format!("walden-dml-{i}");
        let p = client.producer(
            &name,
            ProducerOptions {
                max_in_flight: 4,
                retry_timeout: Duration::from_secs(120),
                ..ProducerOptions::default()
            },
        );
        let (acks, stop) = (acks.clone(), stop.clone());
        load.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let msg =
                    MutableMessage::new(MessageType::Data, "bench", Bytes::from(vec![b'x'; 128]));
                p.append(msg).await?;
                acks.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .entry(name.clone())
                    .or_default()
                    .push(Instant::now());
                n += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            anyhow::Ok(n)
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Planned moves: one pchannel at a time to another node.
    let mut planned = Vec::new();
    for i in 0..a.moves {
        let s = converged(&client, a.pchannels as usize).await?;
        let p = &s.pchannels[i % s.pchannels.len()];
        let to = s
            .nodes
            .iter()
            .filter_map(|n| n.node.as_ref())
            .map(|n| n.id)
            .find(|id| *id != p.node_id)
            .context("no other node")?;
        let t0 = Instant::now();
        client.move_pchannel(&p.pchannel, to).await?;
        let (seen, _) =
            assigned_above(&client, &p.pchannel, p.term, Duration::from_secs(60)).await?;
        let ack = first_ack_after(&acks, &p.pchannel, seen, Duration::from_secs(60))
            .await
            .context("no acknowledgement after the move")?;
        planned.push(ack - t0);
    }

    // Crashes: kill -9 the node with the most pchannels, then start a replacement.
    let mut crashes = Vec::new();
    for k in 0..a.kills {
        let s = converged(&client, a.pchannels as usize).await?;
        let victim = s
            .nodes
            .iter()
            .max_by_key(|n| n.pchannels.len())
            .and_then(|n| n.node.as_ref())
            .map(|n| n.id)
            .context("no node")?;
        let terms: Vec<(String, u64)> = s
            .pchannels
            .iter()
            .filter(|p| p.node_id == victim)
            .map(|p| (p.pchannel.clone(), p.term))
            .collect();
        let i = nodes
            .iter()
            .position(|n| n.node_id == Some(victim))
            .context("victim process")?;
        let t0 = Instant::now();
        drop(nodes.remove(i)); // kill -9
        let waits = terms.iter().map(|(p, term)| {
            let (client, acks) = (&client, &acks);
            async move {
                let (seen, _) = assigned_above(client, p, *term, Duration::from_secs(120)).await?;
                let ack = first_ack_after(acks, p, seen, Duration::from_secs(60))
                    .await
                    .context("no acknowledgement after the crash")?;
                anyhow::Ok(ack - t0)
            }
        });
        for r in futures::future::join_all(waits).await {
            crashes.push(r?);
        }
        nodes.push(
            spawn(
                "node",
                &scratch.path().join(format!("node-r{k}")),
                &etcd.endpoints(),
                &config,
            )
            .await?,
        );
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut appended = 0;
    for l in load {
        appended += l.await??;
    }

    planned.sort();
    crashes.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let crash_target = Duration::from_millis(a.lease_ttl_ms + 1000);
    let row = |name: &str, v: &[Duration], target: Duration| {
        println!(
            "{name:<8} {:>5} {:>9.1} {:>9.1} {:>9.1}   target p99 < {:.0} ms: {} ({:.2}x of target)",
            v.len(),
            ms(percentile(v, 0.5)),
            ms(percentile(v, 0.99)),
            ms(v.last().copied().unwrap_or_default()),
            ms(target),
            if percentile(v, 0.99) < target {
                "met"
            } else {
                "MISSED"
            },
            ms(percentile(v, 0.99)) / ms(target).max(1e-9),
        );
    };
    println!("cause    moves   p50(ms)   p99(ms)   max(ms)");
    row("planned", &planned, Duration::from_secs(1));
    row("crash", &crashes, crash_target);
    println!(
        "(from the cause to the first append acknowledged by the new owner; {appended} appends in all, none failed)"
    );
    write_json(
        a.json.as_deref(),
        &json!({
            "workload": "failover",
            "nodes": a.nodes,
            "pchannels": a.pchannels,
            "lease_ttl_ms": a.lease_ttl_ms,
            "planned_ms": planned.iter().map(|d| ms(*d)).collect::<Vec<_>>(),
            "crash_ms": crashes.iter().map(|d| ms(*d)).collect::<Vec<_>>(),
            "appends": appended,
        }),
    )?;
    drop(coord);
    Ok(())
}
