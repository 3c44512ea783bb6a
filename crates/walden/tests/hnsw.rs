//! HNSW on a real `walden standalone`: recall@10 through interim graphs on growing rows, a
//! flush, an index, a load and a compaction (L2, 100 000 x 128), release stopping reads, and
//! the `ip` and `cosine` metrics at recall >= 0.95 with `/metrics` showing the graph was walked
//! (a search that fell back to exact search scores every row; a graph walk a few).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::collections::HashSet;

use common::{Server, ok_json, walden};
use rand::{Rng, SeedableRng, rngs::StdRng};
use serde_json::json;
use walden_client::{Client, Consistency, SearchOptions};
use walden_query::Metric;
use walden_schema::Schema;

const VECS: &str = r#"{"fields":[
  {"name":"id","type":"int64","primary_key":true},
  {"name":"emb","type":"float_vector","dim":128},
  {"name":"cluster","type":"int64"}]}"#;

/// `n` rows from `first` of a clustered set: 100 centres in [-1, 1]^128, each row its centre
/// plus noise in [-0.1, 0.1] per dimension.
fn clustered(
    schema: &Schema,
    centres: &[Vec<f32>],
    first: i64,
    n: usize,
    rng: &mut StdRng,
    out: &mut Vec<(i64, i64, Vec<f32>)>,
) -> arrow_array::RecordBatch {
    use std::sync::Arc;
    let mut ids = Vec::with_capacity(n);
    let mut clusters = Vec::with_capacity(n);
    let mut values = Vec::with_capacity(n * 128);
    for i in 0..n {
        let id = first + i as i64;
        let c = rng.random_range(0..centres.len());
        let v: Vec<f32> = centres[c]
            .iter()
            .map(|x| x + rng.random_range(-0.1f32..0.1))
            .collect();
        ids.push(id);
        clusters.push(c as i64);
        values.extend_from_slice(&v);
        out.push((id, c as i64, v));
    }
    let item = Arc::new(arrow_schema::Field::new(
        "item",
        arrow_schema::DataType::Float32,
        false,
    ));
    let emb = arrow_array::FixedSizeListArray::try_new(
        item,
        128,
        Arc::new(arrow_array::Float32Array::from(values)),
        None,
    )
    .unwrap();
    arrow_array::RecordBatch::try_new(
        schema.arrow().clone(),
        vec![
            Arc::new(arrow_array::Int64Array::from(ids)),
            Arc::new(emb),
            Arc::new(arrow_array::Int64Array::from(clusters)),
        ],
    )
    .unwrap()
}

/// The exact 10 nearest ids to `q` among `rows` passing `keep`.
fn nearest(rows: &[(i64, i64, Vec<f32>)], q: &[f32], keep: impl Fn(i64) -> bool) -> Vec<i64> {
    let mut all: Vec<(f32, i64)> = rows
        .iter()
        .filter(|r| keep(r.1))
        .map(|(id, _, v)| (walden_query::Metric::L2.distance(q, v), *id))
        .collect();
    all.sort_by(|a, b| a.0.total_cmp(&b.0));
    all.into_iter().take(10).map(|x| x.1).collect()
}

/// The top-10 ids of each query (strong).
async fn answers(client: &Client, queries: &[Vec<f32>]) -> Vec<Vec<i64>> {
    client
        .search(
            "vecs",
            queries,
            &SearchOptions {
                top_k: 10,
                consistency: Consistency::Strong,
                ..Default::default()
            },
        )
        .await
        .unwrap()
        .iter()
        .map(|hits| hits.iter().map(|h| h.id.as_i64().unwrap()).collect())
        .collect()
}

