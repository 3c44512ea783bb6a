//! Search and query on a real `walden standalone`: exact answers on growing rows right after
//! the insert is acknowledged (strong consistency), deletes and upserts, randomized filters
//! against a reference evaluator, the same answers after the rows are flushed to Parquet and
//! swapped in as sealed segments, and the CLI's output.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::collections::{BTreeMap, HashSet};

use common::{Server, ok_json, walden};
use rand::{Rng, SeedableRng, rngs::StdRng};
use serde_json::{Value, json};
use walden_client::{Client, Consistency, QueryOptions, SearchOptions};
use walden_proto::v1::DeleteIds;
use walden_schema::Schema;

const DIM: usize = 16;
const SCHEMA: &str = r#"{"fields":[
  {"name":"id","type":"int64","primary_key":true},
  {"name":"emb","type":"float_vector","dim":16},
  {"name":"tag","type":"string","nullable":true},
  {"name":"n","type":"int64"},
  {"name":"x","type":"double"}]}"#;

/// The rows the test believes are live, by id.
#[derive(Default)]
struct Model {
    rows: BTreeMap<i64, Value>,
}

fn vector(rng: &mut StdRng) -> Vec<f32> {
    (0..DIM).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

fn row(id: i64, rng: &mut StdRng) -> Value {
    let tags = ["apple", "apricot", "banana", "cherry"];
    json!({
        "id": id,
        "emb": vector(rng),
        "tag": if id % 7 == 0 { Value::Null } else { json!(tags[(id % 4) as usize]) },
        "n": rng.random_range(0..100i64),
        "x": rng.random_range(-10.0..10.0f64),
    })
}

fn emb(row: &Value) -> Vec<f32> {
    row["emb"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect()
}

fn l2(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
}

/// A random filter over the schema's scalar fields, and its reference evaluation.
#[derive(Debug, Clone)]
enum F {
    NLt(i64),
    NIn(Vec<i64>),
    XGe(f64),
    IdGt(i64),
    TagEq(&'static str),
    TagLike(&'static str),
    TagNull,
    Not(Box<F>),
    And(Box<F>, Box<F>),
    Or(Box<F>, Box<F>),
}

fn random_filter(rng: &mut StdRng, depth: u32) -> F {
    let leaf = depth == 0 || rng.random_bool(0.4);
    if leaf {
        match rng.random_range(0..7) {
            0 => F::NLt(rng.random_range(0..100)),
            1 => F::NIn(
                (0..rng.random_range(0..6))
                    .map(|_| rng.random_range(0..100))
                    .collect(),
            ),
            2 => F::XGe(rng.random_range(-10.0..10.0)),
            3 => F::IdGt(rng.random_range(0..2_000)),
            4 => F::TagEq(["apple", "banana", "kiwi"][rng.random_range(0..3)]),
            5 => F::TagLike(["ap%", "%an%", "_herry", "b%a"][rng.random_range(0..4)]),
            _ => F::TagNull,
        }
    } else {
        match rng.random_range(0..3) {
            0 => F::Not(Box::new(random_filter(rng, depth - 1))),
            1 => F::And(
                Box::new(random_filter(rng, depth - 1)),
                Box::new(random_filter(rng, depth - 1)),
            ),
            _ => F::Or(
                Box::new(random_filter(rng, depth - 1)),
                Box::new(random_filter(rng, depth - 1)),
            ),
        }
    }
}

impl F {
    fn text(&self) -> String {
        match self {
            F::NLt(c) => format!("n < {c}"),
            F::NIn(v) => format!(
                "n in [{}]",
                v.iter().map(i64::to_string).collect::<Vec<_>>().join(", ")
            ),
            F::XGe(c) => format!("x >= {c:?}"),
            F::IdGt(c) => format!("{c} < id"),
            F::TagEq(s) => format!("tag == \"{s}\""),
            F::TagLike(p) => format!("tag like '{p}'"),
            F::TagNull => "tag is null".into(),
            F::Not(f) => format!("not ({})", f.text()),
            F::And(a, b) => format!("({}) and ({})", a.text(), b.text()),
            F::Or(a, b) => format!("({}) || ({})", a.text(), b.text()),
        }
    }

    /// SQL's three-valued logic: `None` is unknown.
    fn eval(&self, r: &Value) -> Option<bool> {
        let tag = r["tag"].as_str();
        let like = |p: &str, s: &str| match p {
            "ap%" => s.starts_with("ap"),
            "%an%" => s.contains("an"),
            "_herry" => s.chars().count() == 6 && s.ends_with("herry"),
            "b%a" => s.starts_with('b') && s.ends_with('a') && s.len() >= 2,
            _ => unreachable!(),
        };
        match self {
            F::NLt(c) => Some(r["n"].as_i64().unwrap() < *c),
            F::NIn(v) => Some(v.contains(&r["n"].as_i64().unwrap())),
            F::XGe(c) => Some(r["x"].as_f64().unwrap() >= *c),
            F::IdGt(c) => Some(r["id"].as_i64().unwrap() > *c),
            F::TagEq(s) => tag.map(|t| t == *s),
            F::TagLike(p) => tag.map(|t| like(p, t)),
            F::TagNull => Some(tag.is_none()),
            F::Not(f) => f.eval(r).map(|b| !b),
            F::And(a, b) => match (a.eval(r), b.eval(r)) {
                (Some(false), _) | (_, Some(false)) => Some(false),
                (Some(true), Some(true)) => Some(true),
                _ => None,
            },
            F::Or(a, b) => match (a.eval(r), b.eval(r)) {
                (Some(true), _) | (_, Some(true)) => Some(true),
                (Some(false), Some(false)) => Some(false),
                _ => None,
            },
        }
    }
}

/// The ids of the 10 nearest live rows (passing `filter`) to `q`, by brute force.
fn brute_force(model: &Model, q: &[f32], filter: Option<&F>) -> Vec<i64> {
    let mut all: Vec<(f32, i64)> = model
        .rows
        .iter()
        .filter(|(_, r)| filter.is_none_or(|f| f.eval(r) == Some(true)))
        .map(|(id, r)| (l2(q, &emb(r)), *id))
        .collect();
    all.sort_by(|a, b| a.0.total_cmp(&b.0));
    all.into_iter().take(10).map(|x| x.1).collect()
}

async fn search_ids(client: &Client, q: &[f32], filter: &str) -> Vec<(i64, Value)> {
    let hits = client
        .search(
            "docs",
            &[q.to_vec()],
            &SearchOptions {
                top_k: 10,
                filter: filter.to_owned(),
                output_fields: vec!["emb".into()],
                consistency: Consistency::Strong,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(hits.len(), 1);
    hits[0]
        .iter()
        .map(|h| (h.id.as_i64().unwrap(), h.fields["emb"].clone()))
        .collect()
}

/// Every check against the model: nearest neighbours exactly (recall@10 = 1.0), the newest
/// version of upserted rows, no deleted key, filters and counts.
async fn check_all(client: &Client, model: &Model, rng: &mut StdRng, what: &str) {
    for _ in 0..10 {
        let q = vector(rng);
        let got = search_ids(client, &q, "").await;
        let ids: Vec<i64> = got.iter().map(|g| g.0).collect();
        assert_eq!(
            ids,
            brute_force(model, &q, None),
            "{what}: nearest neighbours"
        );
        for (id, e) in &got {
            assert_eq!(
                emb(&json!({ "emb": e })),
                emb(&model.rows[id]),
                "{what}: row {id} is its newest version"
            );
        }
    }
    for _ in 0..25 {
        let f = random_filter(rng, 3);
        let q = vector(rng);
        let got: Vec<i64> = search_ids(client, &q, &f.text())
            .await
            .into_iter()
            .map(|g| g.0)
            .collect();
        assert_eq!(
            got,
            brute_force(model, &q, Some(&f)),
            "{what}: search with {}",
            f.text()
        );
        let rows = client
            .query(
                "docs",
                &QueryOptions {
                    order_by_key: false,
                    filter: f.text(),
                    output_fields: vec!["n".into()],
                    consistency: Consistency::Strong,
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert!(!rows.truncated);
        let got: HashSet<i64> = rows
            .rows
            .iter()
            .map(|r| r["id"].as_i64().unwrap())
            .collect();
        let want: HashSet<i64> = model
            .rows
            .iter()
            .filter(|(_, r)| f.eval(r) == Some(true))
            .map(|(id, _)| *id)
            .collect();
        assert_eq!(got, want, "{what}: query {}", f.text());
        assert_eq!(got.len(), rows.rows.len(), "{what}: no row twice");
    }
    let count = client.count("docs", "", Consistency::Strong).await.unwrap();
    assert_eq!(count, model.rows.len() as u64, "{what}: count");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_and_query_are_exact_on_growing_rows_and_stay_so_after_a_flush() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(&dir.path().join("data"), None).await;
    let schema_file = dir.path().join("schema.json");
    std::fs::write(&schema_file, SCHEMA).unwrap();
    let addr = server.addr.clone();
    ok_json(&[
        "collection",
        "create",
        "docs",
        "--schema",
        schema_file.to_str().unwrap(),
        "--shards",
        "2",
        "--addr",
        &addr,
        "--json",
    ]);
    let schema = Schema::from_json(SCHEMA).unwrap();
    let client = server.client().await;
    let mut rng = StdRng::seed_from_u64(14);
    let mut model = Model::default();

    // Read your writes: each search right after an acknowledged insert sees it.
    for batch in 0..10 {
        let rows: Vec<Value> = (batch * 150..batch * 150 + 150)
            .map(|id| row(id, &mut rng))
            .collect();
        client
            .collections()
            .insert("docs", None, &[schema.rows_from_json(&rows).unwrap()])
            .await
            .unwrap();
        for r in &rows {
            model.rows.insert(r["id"].as_i64().unwrap(), r.clone());
        }
        let q = emb(&rows[rng.random_range(0..rows.len())]);
        let got: Vec<i64> = search_ids(&client, &q, "")
            .await
            .iter()
            .map(|g| g.0)
            .collect();
        assert_eq!(got, brute_force(&model, &q, None), "after insert {batch}");
    }

    // Deletes and upserts: the latest tick wins per key.
    let deleted: Vec<i64> = (0..1500).filter(|i| i % 10 == 3).collect();
    client
        .collections()
        .delete(
            "docs",
            None,
            &DeleteIds {
                int_ids: deleted.clone(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    for id in &deleted {
        model.rows.remove(id);
    }
    let upserted: Vec<Value> = (0..1500)
        .filter(|i| i % 10 == 5)
        .map(|id| row(id, &mut rng))
        .collect();
    client
        .collections()
        .upsert("docs", None, &[schema.rows_from_json(&upserted).unwrap()])
        .await
        .unwrap();
    for r in &upserted {
        model.rows.insert(r["id"].as_i64().unwrap(), r.clone());
    }
    check_all(&client, &model, &mut rng, "growing").await;

    // Flushed and swapped in as sealed segments: the same answers.
    ok_json(&[
        "flush",
        "--collection",
        "docs",
        "--wait",
        "--addr",
        &addr,
        "--json",
    ]);
    check_all(&client, &model, &mut rng, "flushed").await;
    // After kill -9 the delegator starts from the manifests: flushed rows come from the
    // Parquet files, the rest from the WAL, none twice.
    server.kill();
    server.restart().await;
    let client = server.client().await;
    check_all(&client, &model, &mut rng, "flushed, after kill -9").await;
    // Deletes after the flush reach the sealed segments.
    let late: Vec<i64> = (0..1500).filter(|i| i % 10 == 4).collect();
    client
        .collections()
        .delete(
            "docs",
            None,
            &DeleteIds {
                int_ids: late.clone(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    for id in &late {
        model.rows.remove(id);
    }
    check_all(&client, &model, &mut rng, "deleted after the flush").await;

    // The CLI.
    let q = vector(&mut rng);
    let out = ok_json(&[
        "search",
        "--collection",
        "docs",
        "--vector",
        &json!(q).to_string(),
        "--top-k",
        "3",
        "--output-fields",
        "tag,n",
        "--consistency",
        "strong",
        "--addr",
        &addr,
        "--json",
    ]);
    let hits = out["results"][0].as_array().unwrap();
    let want = brute_force(&model, &q, None);
    assert_eq!(hits.len(), 3);
    for (h, id) in hits.iter().zip(&want) {
        assert_eq!(h["id"], json!(id));
        assert_eq!(h["fields"]["n"], model.rows[id]["n"]);
        assert_eq!(h["fields"]["tag"], model.rows[id]["tag"]);
        assert!(h["distance"].as_f64().unwrap() >= 0.0);
    }
    let out = ok_json(&[
        "query",
        "--collection",
        "docs",
        "--filter",
        "id in [1, 2, 3, 4]",
        "--output-fields",
        "x",
        "--addr",
        &addr,
        "--json",
    ]);
    let ids: HashSet<i64> = out["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, HashSet::from([1, 2]), "3 and 4 were deleted");
    let out = ok_json(&["count", "--collection", "docs", "--addr", &addr, "--json"]);
    assert_eq!(out["count"], json!(model.rows.len()));
    let out = ok_json(&[
        "query",
        "--collection",
        "docs",
        "--limit",
        "5",
        "--addr",
        &addr,
        "--json",
    ]);
    assert_eq!(out["rows"].as_array().unwrap().len(), 5);
    assert_eq!(out["truncated"], json!(true), "a cut result says so");

    // Bad input: a typed error, nothing changed.
    for (args, code) in [
        (vec!["--filter", "emb > 1"], "INVALID_ARGUMENT"),
        (vec!["--filter", "n >"], "INVALID_ARGUMENT"),
    ] {
        let mut all = vec!["query", "--collection", "docs", "--addr", &addr, "--json"];
        all.extend(args);
        let out = walden(&all);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(code), "{err}");
    }
    let out = walden(&[
        "search",
        "--collection",
        "docs",
        "--vector",
        "[1, 2]",
        "--addr",
        &addr,
        "--json",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("dimensions"));

    // A dropped partition's rows are gone: growing ones at once, flushed ones after a restart.
    ok_json(&[
        "partition",
        "create",
        "--collection",
        "docs",
        "p2",
        "--addr",
        &addr,
        "--json",
    ]);
    let extra: Vec<Value> = (5000..5050).map(|id| row(id, &mut rng)).collect();
    client
        .collections()
        .insert(
            "docs",
            Some("p2"),
            &[schema.rows_from_json(&extra).unwrap()],
        )
        .await
        .unwrap();
    let live = model.rows.len() as u64;
    assert_eq!(
        client.count("docs", "", Consistency::Strong).await.unwrap(),
        live + 50
    );
    ok_json(&[
        "partition",
        "drop",
        "--collection",
        "docs",
        "p2",
        "--addr",
        &addr,
        "--json",
    ]);
    assert_eq!(
        client.count("docs", "", Consistency::Strong).await.unwrap(),
        live
    );
    ok_json(&[
        "flush",
        "--collection",
        "docs",
        "--wait",
        "--addr",
        &addr,
        "--json",
    ]);
    server.kill();
    server.restart().await;
    let client = server.client().await;
    assert_eq!(
        client.count("docs", "", Consistency::Strong).await.unwrap(),
        live
    );
    check_all(
        &client,
        &model,
        &mut rng,
        "after a partition drop and a restart",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn searches_while_compaction_swaps_segments_are_all_exact() {
    let dir = tempfile::tempdir().unwrap();
    // Segments of 250 rows, compacted as soon as two are flushed: swaps happen all the time.
    let config = "[node]\npchannels = 1\nsegment_max_rows = 250\n\
                  [flush.compaction]\ninterval_ms = 100\nmin_segments = 2\nsmall_rows = 100000\n";
    let server = Server::start_with(&dir.path().join("data"), Some(config), true).await;
    let http = server.metrics_addr.clone().unwrap();
    let client = server.client().await;
    let schema = Schema::from_json(SCHEMA).unwrap();
    client
        .collections()
        .create("docs", &schema, 1)
        .await
        .unwrap();
    let mut rng = StdRng::seed_from_u64(251);
    let mut model = Model::default();
    let compactions = |body: &str| common::metric(body, "walden_compactions_total{result=\"ok\"}");
    let (_, body) = common::http_get(&http, "/metrics").await;
    let before = compactions(&body);
    // Insert 4 000 rows in batches while searching after each batch: the flusher seals,
    // flushes and compacts behind the searches.
    let mut searches = 0;
    for b in 0..40 {
        let rows: Vec<Value> = (b * 100..b * 100 + 100)
            .map(|id| row(id, &mut rng))
            .collect();
        for r in &rows {
            model.rows.insert(r["id"].as_i64().unwrap(), r.clone());
        }
        client
            .collections()
            .insert("docs", None, &[schema.rows_from_json(&rows).unwrap()])
            .await
            .unwrap();
        for _ in 0..5 {
            let q = vector(&mut rng);
            let got: Vec<i64> = search_ids(&client, &q, "")
                .await
                .iter()
                .map(|g| g.0)
                .collect();
            assert_eq!(got, brute_force(&model, &q, None), "batch {b}");
            searches += 1;
        }
        assert_eq!(
            client.count("docs", "", Consistency::Strong).await.unwrap(),
            model.rows.len() as u64,
            "batch {b}: count"
        );
        // Room for the flusher: compactions interleave with the batches.
        tokio::time::sleep(std::time::Duration::from_millis(60)).await;
    }
    // Then seal the last rows and search on until compaction settled, through the last swaps.
    client.collections().flush("docs").await.unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let q = vector(&mut rng);
        let got: Vec<i64> = search_ids(&client, &q, "")
            .await
            .iter()
            .map(|g| g.0)
            .collect();
        assert_eq!(got, brute_force(&model, &q, None), "after the inserts");
        searches += 1;
        let shards = client.shards("docs").await.unwrap();
        if shards
            .iter()
            .all(|s| s.growing_rows == 0 && s.sealed_segments <= 2)
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never settled: {shards:?}"
        );
    }
    let (_, body) = common::http_get(&http, "/metrics").await;
    let ran = compactions(&body) - before;
    assert!(ran >= 3.0, "only {ran} compactions ran during the searches");
    eprintln!("{searches} searches exact through {ran} compactions");
}
