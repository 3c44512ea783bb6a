//! Historical data on a real `walden standalone`: sealed segments flushed to Parquet and read
//! back with pyarrow, kill -9 while flushing and compacting, and the WAL truncated behind the
//! flushed data (after a restart with no writes too) and bounded under a steady load.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    time::{Duration, Instant},
};

use common::{Server, ok_json};
use rand::{Rng, SeedableRng, rngs::StdRng};
use serde_json::{Value, json};
use walden_client::{Client, ConsumerOptions, DeliverFrom, ProducerOptions};
use walden_common::{ErrorCode, MessageId};
use walden_message::{MessageType, MutableMessage};
use walden_proto::v1::DeleteIds;
use walden_schema::Schema;

const SCHEMA: &str = r#"{"fields":[
  {"name":"id","type":"int64","primary_key":true},
  {"name":"emb","type":"float_vector","dim":4},
  {"name":"title","type":"string","nullable":true},
  {"name":"meta","type":"json","nullable":true},
  {"name":"score","type":"float","nullable":true},
  {"name":"weight","type":"double"},
  {"name":"ok","type":"bool","nullable":true}]}"#;

fn pyarrow_rows(segments: &Value) -> Value {
    common::parquet_rows(segments, "id")
}

/// Creates collection `docs` of [`SCHEMA`] with the CLI, as a user would.
fn create_docs(dir: &std::path::Path, addr: &str, shards: u32) {
    let schema_file = dir.join("schema.json");
    std::fs::write(&schema_file, SCHEMA).unwrap();
    let shards = shards.to_string();
    let file = schema_file.to_str().unwrap();
    ok_json(&[
        "collection",
        "create",
        "docs",
        "--schema",
        file,
        "--shards",
        &shards,
        "--addr",
        addr,
        "--json",
    ]);
}

/// Inserts the rows `ids` (version 0) in batches of `per`.
async fn insert_rows(client: &Client, schema: &Schema, ids: std::ops::Range<i64>, per: usize) {
    for chunk in ids.collect::<Vec<_>>().chunks(per) {
        let rows: Vec<Value> = chunk.iter().map(|i| row(*i, 0)).collect();
        client
            .collections()
            .insert("docs", None, &[schema.rows_from_json(&rows).unwrap()])
            .await
            .unwrap();
    }
}

/// One row of the test schema; every value exact in float32.
fn row(id: i64, version: i64) -> Value {
    let f = (id % 1000) as f64 + version as f64 * 0.25;
    json!({
        "id": id,
        "emb": [f, -f, 0.5, version as f64],
        "title": if id % 3 == 0 { Value::Null } else { json!(format!("t{id}.{version}")) },
        "meta": if id % 4 == 0 { Value::Null } else { json!({"id": id, "v": version, "tags": ["a", id % 7]}) },
        "score": if id % 5 == 0 { Value::Null } else { json!(f * 2.0) },
        "weight": f / 8.0,
        "ok": if id % 6 == 0 { Value::Null } else { json!(id % 2 == 0) },
    })
}

async fn pchannel_status(client: &Client) -> Vec<walden_proto::v1::PChannelStatus> {
    client.status().await.unwrap().pchannels
}

/// Compares pyarrow's rows with the expected ones, field by field (JSON compared parsed).
fn assert_rows_equal(got: &Value, want: &BTreeMap<i64, Value>) {
    let got = got["rows"].as_array().unwrap();
    let ids: Vec<i64> = got.iter().map(|r| r["id"].as_i64().unwrap()).collect();
    let want_ids: Vec<i64> = want.keys().copied().collect();
    assert_eq!(ids, want_ids, "the live rows' keys");
    for r in got {
        let id = r["id"].as_i64().unwrap();
        let w = &want[&id];
        for field in ["emb", "title", "score", "weight", "ok"] {
            assert_eq!(r[field], w[field], "row {id}, field {field}");
        }
        let meta: Value = match &r["meta"] {
            Value::Null => Value::Null,
            Value::String(s) => serde_json::from_str(s).unwrap(),
            other => panic!("meta is {other}"),
        };
        assert_eq!(meta, w["meta"], "row {id}, field meta");
    }
}

