//! `walden bench search`: insert rows/s of clustered vectors, search latency on growing rows
//! right after the insert, and latency and QPS once indexed, at recall@k ≥ 0.95, beside peers
//! run by `scripts/search_peer.py` on the same data in the same sitting.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use arrow_array::{FixedSizeListArray, Float32Array, Int64Array, RecordBatch};
use arrow_schema::{DataType, Field};
use rand::{Rng, SeedableRng, rngs::StdRng};
use serde_json::{Value, json};
use walden_client::{Client, Consistency, SearchOptions};
use walden_proto::v1::{IndexSpec, IndexType, MetricType};
use walden_query::Metric;
use walden_schema::Schema;

use super::{
    parse_duration,
    report::{round, write_json},
    server::{WaldenServer, cpu_seconds},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Peer {
    MilvusLite,
    Lancedb,
}

impl Peer {
    fn name(self) -> &'static str {
        match self {
            Self::MilvusLite => "milvus-lite",
            Self::Lancedb => "lancedb",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ConsistencyArg {
    Strong,
    Bounded,
    Eventually,
}

#[derive(clap::Args, Debug)]
pub struct SearchArgs {
    /// Rows inserted.
    #[arg(long, default_value_t = 50_000)]
    pub(super) rows: usize,
    #[arg(long, default_value_t = 128)]
    pub(super) dim: usize,
    /// Clusters the rows are drawn around.
    #[arg(long, default_value_t = 100)]
    pub(super) clusters: usize,
    /// Query vectors (each near a random cluster's centre).
    #[arg(long, default_value_t = 200)]
    pub(super) queries: usize,
    #[arg(long, default_value_t = 10)]
    pub(super) k: usize,
    /// Rows per insert call.
    #[arg(long, default_value_t = 1000)]
    pub(super) batch: usize,
    /// Insert calls in flight.
    #[arg(long, default_value_t = 4)]
    inserters: usize,
    /// Collection shards.
    #[arg(long, default_value_t = 2)]
    pub(super) shards: u32,
    /// Searches in flight while QPS is measured (every system).
    #[arg(long, default_value_t = 2)]
    pub(super) concurrency: usize,
    /// Consistency of every Walden search (strong: each waits for every acknowledged write).
    #[arg(long, value_enum, default_value = "strong")]
    pub(super) consistency: ConsistencyArg,
    /// How long QPS is measured.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub(super) qps_duration: Duration,
    /// Peers run on the same data after Walden (comma-separated).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub(super) peer: Vec<Peer>,
    /// The Python that runs the peers [default: .venv-peers/bin/python if present, else
    /// python3]; `scripts/install-bench-peers.sh` makes that venv.
    #[arg(long)]
    python: Option<PathBuf>,
    /// Where the server and the peers keep their data (default: a temp dir under `.`).
    #[arg(long)]
    pub(super) data_dir: Option<PathBuf>,
    #[arg(long)]
    pub(super) json: Option<PathBuf>,
}

/// The data set: rows (row i has id i), queries, and each query's exact top-k ids.
pub(super) struct Data {
    pub(super) dim: usize,
    pub(super) rows: Vec<f32>,
    pub(super) queries: Vec<Vec<f32>>,
    pub(super) truth: Vec<Vec<i64>>,
}

pub(super) fn data(a: &SearchArgs) -> Data {
    let mut rng = StdRng::seed_from_u64(2026);
    let dim = a.dim;
    let centres: Vec<Vec<f32>> = (0..a.clusters.max(1))
        .map(|_| (0..dim).map(|_| rng.random_range(-1.0f32..1.0)).collect())
        .collect();
    let near = |rng: &mut StdRng| -> Vec<f32> {
        let c = &centres[rng.random_range(0..centres.len())];
        c.iter()
            .map(|x| x + rng.random_range(-0.1f32..0.1))
            .collect()
    };
    let mut rows = Vec::with_capacity(a.rows * dim);
    for _ in 0..a.rows {
        rows.extend(near(&mut rng));
    }
    let queries: Vec<Vec<f32>> = (0..a.queries).map(|_| near(&mut rng)).collect();
    let truth = queries
        .iter()
        .map(|q| {
            let mut d: Vec<(f32, i64)> = rows
                .chunks_exact(dim)
                .enumerate()
                .map(|(i, v)| (Metric::L2.distance(q, v), i as i64))
                .collect();
            let nth = a.k.min(d.len().saturating_sub(1));
            d.select_nth_unstable_by(nth, |x, y| x.0.total_cmp(&y.0));
            d.truncate(a.k);
            d.sort_by(|x, y| x.0.total_cmp(&y.0));
            d.into_iter().map(|x| x.1).collect()
        })
        .collect();
    Data {
        dim,
        rows,
        queries,
        truth,
    }
}

fn batch(schema: &Schema, d: &Data, lo: usize, hi: usize) -> anyhow::Result<RecordBatch> {
    let item = Arc::new(Field::new("item", DataType::Float32, false));
    let emb = FixedSizeListArray::try_new(
        item,
        d.dim as i32,
        Arc::new(Float32Array::from(d.rows[lo * d.dim..hi * d.dim].to_vec())),
        None,
    )?;
    Ok(RecordBatch::try_new(
        schema.arrow().clone(),
        vec![
            Arc::new(Int64Array::from((lo as i64..hi as i64).collect::<Vec<_>>())),
            Arc::new(emb),
        ],
    )?)
}

pub(super) fn recall(found: &[Vec<i64>], truth: &[Vec<i64>], k: usize) -> f64 {
    let hits: usize = found
        .iter()
        .zip(truth)
        .map(|(f, t)| f.iter().take(k).filter(|id| t.contains(id)).count())
        .sum();
    hits as f64 / (k * truth.len()).max(1) as f64
}

fn pct(lat: &mut [Duration], q: f64) -> f64 {
    lat.sort();
    let i = ((lat.len() as f64 - 1.0) * q).round() as usize;
    lat.get(i).map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

fn options(k: usize, ef: u32, c: ConsistencyArg) -> SearchOptions {
    SearchOptions {
        top_k: k as u32,
        consistency: match c {
            ConsistencyArg::Strong => Consistency::Strong,
            ConsistencyArg::Bounded => Consistency::Bounded,
            ConsistencyArg::Eventually => Consistency::Eventually,
        },
        ef,
        ..Default::default()
    }
}

/// Searches each query in turn: ids found and latency percentiles.
pub(super) async fn sequential(
    client: &Client,
    d: &Data,
    k: usize,
    ef: u32,
    c: ConsistencyArg,
) -> anyhow::Result<(Vec<Vec<i64>>, f64, f64)> {
    let mut found = Vec::new();
    let mut lat = Vec::new();
    for q in &d.queries {
        let t = Instant::now();
        let hits = client
            .search("bench", std::slice::from_ref(q), &options(k, ef, c))
            .await?;
        lat.push(t.elapsed());
        found.push(
            hits[0]
                .iter()
                .filter_map(|h| h.id.as_i64())
                .collect::<Vec<_>>(),
        );
    }
    Ok((found, pct(&mut lat, 0.5), pct(&mut lat, 0.99)))
}

async fn qps(
    client: &Client,
    d: &Data,
    k: usize,
    ef: u32,
    c: ConsistencyArg,
    concurrency: usize,
    duration: Duration,
) -> anyhow::Result<f64> {
    let done = Arc::new(AtomicU64::new(0));
    let stop = Instant::now() + duration;
    let queries = Arc::new(d.queries.clone());
    let mut tasks = Vec::new();
    let started = Instant::now();
    for w in 0..concurrency.max(1) {
        let (client, done, queries) = (client.clone(), done.clone(), queries.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = w;
            while Instant::now() < stop {
                let q = &queries[i % queries.len()];
                client
                    .search("bench", std::slice::from_ref(q), &options(k, ef, c))
                    .await?;
                done.fetch_add(1, Ordering::Relaxed);
                i += concurrency;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64())
}

/// The data set as the peers read it: data.npy, queries.npy, truth.npy in `dir`.
pub(super) fn write_data(a: &SearchArgs, d: &Data, dir: &Path) -> anyhow::Result<()> {
    write_npy_f32(&dir.join("data.npy"), &d.rows, a.rows, a.dim)?;
    let q: Vec<f32> = d.queries.iter().flatten().copied().collect();
    write_npy_f32(&dir.join("queries.npy"), &q, d.queries.len(), a.dim)?;
    let t: Vec<u8> = d
        .truth
        .iter()
        .flat_map(|t| t.iter().flat_map(|v| v.to_le_bytes()))
        .collect();
    write_npy(&dir.join("truth.npy"), "<i8", d.truth.len(), a.k, &t)
}

fn write_npy_f32(path: &Path, values: &[f32], rows: usize, cols: usize) -> anyhow::Result<()> {
    write_npy(
        path,
        "<f4",
        rows,
        cols,
        &values
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect::<Vec<_>>(),
    )
}

fn write_npy(
    path: &Path,
    descr: &str,
    rows: usize,
    cols: usize,
    body: &[u8],
) -> anyhow::Result<()> {
    let mut header =
        format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': ({rows}, {cols}), }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend((header.len() as u16).to_le_bytes());
    out.extend(header.as_bytes());
    out.extend_from_slice(body);
    std::fs::write(path, out).with_context(|| format!("writing {}", path.display()))
}

fn peer_script() -> anyhow::Result<PathBuf> {
    let here = PathBuf::from("scripts/search_peer.py");
    if here.exists() {
        return Ok(here);
    }
    let built = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../scripts/search_peer.py"
    ));
    if built.exists() {
        return Ok(built);
    }
    bail!("scripts/search_peer.py not found (run from the repository's root)")
}

fn python(a: &SearchArgs) -> PathBuf {
    a.python.clone().unwrap_or_else(|| {
        let venv = PathBuf::from(".venv-peers/bin/python");
        if venv.exists() {
            venv
        } else {
            PathBuf::from("python3")
        }
    })
}

pub(super) async fn run_peer(
    a: &SearchArgs,
    peer: &str,
    extra: &[String],
    dir: &Path,
) -> anyhow::Result<Value> {
    let work = dir.join(peer);
    std::fs::create_dir_all(&work)?;
    let out = tokio::process::Command::new(python(a))
        .arg(peer_script()?)
        .args(["--peer", peer])
        .args(extra)
        .arg("--data")
        .arg(dir.join("data.npy"))
        .arg("--queries")
        .arg(dir.join("queries.npy"))
        .arg("--truth")
        .arg(dir.join("truth.npy"))
        .arg("--dir")
        .arg(&work)
        .args(["--k", &a.k.to_string(), "--batch", &a.batch.to_string()])
        .args(["--concurrency", &a.concurrency.to_string()])
        .args(["--seconds", &a.qps_duration.as_secs_f64().to_string()])
        .env("RUST_LOG", "error")
        .stdin(Stdio::null())
        .output()
        .await
        .with_context(|| format!("running the {peer} peer"))?;
    if !out.status.success() {
        bail!(
            "the {peer} peer failed (pip install pymilvus milvus-lite lancedb, or \
             scripts/install-bench-peers.sh): {}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .rev()
                .take(5)
                .collect::<Vec<_>>()
                .join(" | ")
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap_or("{}");
    Ok(serde_json::from_str(line)?)
}

pub async fn run(a: SearchArgs) -> anyhow::Result<()> {
    let base = a.data_dir.clone().unwrap_or_else(|| PathBuf::from("."));
    std::fs::create_dir_all(&base).with_context(|| format!("creating {}", base.display()))?;
    let scratch = tempfile::Builder::new()
        .prefix("walden-bench-search.")
        .tempdir_in(&base)?;
    let made = Instant::now();
    let d = data(&a);
    eprintln!(
        "data: {} x {} in {} clusters, {} queries, exact top-{} in {:.1} s",
        a.rows,
        a.dim,
        a.clusters,
        a.queries,
        a.k,
        made.elapsed().as_secs_f64()
    );
    // Segments large enough that every row is growing until the flush.
    let config = format!(
        "[node]\npchannels = {}\nsegment_max_rows = {}\n",
        a.shards.max(1),
        a.rows.max(1) * 2
    );
    let mut server = WaldenServer::start(&config, &scratch.path().join("data")).await?;
    let client = Client::connect(&server.addr).await?;
    let schema = Schema::from_json(&format!(
        r#"{{"fields":[{{"name":"id","type":"int64","primary_key":true}},
            {{"name":"emb","type":"float_vector","dim":{}}}]}}"#,
        a.dim
    ))?;
    client
        .collections()
        .create("bench", &schema, a.shards)
        .await?;
    let pid = server.pid().context("server pid")?;

    // Insert.
    let cpu0 = cpu_seconds(&pid).unwrap_or(0.0);
    let started = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let d = Arc::new(d);
    let mut tasks = Vec::new();
    for _ in 0..a.inserters.max(1) {
        let (client, schema, next, d) = (client.clone(), schema.clone(), next.clone(), d.clone());
        let (rows, per) = (a.rows, a.batch.max(1));
        tasks.push(tokio::spawn(async move {
            let api = client.collections();
            loop {
                let lo = next.fetch_add(per as u64, Ordering::Relaxed) as usize;
                if lo >= rows {
                    return anyhow::Ok(());
                }
                let b = batch(&schema, &d, lo, (lo + per).min(rows))?;
                api.insert("bench", None, &[b]).await?;
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    let insert_s = started.elapsed().as_secs_f64();
    let insert_cpu = cpu_seconds(&pid).unwrap_or(0.0) - cpu0;

    // Right after the insert: growing rows, exact.
    let (found, g50, g99) = sequential(&client, &d, a.k, 0, a.consistency).await?;
    let growing_recall = recall(&found, &d.truth, a.k);

    // Index, flush, load.
    let built = Instant::now();
    client
        .collections()
        .create_index(
            "bench",
            IndexSpec {
                field: "emb".into(),
                index_type: IndexType::Hnsw as i32,
                metric: MetricType::L2 as i32,
                params: r#"{"m": 16, "ef_construction": 128, "ef": 64}"#.into(),
            },
        )
        .await?;
    client
        .flush_and_wait("bench", Duration::from_secs(600))
        .await?;
    client.load("bench", 1, Duration::from_secs(1800)).await?;
    let build_s = built.elapsed().as_secs_f64();

    // The first ef whose recall reaches 0.95, then QPS at it.
    let mut tried = Vec::new();
    let mut chosen = None;
    for ef in [32u32, 64, 128, 256, 512] {
        let (found, p50, p99) = sequential(&client, &d, a.k, ef, a.consistency).await?;
        let r = recall(&found, &d.truth, a.k);
        tried.push(
            json!({"ef": ef, "recall": round(r), "p50_ms": round(p50), "p99_ms": round(p99)}),
        );
        if r >= 0.95 || ef == 512 {
            chosen = Some((ef, r, p50, p99));
            break;
        }
    }
    let (ef, indexed_recall, i50, i99) = chosen.context("no ef tried")?;
    let cpu1 = cpu_seconds(&pid).unwrap_or(0.0);
    let qps_started = Instant::now();
    let walden_qps = qps(
        &client,
        &d,
        a.k,
        ef,
        a.consistency,
        a.concurrency,
        a.qps_duration,
    )
    .await?;
    let cpu_per_query_us = (cpu_seconds(&pid).unwrap_or(0.0) - cpu1) * 1e6
        / (walden_qps * qps_started.elapsed().as_secs_f64()).max(1.0);
    drop(server.child.take().map(|mut c| {
        let _ = c.kill();
        c.wait()
    }));

    let walden = json!({
        "system": "walden",
        "insert_rows_per_s": round(a.rows as f64 / insert_s),
        "insert_server_cpu_us_per_row": round(insert_cpu * 1e6 / a.rows.max(1) as f64),
        "growing": {"p50_ms": round(g50), "p99_ms": round(g99), "recall": round(growing_recall)},
        "index": "hnsw m=16 ef_construction=128",
        "index_build_s": round(build_s),
        "indexed": {"setting": {"ef": ef}, "recall": round(indexed_recall), "p50_ms": round(i50),
                    "p99_ms": round(i99), "qps": round(walden_qps), "tried": tried,
                    "server_cpu_us_per_query": round(cpu_per_query_us)},
    });

    // Peers, on the same data, one at a time (the machine is shared).
    let mut peers = Vec::new();
    if !a.peer.is_empty() {
        let dir = scratch.path();
        write_data(&a, &d, dir)?;
        for p in &a.peer {
            eprintln!("running peer {}", p.name());
            peers.push(run_peer(&a, p.name(), &[], dir).await?);
        }
    }

    println!(
        "search: {} x {} rows, {} queries, top-{}, {} searches in flight for QPS",
        a.rows, a.dim, a.queries, a.k, a.concurrency
    );
    println!(
        "{:<12} {:>12} {:>14} {:>14} {:>10} {:>14} {:>14} {:>10} {:>8}",
        "system",
        "insert r/s",
        "growing p50",
        "growing p99",
        "build s",
        "indexed p50",
        "indexed p99",
        "QPS",
        "recall"
    );
    let line = |v: &Value| {
        println!(
            "{:<12} {:>12.0} {:>11.2} ms {:>11.2} ms {:>10.1} {:>11.2} ms {:>11.2} ms {:>10.1} {:>8.3}",
            v["system"].as_str().or(v["peer"].as_str()).unwrap_or("?"),
            v["insert_rows_per_s"].as_f64().unwrap_or(0.0),
            v["growing"]["p50_ms"].as_f64().unwrap_or(0.0),
            v["growing"]["p99_ms"].as_f64().unwrap_or(0.0),
            v["index_build_s"].as_f64().unwrap_or(0.0),
            v["indexed"]["p50_ms"].as_f64().unwrap_or(0.0),
            v["indexed"]["p99_ms"].as_f64().unwrap_or(0.0),
            v["indexed"]["qps"].as_f64().unwrap_or(0.0),
            v["indexed"]["recall"].as_f64().unwrap_or(0.0),
        );
    };
    line(&walden);
    for p in &peers {
        line(p);
    }
    let ratio = |key: &dyn Fn(&Value) -> f64, better_high: bool| -> Value {
        let w = key(&walden);
        let best = peers
            .iter()
            .filter(|p| p["indexed"]["recall"].as_f64().unwrap_or(0.0) >= 0.95 || !better_high)
            .map(key)
            .fold(None, |acc: Option<f64>, x| {
                Some(acc.map_or(x, |a| if better_high { a.max(x) } else { a.min(x) }))
            });
        best.map_or(Value::Null, |b| {
            json!(round(if better_high {
                w / b.max(1e-9)
            } else {
                b / w.max(1e-9)
            }))
        })
    };
    let vs = json!({
        "insert_vs_best_peer": ratio(&|v| v["insert_rows_per_s"].as_f64().unwrap_or(0.0), true),
        "growing_p50_speedup_vs_best_peer": ratio(&|v| v["growing"]["p50_ms"].as_f64().unwrap_or(0.0), false),
        "indexed_qps_vs_best_peer": ratio(&|v| v["indexed"]["qps"].as_f64().unwrap_or(0.0), true),
    });
    if !peers.is_empty() {
        println!("walden vs the best peer: {vs}");
    }
    let report = json!({
        "workload": "search",
        "rows": a.rows, "dim": a.dim, "clusters": a.clusters, "queries": a.queries, "k": a.k,
        "concurrency": a.concurrency,
        "systems": std::iter::once(walden.clone()).chain(peers.iter().cloned()).collect::<Vec<_>>(),
        "walden_vs_best_peer": vs,
    });
    write_json(a.json.as_deref(), &report)?;
    Ok(())
}
