//! Reads at every consistency level on data that sits idle, run as a user runs them: the CLI
//! against a real `walden standalone`, and against a real cluster (etcd, `walden coord`, two
//! `walden node`s and two `walden query-node`s) after a flush, an index and a load with two
//! replicas, then again after a query node dies and after a node is drained.
//!
//! An idle pchannel writes no stored TimeTick; its owner's idle TimeTicks (docs/design.md §8)
//! are what keep an idle shard's served tick up with the clock, so that a default (bounded)
//! read does not wait for a tick the shard would never reach.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::time::{Duration, Instant};

use common::{Server, cluster::Cluster, ok_json, walden};
use serde_json::{Value, json};

const DIM: usize = 8;
const ROWS: i64 = 5000;
const SCHEMA: &str = r#"{"fields":[
  {"name":"id","type":"int64","primary_key":true},
  {"name":"emb","type":"float_vector","dim":8},
  {"name":"title","type":"string"}]}"#;

/// Row `i`'s vector: distinct for every row, so a search for it finds it at distance 0.
fn vector(i: i64) -> Vec<f32> {
    (0..DIM)
        .map(|d| ((i * 7919 + d as i64 * 104_729) % 10_007) as f32 / 10_007.0)
        .collect()
}

/// Writes the schema and `ROWS` rows to `dir`; returns (schema, rows) paths.
fn files(dir: &std::path::Path) -> (String, String) {
    let schema = dir.join("schema.json");
    std::fs::write(&schema, SCHEMA).unwrap();
    let rows: Vec<Value> = (0..ROWS)
        .map(|i| json!({"id": i, "emb": vector(i), "title": format!("t{}", i % 10)}))
        .collect();
    let path = dir.join("rows.json");
    std::fs::write(&path, serde_json::to_string(&rows).unwrap()).unwrap();
    (
        schema.to_string_lossy().into_owned(),
        path.to_string_lossy().into_owned(),
    )
}

