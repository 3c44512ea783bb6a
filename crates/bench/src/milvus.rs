//! `walden bench milvus`: the `bench search` workload through pymilvus, against Walden's
//! Milvus API and against milvus-lite, in one sitting (`scripts/search_peer.py` drives both):
//! insert rows/s (batches of `--batch`), strong search latency on fresh (growing) rows, and
//! QPS at recall@k ≥ 0.95 once indexed and loaded. Walden's server CPU per operation is read
//! from /proc for each phase, and the same searches are then run through Walden's native API
//! on the same server and data: what the Milvus API adds to the server's CPU per search.

use std::path::PathBuf;

use anyhow::Context;
use serde_json::{Value, json};
use walden_client::Client;

use super::{
    report::{round, write_json},
    search::{self, SearchArgs},
    server::{WaldenServer, cpu_seconds},
};

pub async fn run(a: SearchArgs) -> anyhow::Result<()> {
    let base = a.data_dir.clone().unwrap_or_else(|| PathBuf::from("."));
    std::fs::create_dir_all(&base).with_context(|| format!("creating {}", base.display()))?;
    let scratch = tempfile::Builder::new()
        .prefix("walden-bench-milvus.")
        .tempdir_in(&base)?;
    let d = search::data(&a);
    search::write_data(&a, &d, scratch.path())?;
    // Segments large enough that every row is growing until the flush.
    let config = format!(
        "[node]\npchannels = {}\nsegment_max_rows = {}\n",
        a.shards.max(1),
        a.rows.max(1) * 2
    );
    let server = WaldenServer::start_with_milvus(&config, &scratch.path().join("data")).await?;
    let pid = server.pid().context("server pid")?;
    let uri = format!(
        "http://{}",
        server.milvus.clone().context("the Milvus API's address")?
    );
    eprintln!("walden through pymilvus ({uri})");
    let extra = [
        "--uri".to_owned(),
        uri,
        "--server-pid".to_owned(),
        pid.clone(),
    ];
    let mut walden = search::run_peer(&a, "walden", &extra, scratch.path()).await?;
    walden["system"] = json!("walden (Milvus API)");

    // The same strong searches at the same ef through the native API, on the same server.
    let ef = walden["indexed"]["setting"].as_u64().unwrap_or(64) as u32;
    let client = Client::connect(&server.addr).await?;
    let cpu0 = cpu_seconds(&pid).unwrap_or(0.0);
    let (found, p50, p99) =
        search::sequential(&client, &d, a.k, ef, search::ConsistencyArg::Strong).await?;
    let native_us = (cpu_seconds(&pid).unwrap_or(0.0) - cpu0) * 1e6 / d.queries.len().max(1) as f64;
    let native = json!({
        "ef": ef,
        "recall": round(search::recall(&found, &d.truth, a.k)),
        "p50_ms": round(p50),
        "p99_ms": round(p99),
        "server_cpu_us_per_search": round(native_us),
    });
    drop(server);

    let mut peers = Vec::new();
    if a.peer.is_empty() || a.peer.contains(&search::Peer::MilvusLite) {
        eprintln!("milvus-lite through pymilvus");
        peers.push(search::run_peer(&a, "milvus-lite", &[], scratch.path()).await?);
    }

    let api_us = walden["server_cpu"]["indexed_us_per_search"]
        .as_f64()
        .unwrap_or(0.0);
    let num = |v: &Value, path: &[&str]| path.iter().fold(v, |v, k| &v[*k]).as_f64().unwrap_or(0.0);
    println!(
        "milvus: {} x {} rows through pymilvus, {} queries, top-{}, {} searches in flight for QPS",
        a.rows, a.dim, a.queries, a.k, a.concurrency
    );
    println!(
        "{:<22} {:>12} {:>14} {:>14} {:>10} {:>12} {:>8}",
        "system", "insert r/s", "fresh p50", "fresh p99", "build s", "QPS", "recall"
    );
    for v in std::iter::once(&walden).chain(&peers) {
        println!(
            "{:<22} {:>12.0} {:>11.2} ms {:>11.2} ms {:>10.1} {:>12.1} {:>8.3}",
            v["system"].as_str().or(v["peer"].as_str()).unwrap_or("?"),
            num(v, &["insert_rows_per_s"]),
            num(v, &["growing", "p50_ms"]),
            num(v, &["growing", "p99_ms"]),
            num(v, &["index_build_s"]),
            num(v, &["indexed", "qps"]),
            num(v, &["indexed", "recall"]),
        );
    }
    println!(
        "server CPU per indexed search (ef {ef}, strong, one at a time): Milvus API {api_us:.0} µs, \
         native API {native_us:.0} µs ({:+.0}%)",
        (api_us / native_us.max(1e-9) - 1.0) * 100.0
    );
    // The machine's limit for inserts through one pymilvus client: the client alone, its
    // Insert answered in process (scripts/search_peer.py `client_alone`).
    let alone = num(&walden, &["insert_client_alone_rows_per_s"]);
    println!(
        "one pymilvus client alone (no server) makes {alone:.0} rows/s of these inserts: Walden \
         takes {:.0}% of that",
        num(&walden, &["insert_rows_per_s"]) / alone.max(1e-9) * 100.0
    );
    let vs = peers.first().map(|lite| {
        json!({
            "insert": round(num(&walden, &["insert_rows_per_s"]) / num(lite, &["insert_rows_per_s"]).max(1e-9)),
            "insert_limit_of_one_client": round(alone / num(lite, &["insert_rows_per_s"]).max(1e-9)),
            "indexed_qps": round(num(&walden, &["indexed", "qps"]) / num(lite, &["indexed", "qps"]).max(1e-9)),
            "fresh_p50_speedup": round(num(lite, &["growing", "p50_ms"]) / num(&walden, &["growing", "p50_ms"]).max(1e-9)),
        })
    });
    if let Some(vs) = &vs {
        println!("walden vs milvus-lite: {vs}");
    }
    let report = json!({
        "workload": "milvus",
        "rows": a.rows, "dim": a.dim, "clusters": a.clusters, "queries": a.queries, "k": a.k,
        "concurrency": a.concurrency,
        "systems": std::iter::once(walden.clone()).chain(peers.iter().cloned()).collect::<Vec<_>>(),
        "native_api_same_server": native,
        "milvus_api_cpu_overhead": round(api_us / native_us.max(1e-9) - 1.0),
        "walden_vs_milvus_lite": vs,
    });
    write_json(a.json.as_deref(), &report)
}