/// Small segments so that rows seal into several; compaction (once enabled) merges them and
/// applies every delete log.
const FLUSH_CONFIG: &str = "[node]\npchannels = 4\nsegment_max_rows = 120\n\
     [flush]\ncheckpoint_interval_ms = 100\n\
     [flush.compaction]\ninterval_ms = 300\nmin_segments = 3\nmax_delete_logs = 1\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn flushed_files_read_by_pyarrow_hold_the_inserted_rows_minus_the_deleted_field_by_field() {
    let dir = tempfile::tempdir().unwrap();
    // Small segments so that rows seal into several; compaction merges some of them.
    let mut server = Server::start(
        &dir.path().join("data"),
        Some(&format!("{FLUSH_CONFIG}enabled = false\n")),
    )
    .await;
    let addr = server.addr.clone();
    create_docs(dir.path(), &addr, 2);
    ok_json(&[
        "partition",
        "create",
        "--collection",
        "docs",
        "p1",
        "--addr",
        &addr,
        "--json",
    ]);
    let client = server.client().await;
    let api = client.collections();
    let (info, schema) = api.schema("docs").await.unwrap();
    let mut want: BTreeMap<i64, Value> = BTreeMap::new();
    let batch = |rows: &[Value]| schema.rows_from_json(rows).unwrap();
    // Inserts into two partitions.
    for chunk in (0..600i64).collect::<Vec<_>>().chunks(50) {
        let rows: Vec<Value> = chunk.iter().map(|i| row(*i, 0)).collect();
        let partition = (chunk[0] % 100 == 50).then_some("p1");
        api.insert("docs", partition, &[batch(&rows)])
            .await
            .unwrap();
        for (i, r) in chunk.iter().zip(rows) {
            want.insert(*i, r);
        }
    }
    // Deletes, some of which are upserted again later; upserts of live rows.
    let deleted: Vec<i64> = (0..600).filter(|i| i % 9 == 0).collect();
    api.delete(
        "docs",
        None,
        &DeleteIds {
            int_ids: deleted.clone(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    for i in &deleted {
        want.remove(i);
    }
    let upserted: Vec<Value> = (0..600i64)
        .filter(|i| i % 10 == 0)
        .map(|i| row(i, 1))
        .collect();
    api.upsert("docs", None, &[batch(&upserted)]).await.unwrap();
    for r in upserted {
        want.insert(r["id"].as_i64().unwrap(), r);
    }
    // A committed transaction's rows are flushed; a rolled-back one's are not.
    let shard0: Vec<i64> = (1000..1200i64)
        .filter(|i| walden_schema::shard_of_pk(&i.to_le_bytes(), 2) == 0)
        .collect();
    let v0 = &info.vchannels[0];
    let producer = client.producer(&v0.pchannel, ProducerOptions::default());
    for (commit, ids) in [(true, &shard0[..10]), (false, &shard0[10..20])] {
        let rows: Vec<Value> = ids.iter().map(|i| row(*i, 2)).collect();
        let txn = producer.begin_txn(&v0.name, None).await.unwrap();
        let mut m = MutableMessage::new(
            MessageType::Insert,
            v0.name.clone(),
            schema.encode_ipc(&batch(&rows)).unwrap(),
        );
        m.coll.partition = "_default".into();
        txn.append(m).await.unwrap();
        if commit {
            txn.commit().await.unwrap();
            for r in rows {
                want.insert(r["id"].as_i64().unwrap(), r);
            }
        } else {
            txn.rollback().await.unwrap();
        }
    }
    let flushed = ok_json(&[
        "flush",
        "--collection",
        "docs",
        "--wait",
        "--addr",
        &addr,
        "--json",
    ]);
    assert!(!flushed["segments"].as_array().unwrap().is_empty());
    let segments = ok_json(&[
        "segments",
        "--collection",
        "docs",
        "--addr",
        &addr,
        "--json",
    ]);
    for s in segments["segments"].as_array().unwrap() {
        let state = s["state"].as_str().unwrap();
        assert!(
            matches!(state, "flushed" | "compacted"),
            "after flush --wait: {s}"
        );
        for f in s["files"].as_array().unwrap() {
            assert!(f["url"].as_str().unwrap().starts_with("file:///"), "{f}");
        }
    }
    let got = pyarrow_rows(&segments);
    assert!(
        got["data_files"].as_u64().unwrap() >= 4,
        "{}",
        got["data_files"]
    );
    assert!(
        got["delta_files"].as_u64().unwrap() >= 1,
        "{}",
        got["delta_files"]
    );
    assert_eq!(
        got["types"]["emb"],
        "fixed_size_list<item: float not null>[4]"
    );
    assert_eq!(got["types"]["meta"], "string");
    assert_eq!(got["types"]["score"], "float");
    assert_eq!(got["types"]["weight"], "double");
    assert_rows_equal(&got, &want);
    // With compaction on, it merges the small segments and applies the delete logs (the
    // deletes and the upserts'): the same rows, with no delete log left to apply. The files
    // read above are still there (the grace period).
    drop(api);
    drop(producer);
    drop(client);
    server.stop();
    std::fs::write(server.data_dir.with_extension("toml"), FLUSH_CONFIG).unwrap();
    server.restart().await;
    let addr = server.addr.clone();
    let deadline = Instant::now() + Duration::from_secs(60);
    let compacted = loop {
        let segments = ok_json(&[
            "segments",
            "--collection",
            "docs",
            "--addr",
            &addr,
            "--json",
        ]);
        let list = segments["segments"].as_array().unwrap();
        let deleted: u64 = list
            .iter()
            .filter(|s| s["state"] == "compacted")
            .map(|s| s["deleted_rows"].as_u64().unwrap())
            .sum();
        let deltas = list
            .iter()
            .flat_map(|s| s["files"].as_array().unwrap())
            .filter(|f| f["kind"] == "delta")
            .count();
        if deltas == 0 && deleted > 0 {
            break segments;
        }
        assert!(Instant::now() < deadline, "never compacted: {segments}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let after = pyarrow_rows(&compacted);
    assert_rows_equal(&after, &want);
    assert_eq!(
        pyarrow_rows(&segments)["rows"],
        got["rows"],
        "the old files still read"
    );
    let got = after;
    // Each row is in the files once, however many segments were merged.
    for (id, copies) in got["row_copies"].as_object().unwrap() {
        let id: i64 = id.parse().unwrap();
        let upserted = id < 600 && id % 10 == 0;
        assert!(
            copies.as_u64().unwrap() <= 1 + u64::from(upserted),
            "row {id} x{copies}"
        );
    }
}

/// Inserts batches of `per` rows with new ids until `stop`, recording the acknowledged ids.
async fn insert_until(
    client: &Client,
    schema: &Schema,
    next: &mut i64,
    acked: &mut BTreeSet<i64>,
    sent: &mut BTreeSet<i64>,
    until: Instant,
) {
    let api = client.collections();
    while Instant::now() < until {
        let ids: Vec<i64> = (*next..*next + 10).collect();
        *next += 10;
        sent.extend(&ids);
        let rows: Vec<Value> = ids.iter().map(|i| row(*i, 0)).collect();
        let b = schema.rows_from_json(&rows).unwrap();
        // A slow partition: its segment stays growing across many flushes of the other, so
        // the flushed-through position stays behind them and every restart re-reads
        // segments that are already in the manifest.
        let partition = (ids[0] % 200 == 0).then_some("slow");
        if api.insert("docs", partition, &[b]).await.is_ok() {
            acked.extend(&ids);
        } else {
            return;
        }
    }
}

/// Every object under the flusher's prefix of the data dir's object store.
fn segment_files(data: &std::path::Path) -> BTreeSet<String> {
    fn walk(p: &std::path::Path, out: &mut BTreeSet<String>) {
        for e in std::fs::read_dir(p).into_iter().flatten().flatten() {
            if e.path().is_dir() {
                walk(&e.path(), out);
            } else if e.path().extension().is_some_and(|x| x == "parquet") {
                out.insert(format!("file://{}", e.path().display()));
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(&data.join("objects/segments"), &mut out);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_while_flushing_and_compacting_leaves_every_row_in_the_files_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // Seals every 20 rows, compacts every 200 ms; each kill is aimed at a flush or a compaction
    // under way. Unreferenced files go at once (no grace) at the next sweep.
    let config = "[node]\npchannels = 2\nsegment_max_rows = 20\n\
                  [flush]\ncheckpoint_interval_ms = 50\ngc_grace_ms = 0\ngc_interval_ms = 200\n\
                  [flush.compaction]\ninterval_ms = 200\nmin_segments = 2\nsmall_rows = 100000\n";
    let mut server = Server::start_with(&data, Some(config), true).await;
    create_docs(dir.path(), &server.addr, 2);
    ok_json(&[
        "partition",
        "create",
        "--collection",
        "docs",
        "slow",
        "--addr",
        &server.addr,
        "--json",
    ]);
    let (mut acked, mut sent) = (BTreeSet::new(), BTreeSet::new());
    let mut next = 0i64;
    let mut rng = StdRng::seed_from_u64(13);
    const KILLS: usize = 12;
    let (mut mid_flush, mut mid_compaction) = (0, 0);
    for round in 0..KILLS {
        let client = server.client().await;
        let (_, schema) = client.collections().schema("docs").await.unwrap();
        let until = Instant::now() + Duration::from_millis(rng.random_range(300..1200));
        insert_until(&client, &schema, &mut next, &mut acked, &mut sent, until).await;
        if round % 3 == 0 {
            let _ = client.collections().flush("docs").await;
        }
        // Aim the kill: alternately at a compaction and a flush under way (the flusher's own
        // gauges, read a moment before it), or anywhere if none comes within 1.5 s.
        let http = server.metrics_addr.clone().unwrap();
        let aim = if round % 2 == 0 {
            "walden_compactions_in_progress"
        } else {
            "walden_flushes_in_progress"
        };
        let aim_until = Instant::now() + Duration::from_millis(1500);
        let body = loop {
            let (_, body) = common::http_get(&http, "/metrics").await;
            if common::metric(&body, aim) > 0.0 || Instant::now() > aim_until {
                break body;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        server.kill();
        if common::metric(&body, "walden_flushes_in_progress") > 0.0 {
            mid_flush += 1;
        }
        if common::metric(&body, "walden_compactions_in_progress") > 0.0 {
            mid_compaction += 1;
        }
        server.restart().await;
    }
    // The kills landed where they are meant to, several times each.
    eprintln!("{KILLS} kills: {mid_flush} mid-flush, {mid_compaction} mid-compaction");
    assert!(
        mid_flush >= 3 && mid_compaction >= 3,
        "{KILLS} kills: {mid_flush} mid-flush, {mid_compaction} mid-compaction"
    );
    let client = server.client().await;
    let addr = server.addr.clone();
    ok_json(&[
        "flush",
        "--collection",
        "docs",
        "--wait",
        "--addr",
        &addr,
        "--json",
    ]);
    // Once the sweeps ran and compaction settled, the files on disk are exactly those the
    // manifests name (files are read only then: with no grace, a swap deletes at once).
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = Value::Null;
    let segments = loop {
        let now = ok_json(&[
            "segments",
            "--collection",
            "docs",
            "--addr",
            &addr,
            "--json",
        ]);
        let referenced: BTreeSet<String> = now["segments"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|s| s["files"].as_array().unwrap().iter())
            .map(|f| f["url"].as_str().unwrap().to_owned())
            .collect();
        let on_disk = segment_files(&data);
        if on_disk == referenced && now == last {
            break now;
        }
        assert!(
            Instant::now() < deadline,
            "orphans: {:?}, missing: {:?}",
            on_disk.difference(&referenced).collect::<Vec<_>>(),
            referenced.difference(&on_disk).collect::<Vec<_>>()
        );
        last = now;
        tokio::time::sleep(Duration::from_millis(700)).await;
    };
    let got = pyarrow_rows(&segments);
    let copies: HashMap<i64, u64> = got["row_copies"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.parse().unwrap(), v.as_u64().unwrap()))
        .collect();
    let twice: Vec<_> = copies.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "{} rows in the files more than once, e.g. {:?}",
        twice.len(),
        &twice[..twice.len().min(10)]
    );
    let missing: Vec<_> = acked.iter().filter(|i| !copies.contains_key(i)).collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged rows not in the files, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    let unknown: Vec<_> = copies.keys().filter(|i| !sent.contains(i)).collect();
    assert!(unknown.is_empty(), "rows nobody sent: {unknown:?}");
    assert!(acked.len() > 500, "only {} rows written", acked.len());
    drop(client);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_wal_is_truncated_behind_flushed_data_after_a_restart_with_no_writes_and_reads_below_get_truncated()
 {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // Retention holds everything at first; small WAL segments so that truncation can delete
    // whole ones.
    let base = "[node]\npchannels = 1\nsegment_max_rows = 500\n\
                [wal_local]\nsegment_bytes = 262144\n\
                [flush]\ncheckpoint_interval_ms = 100\n";
    let mut server = Server::start(
        &data,
        Some(&format!("{base}[wal.retention]\ntime_ms = 3600000\n")),
    )
    .await;
    create_docs(dir.path(), &server.addr, 1);
    let client = server.client().await;
    let (_, schema) = client.collections().schema("docs").await.unwrap();
    insert_rows(&client, &schema, 0..3000, 100).await;
    ok_json(&[
        "flush",
        "--collection",
        "docs",
        "--wait",
        "--addr",
        &server.addr,
        "--json",
    ]);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before = pchannel_status(&client).await.remove(0);
    assert_eq!(before.truncation_point, 0, "retention keeps the last hour");
    assert!(before.wal_bytes > 200_000, "{}", before.wal_bytes);
    drop(client);
    // Restart with no retention and write nothing: truncation still runs.
    server.kill();
    std::fs::write(
        data.with_extension("toml"),
        format!("{base}[wal.retention]\ntime_ms = 0\n"),
    )
    .unwrap();
    server.restart().await;
    let client = server.client().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let after = loop {
        let s = pchannel_status(&client).await.remove(0);
        if s.truncation_point > 0 && s.wal_bytes < before.wal_bytes / 2 {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "no truncation after a restart: point {}, {} of {} bytes",
            s.truncation_point,
            s.wal_bytes,
            before.wal_bytes
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        after.truncation_point >= before.last_message_id / 2,
        "{after:?}"
    );
    // Below the truncation point: TRUNCATED, naming the earliest id still there.
    let mut consumer = client.consumer(
        "walden-dml-0",
        ConsumerOptions {
            from: DeliverFrom::StartFrom(MessageId(0)),
            retry_timeout: Duration::from_secs(2),
            ..ConsumerOptions::default()
        },
    );
    let err = consumer.next().await.unwrap().unwrap_err();
    let text = err.to_string();
    assert!(text.contains(ErrorCode::Truncated.name()), "{text}");
    assert!(text.contains("first retained id is"), "{text}");
    // From the earliest position on, reads go on.
    let mut consumer = client.consumer(
        "walden-dml-0",
        ConsumerOptions {
            from: DeliverFrom::All,
            ..ConsumerOptions::default()
        },
    );
    let first = consumer.next().await.unwrap().unwrap();
    assert!(first.id.0 >= after.truncation_point, "{:?}", first.id);
    // The replay after this restart covered only what followed the checkpoint.
    assert!(after.replayed_messages < 100, "{after:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn under_a_steady_insert_load_the_wal_stays_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // An hour of the default policies, compressed: segments seal every 400 rows (about 80 KiB
    // of payload) instead of 1 000 000; the WAL rolls every 256 KiB instead of 64 MiB.
    let server = Server::start(
        &data,
        Some(
            "[node]\npchannels = 2\nsegment_max_rows = 400\ncheckpoint_max_dirty_messages = 200\n\
             [wal_local]\nsegment_bytes = 262144\n\
             [wal.retention]\ntime_ms = 0\n\
             [flush]\ncheckpoint_interval_ms = 100\n",
        ),
    )
    .await;
    create_docs(dir.path(), &server.addr, 2);
    let client = server.client().await;
    let (_, schema) = client.collections().schema("docs").await.unwrap();
    // The bound: a few WAL segments per pchannel (flush lag, the durable checkpoint's lag,
    // the active segment), whatever the run writes.
    const BOUND: u64 = 3 << 20;
    let (mut written, mut max_wal) = (0u64, 0u64);
    let mut samples = Vec::new();
    let started = Instant::now();
    let mut next = 0i64;
    while written < 24 << 20 {
        let rows: Vec<Value> = (next..next + 200).map(|i| row(i, 0)).collect();
        next += 200;
        let b = schema.rows_from_json(&rows).unwrap();
        written += schema.encode_ipc(&b).unwrap().len() as u64;
        client
            .collections()
            .insert("docs", None, &[b])
            .await
            .unwrap();
        if next % 4000 == 0 {
            let wal: u64 = pchannel_status(&client)
                .await
                .iter()
                .map(|p| p.wal_bytes)
                .sum();
            samples.push((started.elapsed().as_secs_f64(), written, wal));
            if written > 4 << 20 {
                max_wal = max_wal.max(wal);
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "too slow: {samples:?}"
        );
    }
    assert!(
        max_wal < BOUND,
        "WAL bytes reached {max_wal} (bound {BOUND}) after writing {written}: {samples:?}"
    );
    // Without truncation the WAL would hold everything written.
    assert!(written > 6 * BOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_the_object_wal_truncation_deletes_the_wal_segments_behind_flushed_data() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // Tiny WAL segments (4 fragments each), so that truncation has whole segments to delete.
    let server = Server::start(
        &data,
        Some(
            "[node]\npchannels = 1\n\
             [wal]\nstorage = \"object\"\n[wal.retention]\ntime_ms = 0\n\
             [wal_object]\nsegment_max_fragments = 4\n\
             [flush]\ncheckpoint_interval_ms = 100\n",
        ),
    )
    .await;
    create_docs(dir.path(), &server.addr, 1);
    let client = server.client().await;
    let (_, schema) = client.collections().schema("docs").await.unwrap();
    insert_rows(&client, &schema, 0..1000, 50).await;
    let markers = || {
        std::fs::read_dir(data.join("objects/wal/walden-dml-0/segs"))
            .map(|d| d.count())
            .unwrap_or(0)
    };
    let before = markers();
    assert!(before >= 4, "{before} WAL segments");
    ok_json(&[
        "flush",
        "--collection",
        "docs",
        "--wait",
        "--addr",
        &server.addr,
        "--json",
    ]);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = pchannel_status(&client).await.remove(0);
        if s.truncation_point > 0 && markers() < before / 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "WAL segments not deleted: {} of {before}, {s:?}",
            markers()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Everything is in the files, nothing in the WAL is needed for it.
    let segments = ok_json(&[
        "segments",
        "--collection",
        "docs",
        "--addr",
        &server.addr,
        "--json",
    ]);
    let got = pyarrow_rows(&segments);
    assert_eq!(got["rows"].as_array().unwrap().len(), 1000);
}