/// Recall@10 of the server's searches over `queries`; and the exact answers of filtered ones
/// (a filter keeping 1 % of rows is searched exactly) must be the brute-force answers.
async fn recall(client: &Client, rows: &[(i64, i64, Vec<f32>)], queries: &[Vec<f32>]) -> f64 {
    let results = answers(client, queries).await;
    let (mut found, mut wanted) = (0, 0);
    for (q, ids) in queries.iter().zip(&results) {
        let want: HashSet<i64> = nearest(rows, q, |_| true).into_iter().collect();
        found += ids.iter().filter(|id| want.contains(id)).count();
        wanted += want.len();
    }
    for (c, q) in queries.iter().enumerate().take(5) {
        let c = c as i64 * 7;
        let hits = client
            .search(
                "vecs",
                std::slice::from_ref(q),
                &SearchOptions {
                    top_k: 10,
                    filter: format!("cluster == {c}"),
                    consistency: Consistency::Strong,
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        let got: Vec<i64> = hits[0].iter().map(|h| h.id.as_i64().unwrap()).collect();
        assert_eq!(
            got,
            nearest(rows, q, |x| x == c),
            "exact within cluster {c}"
        );
    }
    found as f64 / wanted as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hnsw_after_flush_index_and_load_keeps_recall_through_a_compaction_and_release_stops_reads()
{
    let dir = tempfile::tempdir().unwrap();
    // 12 500-row segments: 4 per shard, which compaction (enabled later) merges.
    // Growing segments get an interim graph every 5 000 rows.
    let config = "[node]\nsegment_max_rows = 12500\n[query]\ninterim_index_rows = 5000\n\
                  [flush.compaction]\ninterval_ms = 300\nmin_segments = 4\n";
    let mut server = Server::start(
        &dir.path().join("data"),
        Some(&format!("{config}enabled = false\n")),
    )
    .await;
    let addr = server.addr.clone();
    let schema_file = dir.path().join("vecs.json");
    std::fs::write(&schema_file, VECS).unwrap();
    ok_json(&[
        "collection",
        "create",
        "vecs",
        "--schema",
        schema_file.to_str().unwrap(),
        "--shards",
        "2",
        "--addr",
        &addr,
        "--json",
    ]);
    let index = ok_json(&[
        "index",
        "create",
        "--collection",
        "vecs",
        "--field",
        "emb",
        "--type",
        "hnsw",
        "--metric",
        "l2",
        "--params",
        r#"{"ef": 96}"#,
        "--addr",
        &addr,
        "--json",
    ]);
    assert_eq!(
        index["indexes"][0],
        json!({"field": "emb", "type": "hnsw", "metric": "l2",
               "params": {"m": 16, "ef_construction": 128, "ef": 96}})
    );
    let schema = Schema::from_json(VECS).unwrap();
    let client = server.client().await;
    let mut rng = StdRng::seed_from_u64(95);
    let centres: Vec<Vec<f32>> = (0..100)
        .map(|_| (0..128).map(|_| rng.random_range(-1.0f32..1.0)).collect())
        .collect();
    let mut rows = Vec::new();
    for b in 0..50 {
        let batch = clustered(&schema, &centres, b * 2000, 2000, &mut rng, &mut rows);
        client
            .collections()
            .insert("vecs", None, &[batch])
            .await
            .unwrap();
    }
    let queries: Vec<Vec<f32>> = (0..50)
        .map(|i| {
            centres[i * 2]
                .iter()
                .map(|x| x + rng.random_range(-0.1f32..0.1))
                .collect()
        })
        .collect();
    // Growing rows (the segments not sealed yet): each has all but fewer than 5 000 of its rows
    // in its interim graph, the rest searched exactly.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let shards = client.shards("vecs").await.unwrap();
        let indexed: u64 = shards.iter().map(|s| s.growing_indexed_rows).sum();
        if indexed > 0
            && shards
                .iter()
                .all(|s| s.growing_rows - s.growing_indexed_rows < 5000 * s.growing_segments)
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "interim index: {shards:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let growing = recall(&client, &rows, &queries).await;
    assert!(
        growing >= 0.95,
        "growing rows through interim graphs: recall@10 {growing}"
    );

    ok_json(&[
        "flush",
        "--collection",
        "vecs",
        "--wait",
        "--addr",
        &addr,
        "--json",
    ]);
    let loaded = ok_json(&["collection", "load", "vecs", "--addr", &addr, "--json"]);
    assert_eq!(loaded["rows"], json!(100_000));
    assert_eq!(loaded["indexed_rows"], json!(100_000), "{loaded}");
    let before = recall(&client, &rows, &queries).await;
    assert!(before >= 0.95, "recall@10 after index and load: {before}");
    let answers_before = answers(&client, &queries).await;
    let described = ok_json(&[
        "index",
        "describe",
        "--collection",
        "vecs",
        "--addr",
        &addr,
        "--json",
    ]);
    let indexed: u64 = described["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["indexed_rows"].as_u64().unwrap())
        .sum();
    assert_eq!(indexed, 100_000);

    // Released: reads fail with a stable code until it is loaded again.
    ok_json(&["collection", "release", "vecs", "--addr", &addr, "--json"]);
    let out = walden(&["count", "--collection", "vecs", "--addr", &addr, "--json"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("NOT_LOADED"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    ok_json(&["collection", "load", "vecs", "--addr", &addr, "--json"]);

    // Compaction merges each shard's four segments: the same rows, none twice, and the
    // graph rebuilt for the merged segment.
    drop(client);
    server.stop();
    std::fs::write(server.data_dir.with_extension("toml"), config).unwrap();
    server.restart().await;
    let addr = server.addr.clone();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let s = ok_json(&[
            "segments",
            "--collection",
            "vecs",
            "--addr",
            &addr,
            "--json",
        ]);
        let list = s["segments"].as_array().unwrap();
        let compacted = list.iter().filter(|x| x["state"] == "compacted").count();
        let flushed = list.iter().filter(|x| x["state"] == "flushed").count();
        if compacted == 2 && flushed == 0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never compacted: {s}");
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
    // The shards swap the merged segments in once their graphs are built.
    loop {
        let d = ok_json(&[
            "index",
            "describe",
            "--collection",
            "vecs",
            "--addr",
            &addr,
            "--json",
        ]);
        let shards = d["shards"].as_array().unwrap();
        if shards.len() == 2 && shards.iter().all(|s| s["sealed_segments"] == 1) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never swapped in: {d}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
    let loaded = ok_json(&["collection", "load", "vecs", "--addr", &addr, "--json"]);
    assert_eq!(loaded["indexed_rows"], json!(100_000), "{loaded}");
    let client = server.client().await;
    assert_eq!(
        client.count("vecs", "", Consistency::Strong).await.unwrap(),
        100_000
    );
    let after = recall(&client, &rows, &queries).await;
    assert!(after >= 0.95, "recall@10 after compaction: {after}");
    // The same answers as before the compaction, up to the graphs' approximation (the merged
    // segment's graph is a new one).
    let answers_after = answers(&client, &queries).await;
    let same = answers_before
        .iter()
        .zip(&answers_after)
        .map(|(b, a)| b.iter().filter(|id| a.contains(id)).count())
        .sum::<usize>() as f64
        / (10 * queries.len()) as f64;
    assert!(same >= 0.95, "answers kept through the compaction: {same}");
    eprintln!("recall@10: growing {growing}, indexed {before}, after compaction {after}");
}

const SMALL: &str = r#"{"fields":[
  {"name":"id","type":"int64","primary_key":true},
  {"name":"emb","type":"float_vector","dim":32}]}"#;

/// Rows `first..first + vectors.len()` with `vectors`, as the collection's Arrow batch.
fn batch(schema: &Schema, first: i64, vectors: &[Vec<f32>]) -> arrow_array::RecordBatch {
    use std::sync::Arc;
    let dim = vectors[0].len();
    let ids: Vec<i64> = (first..first + vectors.len() as i64).collect();
    let values: Vec<f32> = vectors.iter().flatten().copied().collect();
    let item = Arc::new(arrow_schema::Field::new(
        "item",
        arrow_schema::DataType::Float32,
        false,
    ));
    let emb = arrow_array::FixedSizeListArray::try_new(
        item,
        dim as i32,
        Arc::new(arrow_array::Float32Array::from(values)),
        None,
    )
    .unwrap();
    arrow_array::RecordBatch::try_new(
        schema.arrow().clone(),
        vec![Arc::new(arrow_array::Int64Array::from(ids)), Arc::new(emb)],
    )
    .unwrap()
}

/// The search counters of the server's `/metrics`: (rows scored exactly, graph walks).
async fn search_counters(http: &str) -> (f64, f64) {
    let (status, body) = common::http_get(http, "/metrics").await;
    assert_eq!(status, 200);
    (
        common::metric(&body, "walden_search_rows_scored_total{path=\"exact\"}"),
        common::metric(&body, "walden_search_graph_walks_total"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hnsw_on_ip_and_cosine_keeps_recall_and_searches_walk_the_graph_not_every_row() {
    const ROWS: usize = 20_000;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(&dir.path().join("data"), None, true).await;
    let addr = server.addr.clone();
    let http = server.metrics_addr.clone().unwrap();
    let client = server.client().await;
    let schema_file = dir.path().join("small.json");
    std::fs::write(&schema_file, SMALL).unwrap();
    let schema = Schema::from_json(SMALL).unwrap();
    let mut rng = StdRng::seed_from_u64(32);
    // 50 directions, rows scattered around each (norms differ, so ip and cosine disagree).
    let centres: Vec<Vec<f32>> = (0..50)
        .map(|_| (0..32).map(|_| rng.random_range(-1.0f32..1.0)).collect())
        .collect();
    let vectors: Vec<Vec<f32>> = (0..ROWS)
        .map(|i| {
            let scale = rng.random_range(0.5f32..2.0);
            centres[i % 50]
                .iter()
                .map(|x| (x + rng.random_range(-0.2f32..0.2)) * scale)
                .collect()
        })
        .collect();
    let queries: Vec<Vec<f32>> = (0..50)
        .map(|i| {
            centres[(i * 7) % 50]
                .iter()
                .map(|x| x + rng.random_range(-0.2f32..0.2))
                .collect()
        })
        .collect();
    for metric in [Metric::Ip, Metric::Cosine] {
        let name = format!("v_{}", metric.name());
        ok_json(&[
            "collection",
            "create",
            &name,
            "--schema",
            schema_file.to_str().unwrap(),
            "--shards",
            "2",
            "--addr",
            &addr,
            "--json",
        ]);
        for (i, chunk) in vectors.chunks(5000).enumerate() {
            client
                .collections()
                .insert(&name, None, &[batch(&schema, (i * 5000) as i64, chunk)])
                .await
                .unwrap();
        }
        ok_json(&[
            "flush",
            "--collection",
            &name,
            "--wait",
            "--addr",
            &addr,
            "--json",
        ]);
        ok_json(&[
            "index",
            "create",
            "--collection",
            &name,
            "--field",
            "emb",
            "--type",
            "hnsw",
            "--metric",
            metric.name(),
            "--addr",
            &addr,
            "--json",
        ]);
        let loaded = ok_json(&["collection", "load", &name, "--addr", &addr, "--json"]);
        assert_eq!(loaded["indexed_rows"], json!(ROWS), "{loaded}");

        let before = search_counters(&http).await;
        let hits = client
            .search(
                &name,
                &queries,
                &SearchOptions {
                    top_k: 10,
                    consistency: Consistency::Strong,
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        let after = search_counters(&http).await;
        let (mut found, mut wanted) = (0, 0);
        for (q, got) in queries.iter().zip(&hits) {
            let mut all: Vec<(f32, i64)> = vectors
                .iter()
                .enumerate()
                .map(|(i, v)| (metric.key(metric.distance(q, v)), i as i64))
                .collect();
            all.sort_by(|a, b| a.0.total_cmp(&b.0));
            let want: HashSet<i64> = all.iter().take(10).map(|x| x.1).collect();
            found += got
                .iter()
                .filter(|h| want.contains(&h.id.as_i64().unwrap()))
                .count();
            wanted += want.len();
            // Reported distances are the metric's, best first.
            let d: Vec<f32> = got.iter().map(|h| h.distance).collect();
            assert!(
                d.windows(2).all(|w| metric.key(w[0]) <= metric.key(w[1])),
                "{metric:?}: {d:?}"
            );
        }
        let recall = found as f64 / wanted as f64;
        assert!(recall >= 0.95, "{metric:?}: recall@10 {recall}");
        // The graph did the work: each query walked it in each shard's segment, and scored far
        // fewer rows one by one than the collection holds (exact search scores all 20 000).
        let exact_per_query = (after.0 - before.0) / queries.len() as f64;
        let walks = after.1 - before.1;
        assert!(
            walks >= queries.len() as f64,
            "{metric:?}: {walks} graph walks"
        );
        assert!(
            exact_per_query < ROWS as f64 / 20.0,
            "{metric:?}: {exact_per_query} rows scored exactly per query"
        );
        eprintln!(
            "{metric:?}: recall@10 {recall}, {walks} graph walks, {exact_per_query} rows scored \
             exactly per query"
        );
    }
}