/// With the CLI, as a user would: collection `c` in 2 shards, `ROWS` rows, a flush.
fn create_insert_flush(addr: &str, dir: &std::path::Path) {
    let (schema, rows) = files(dir);
    ok_json(&[
        "collection",
        "create",
        "c",
        "--schema",
        &schema,
        "--shards",
        "2",
        "--addr",
        addr,
        "--json",
    ]);
    let inserted = ok_json(&[
        "insert",
        "--collection",
        "c",
        "--file",
        &rows,
        "--addr",
        addr,
        "--json",
    ]);
    assert_eq!(inserted["inserted"], json!(ROWS));
    let out = walden(&["flush", "--collection", "c", "--wait", "--addr", addr]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs a read command, which must succeed within `within`; returns its JSON.
fn timed(args: &[&str], within: Duration, what: &str) -> Value {
    let started = Instant::now();
    let out = walden(args);
    let took = started.elapsed();
    assert!(
        out.status.success(),
        "{what}: walden {args:?} failed after {took:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        took <= within,
        "{what}: walden {args:?} took {took:?} (more than {within:?})"
    );
    serde_json::from_slice(&out.stdout).expect("one JSON document")
}

/// `count`, `get`, `query` and `search` at the default level and at each level, each exact and
/// answered within `within`.
fn reads_at_every_level(addr: &str, within: Duration, what: &str) {
    let levels: [Option<&str>; 5] = [
        None,
        Some("strong"),
        Some("bounded"),
        Some("session"),
        Some("eventually"),
    ];
    for level in levels {
        let what = format!("{what}, consistency {}", level.unwrap_or("default"));
        let with = |mut args: Vec<String>| -> Vec<String> {
            args.extend(["--addr".into(), addr.into(), "--json".into()]);
            if let Some(l) = level {
                args.extend(["--consistency".into(), l.into()]);
            }
            args
        };
        let run = |args: Vec<String>| {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            timed(&args, within, &what)
        };
        let count = run(with(vec![
            "count".into(),
            "--collection".into(),
            "c".into(),
        ]));
        assert_eq!(count["count"], json!(ROWS), "{what}: count: {count}");
        let got = run(with(vec![
            "get".into(),
            "--collection".into(),
            "c".into(),
            "--ids".into(),
            "[7, 4321]".into(),
        ]));
        let ids: Vec<i64> = got["rows"]
            .as_array()
            .expect("rows")
            .iter()
            .map(|r| r["id"].as_i64().unwrap())
            .collect();
        assert_eq!(ids, [7, 4321], "{what}: get: {got}");
        let query = run(with(vec![
            "query".into(),
            "--collection".into(),
            "c".into(),
            "--filter".into(),
            "id >= 100 and id < 130 and title == \"t3\"".into(),
        ]));
        let mut ids: Vec<i64> = query["rows"]
            .as_array()
            .expect("rows")
            .iter()
            .map(|r| r["id"].as_i64().unwrap())
            .collect();
        ids.sort_unstable();
        assert_eq!(ids, [103, 113, 123], "{what}: query: {query}");
        for i in [0, 2500, ROWS - 1] {
            let found = run(with(vec![
                "search".into(),
                "--collection".into(),
                "c".into(),
                "--vector".into(),
                serde_json::to_string(&vector(i)).unwrap(),
                "--top-k".into(),
                "3".into(),
            ]));
            let first = &found["results"][0][0];
            assert_eq!(first["id"], json!(i), "{what}: search for row {i}: {found}");
            assert_eq!(first["distance"], json!(0.0), "{what}: {found}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_on_flushed_data_left_idle_after_a_restart_answer_at_once_at_every_level() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(&dir.path().join("data"), None).await;
    let addr = server.addr.clone();
    create_insert_flush(&addr, dir.path());
    server.stop();
    server.restart().await;
    let addr = server.addr.clone();
    // Quiet: no write reaches the pchannels, so nothing but idle TimeTicks moves their ticks.
    tokio::time::sleep(Duration::from_secs(20)).await;
    reads_at_every_level(&addr, Duration::from_secs(1), "standalone, 20 s idle");
}

/// Waits until `walden node drain`'s node serves no pchannel.
async fn drained(c: &Cluster, node: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(s) = c.status().await
            && !s.pchannels.is_empty()
            && s.pchannels.iter().all(|p| {
                p.node_id != node && p.state() == walden_proto::v1::AssignmentState::Assigned
            })
        {
            return;
        }
        assert!(Instant::now() < deadline, "node {node} never drained");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_with_query_nodes_answers_idle_reads_at_every_level_after_flush_load_a_kill_and_a_drain()
 {
    // The README's cluster block, with the tests' short leases: etcd, a coordinator, two
    // nodes on a shared store, two query nodes.
    let mut c = Cluster::start(1, 2, 2, "").await;
    c.add_query_node().await;
    c.add_query_node().await;
    let addr = c.addrs();
    let dir = tempfile::tempdir().unwrap();
    create_insert_flush(&addr, dir.path());
    let out = walden(&[
        "index",
        "create",
        "--collection",
        "c",
        "--field",
        "emb",
        "--type",
        "hnsw",
        "--metric",
        "l2",
        "--addr",
        &addr,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Within 15 s: a load is a graph build of 5 000 rows per shard on each query node.
    let started = Instant::now();
    let out = walden(&[
        "collection",
        "load",
        "c",
        "--replicas",
        "2",
        "--timeout",
        "15",
        "--addr",
        &addr,
    ]);
    let shards = if out.status.success() {
        String::new()
    } else {
        format!("{:?}", c.client().await.shards("c").await)
    };
    assert!(
        out.status.success(),
        "load after {:?}: {}\nshards: {shards}\nnodes: {}\nquery nodes: {}",
        started.elapsed(),
        String::from_utf8_lossy(&out.stderr),
        c.nodes.iter().map(|n| n.log()).collect::<String>(),
        c.query_nodes.iter().map(|n| n.log()).collect::<String>(),
    );
    for q in &c.query_nodes {
        assert!(q.log().contains("segments loaded"), "{}", q.log());
    }
    tokio::time::sleep(Duration::from_secs(20)).await;
    reads_at_every_level(&addr, Duration::from_secs(2), "cluster, 20 s idle");

    // A query node dies: the other holds a copy of every segment.
    c.query_nodes[0].kill();
    reads_at_every_level(
        &addr,
        Duration::from_secs(2),
        "cluster, a query node killed",
    );

    // A node is drained: its pchannels move to the other node, whose delegators start from
    // the manifests and hand the flushed segments to the surviving query node.
    let node = c.nodes[0].node_id.expect("node id");
    let out = walden(&["node", "drain", &node.to_string(), "--addr", &addr]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drained(&c, node).await;
    // The new owner's delegators start from the manifests and take up the synced copies at
    // once (a start that waited for copies before its shard could be synced stalled 30 s).
    let client = c.client().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(shards) = client.shards("c").await
            && shards.len() == 2
            && shards.iter().map(|s| s.sealed_rows).sum::<u64>() == ROWS as u64
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the moved shards never served their segments"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    reads_at_every_level(&addr, Duration::from_secs(2), "cluster, a node drained");
}
