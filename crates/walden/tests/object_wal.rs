//! The object-storage WAL through real `walden standalone` processes and a real S3 server
//! (SeaweedFS): two processes with separate data dirs (so separate metastores and terms) on one
//! prefix, and a one-line error naming the key to fix for each object-store setting that
//! cannot work.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use common::Server;
use walden_client::{ClientError, ProducerOptions};
use walden_common::{ErrorCode, HasErrorCode, MessageId};
use walden_message::{MessageType, MutableMessage};
use walden_object_store::seaweed::SeaweedFs;

const PCHANNEL: &str = "walden-dml-0";

/// SeaweedFS's `weed mini` binds fixed ports besides S3's: one server at a time.
static ONE_SERVER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
const PRODUCERS: usize = 8;

/// What producers saw acknowledged: "tag" -> id.
type Acked = Arc<Mutex<HashMap<String, MessageId>>>;

fn object_config(s3: &SeaweedFs, prefix: &str) -> String {
    format!(
        "[node]\npchannels = 1\n[wal]\nstorage = \"object\"\n\
         [object_store]\nurl = \"s3://{}/{prefix}\"\nendpoint = \"{}\"\nallow_http = true\n",
        s3.bucket, s3.endpoint
    )
}

/// Sends until an error ends the producer (or `limit` messages are acknowledged); returns the
/// code of that error, if any.
async fn produce(
    addr: String,
    tag: String,
    limit: u64,
    acked: Acked,
    retry: Duration,
) -> Option<ErrorCode> {
    let client = walden_client::Client::connect(&addr).await.unwrap();
    let p = client.producer(
        PCHANNEL,
        ProducerOptions {
            max_in_flight: 16,
            retry_timeout: retry,
            ..ProducerOptions::default()
        },
    );
    let mut window = std::collections::VecDeque::new();
    let mut end = None;
    let record = |end: &mut Option<ErrorCode>,
                  t: String,
                  r: Result<walden_client::AppendResult, ClientError>| match r {
        Ok(a) => {
            acked.lock().unwrap().insert(t, a.id);
        }
        Err(e) => *end = end.or(Some(e.code())),
    };
    for seq in 0..limit {
        let t = format!("{tag}-{seq}");
        let msg = MutableMessage::new(
            MessageType::Data,
            String::from("v0"),
            Bytes::from(t.clone()),
        );
        match p.send(msg).await {
            Ok(f) => window.push_back((t, f)),
            Err(e) => {
                record(&mut end, t, Err(e));
                break;
            }
        }
        if window.len() >= 16 {
            let (t, f) = window.pop_front().unwrap();
            record(&mut end, t, f.await);
        }
        if end.is_some() {
            break;
        }
    }
    for (t, f) in window {
        record(&mut end, t, f.await);
    }
    end
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_standalone_on_the_same_prefix_fences_the_first_and_nothing_acknowledged_is_lost()
{
    let _one = ONE_SERVER.lock().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("s3")).unwrap();
    let s3 = SeaweedFs::start(&dir.path().join("s3"), "walden")
        .await
        .unwrap();
    let config = object_config(&s3, "shared");
    let first = Server::start(&dir.path().join("a"), Some(&config)).await;
    let acked: Acked = Arc::default();
    let producers: Vec<_> = (0..PRODUCERS)
        .map(|i| {
            tokio::spawn(produce(
                first.addr.clone(),
                format!("a{i}"),
                u64::MAX,
                acked.clone(),
                Duration::from_secs(3),
            ))
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before = acked.lock().unwrap().len();
    assert!(
        before > 100,
        "the first writer served: {before} acknowledged"
    );

    // The second process opens the pchannel under its own metastore's term: it claims a
    // higher epoch in the store and fences the first's segment.
    let second = Server::start(&dir.path().join("b"), Some(&config)).await;
    for (i, p) in producers.into_iter().enumerate() {
        let end = p.await.unwrap();
        assert_eq!(
            end,
            Some(ErrorCode::ChannelFenced),
            "producer a{i} of the first writer ends fenced"
        );
    }
    let from_first = acked.lock().unwrap().len();
    // Nothing the first takes after the fence is acknowledged or stored.
    let c1 = first.client().await;
    let probe = MutableMessage::new(
        MessageType::Data,
        String::from("v0"),
        Bytes::from_static(b"late"),
    );
    let late = c1.producer(
        PCHANNEL,
        ProducerOptions {
            retry_timeout: Duration::from_millis(500),
            ..ProducerOptions::default()
        },
    );
    let err = late.send(probe).await.unwrap().await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::ChannelFenced, "{err}");
    let status = c1.status().await.unwrap();
    let p = status
        .pchannels
        .iter()
        .find(|p| p.name == PCHANNEL)
        .unwrap();
    assert_eq!(p.state, "fenced", "{p:?}");
    assert_eq!(p.wal_storage, "object");
    // No other owner will take it (standalone): `walden produce` ends within one retry
    // window, every line refused as fenced, instead of retrying each line for ever.
    let addr = first.addr.clone();
    let run = tokio::task::spawn_blocking(move || {
        common::produce_through(
            &[
                "--pchannel",
                PCHANNEL,
                "--vchannel",
                "v0",
                "--addr",
                &addr,
                "--retry-timeout",
                "5",
            ],
            "fenced",
            2000,
            0,
            Duration::from_secs(60),
            || {},
        )
    })
    .await
    .unwrap();
    common::assert_ended_honestly(&run, 2000, Duration::from_secs(10), "fenced");
    assert_eq!(run.refused(), 2000);
    assert!(run.stderr.contains("CHANNEL_FENCED"), "{}", run.stderr);

    // The second serves on.
    let more: Vec<_> = (0..PRODUCERS)
        .map(|i| {
            tokio::spawn(produce(
                second.addr.clone(),
                format!("b{i}"),
                200,
                acked.clone(),
                Duration::from_secs(30),
            ))
        })
        .collect();
    for p in more {
        assert_eq!(p.await.unwrap(), None);
    }
    let acked = acked.lock().unwrap().clone();
    assert_eq!(acked.len(), from_first + PRODUCERS * 200);

    let c2 = second.client().await;
    let mut seen: HashMap<String, MessageId> = HashMap::new();
    let mut last_tick = 0;
    for m in common::read_to_end(&c2, PCHANNEL).await {
        assert!(m.time_tick().0 > last_tick, "ticks rise at id {}", m.id);
        last_tick = m.time_tick().0;
        if m.message_type() != MessageType::Data {
            continue;
        }
        let tag = String::from_utf8(m.payload.to_vec()).unwrap();
        assert_ne!(tag, "late", "a write refused as fenced was stored");
        if let Some(prev) = seen.insert(tag.clone(), m.id) {
            panic!("{tag} stored twice: at {prev} and {}", m.id);
        }
    }
    for (tag, id) in &acked {
        assert_eq!(seen.get(tag), Some(id), "{tag} acknowledged at {id}");
    }
    eprintln!(
        "first acknowledged {from_first}, second {}, log {} data messages",
        acked.len() - from_first,
        seen.len()
    );
}

/// Runs `walden standalone` on the object WAL with `config` and returns its stderr, after
/// checking that it failed at start, without a panic.
fn start_fails(dir: &std::path::Path, config: &str) -> String {
    let cfg = dir.join("bad.toml");
    std::fs::write(&cfg, config).unwrap();
    let out = std::process::Command::new(common::WALDEN)
        .args([
            "standalone",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "",
            "--milvus-listen",
            "",
        ])
        .arg("--data-dir")
        .arg(dir.join("data"))
        .arg("--config")
        .arg(&cfg)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "started anyway: {err}");
    assert!(!err.contains("panicked"), "{err}");
    err
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn object_store_settings_that_cannot_work_are_named_at_start() {
    let _one = ONE_SERVER.lock().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("s3")).unwrap();
    let s3 = SeaweedFs::start(&dir.path().join("s3"), "walden")
        .await
        .unwrap();
    let base = |url: &str, endpoint: &str, extra: &str| {
        format!(
            "[wal]\nstorage = \"object\"\n[object_store]\nurl = \"{url}\"\nendpoint = \"{endpoint}\"\n\
             allow_http = true\nmax_retries = 1\nretry_max_ms = 500\n{extra}"
        )
    };
    // An address of its own: nothing listens there.
    let nobody = walden_common::test_host::TestHost::claim().unwrap();
    let unreachable = format!("http://{}:8333", nobody.ip());
    let cases = [
        (
            "unreachable endpoint",
            base("s3://walden/p", &unreachable, ""),
            "object_store.endpoint",
        ),
        (
            "missing bucket",
            base("s3://no-such-bucket/p", &s3.endpoint, ""),
            "object_store.url",
        ),
        (
            "file path that is not a directory",
            base(
                &format!("file://{}", dir.path().join("bad.toml").display()),
                "",
                "",
            ),
            "object_store.url",
        ),
    ];
    for (what, config, key) in cases {
        let err = start_fails(dir.path(), &config);
        let line = err
            .lines()
            .find(|l| l.contains("Error") || l.contains("error"))
            .unwrap_or_default();
        assert!(line.contains(key), "{what}: names {key}: {err}");
    }
    // Wrong credentials need a server that checks them.
    drop(s3);
    let dir2 = tempfile::tempdir().unwrap();
    let s3c = SeaweedFs::start_with(dir2.path(), "walden", Some(("walden-key", "walden-secret")))
        .await
        .unwrap();
    let err = start_fails(
        dir.path(),
        &base(
            "s3://walden/p",
            &s3c.endpoint,
            "access_key_id = \"walden-key\"\nsecret_access_key = \"wrong\"\n",
        ),
    );
    assert!(
        err.contains("object_store.access_key_id"),
        "wrong credentials: {err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_object_store_away_for_20_s_under_8_producers_and_a_flush_loses_and_doubles_nothing() {
    let _one = ONE_SERVER.lock().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("s3")).unwrap();
    let s3 = SeaweedFs::start(&dir.path().join("s3"), "walden")
        .await
        .unwrap();
    // The WAL and the flushed Parquet files both on the store; small segments flush often.
    let config = object_config(&s3, "away").replacen(
        "pchannels = 1\n",
        "pchannels = 1\nsegment_max_rows = 200\n",
        1,
    );
    let server = Server::start(&dir.path().join("data"), Some(&config)).await;
    let addr = server.addr.clone();
    let schema_file = dir.path().join("schema.json");
    std::fs::write(
        &schema_file,
        r#"{"fields":[{"name":"id","type":"int64","primary_key":true},
            {"name":"emb","type":"float_vector","dim":2}]}"#,
    )
    .unwrap();
    let out = common::walden(&[
        "collection",
        "create",
        "docs",
        "--schema",
        schema_file.to_str().unwrap(),
        "--addr",
        &addr,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let acked: Acked = Arc::default();
    let mut producers = Vec::new();
    for i in 0..PRODUCERS {
        let (addr, acked, stop) = (addr.clone(), acked.clone(), stop.clone());
        producers.push(tokio::spawn(async move {
            let client = walden_client::Client::connect(&addr).await.unwrap();
            let p = client.producer(
                PCHANNEL,
                ProducerOptions {
                    max_in_flight: 8,
                    retry_timeout: Duration::from_secs(90),
                    ..ProducerOptions::default()
                },
            );
            let mut seq = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let tag = format!("a{i}-{seq}");
                seq += 1;
                let msg = MutableMessage::new(MessageType::Data, "v0", Bytes::from(tag.clone()));
                let r = p.append(msg).await.unwrap_or_else(|e| panic!("{tag}: {e}"));
                acked.lock().unwrap().insert(tag, r.id);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }
    // Rows into the collection, each insert acknowledged or failed with a retryable code.
    let inserted = Arc::new(Mutex::new(Vec::<i64>::new()));
    let inserter = {
        let (addr, inserted, stop) = (addr.clone(), inserted.clone(), stop.clone());
        tokio::spawn(async move {
            let client = walden_client::Client::connect(&addr).await.unwrap();
            let (_, schema) = client.collections().schema("docs").await.unwrap();
            let mut next = 0i64;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let rows: Vec<serde_json::Value> = (next..next + 20)
                    .map(|id| serde_json::json!({"id": id, "emb": [id as f32, 1.0]}))
                    .collect();
                let batch = schema.rows_from_json(&rows).unwrap();
                match client.collections().insert("docs", None, &[batch]).await {
                    Ok(_) => {
                        inserted.lock().unwrap().extend(next..next + 20);
                        next += 20;
                    }
                    Err(e) => {
                        assert!(e.is_retryable(), "insert {next}: {e}");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    // A flush, and the store away in the middle of it for 20 s.
    let flushing = tokio::task::spawn_blocking({
        let addr = addr.clone();
        move || common::walden(&["flush", "--collection", "docs", "--wait", "--addr", &addr])
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let before = acked.lock().unwrap().len();
    s3.pause();
    tokio::time::sleep(Duration::from_secs(20)).await;
    let during = acked.lock().unwrap().len() - before;
    s3.resume();
    tokio::time::sleep(Duration::from_secs(5)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for p in producers {
        p.await.unwrap();
    }
    inserter.await.unwrap();
    let flushed = flushing.await.unwrap();
    assert!(
        flushed.status.success(),
        "the flush across the outage: {}",
        String::from_utf8_lossy(&flushed.stderr)
    );
    let acked = acked.lock().unwrap().clone();
    let after = acked.len() - before - during;
    assert!(
        before > 100 && after > 100,
        "{before} before the outage, {after} after it"
    );
    eprintln!("acknowledged: {before} before the outage, {during} during it, {after} after");

    // The same process serves on: everything acknowledged is stored exactly once.
    let client = server.client().await;
    let status = client.status().await.unwrap();
    assert!(
        status.pchannels.iter().all(|p| p.state == "serving"),
        "{status:?}"
    );
    let mut seen: HashMap<String, MessageId> = HashMap::new();
    for m in common::read_to_end(&client, PCHANNEL).await {
        if m.message_type() != MessageType::Data {
            continue;
        }
        let tag = String::from_utf8(m.payload.to_vec()).unwrap();
        if let Some(prev) = seen.insert(tag.clone(), m.id) {
            panic!("{tag} stored twice: at {prev} and {}", m.id);
        }
    }
    for (tag, id) in &acked {
        assert_eq!(seen.get(tag), Some(id), "{tag} acknowledged at {id}");
    }
    // Every acknowledged row is in the Parquet files once the last flush is done.
    let out = common::walden(&["flush", "--collection", "docs", "--wait", "--addr", &addr]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let inserted = inserted.lock().unwrap().clone();
    let count = common::ok_json(&[
        "count",
        "--collection",
        "docs",
        "--consistency",
        "strong",
        "--addr",
        &addr,
        "--json",
    ]);
    assert_eq!(
        count["count"],
        serde_json::json!(inserted.len()),
        "rows after the outage"
    );
    let segments = common::ok_json(&[
        "segments",
        "--collection",
        "docs",
        "--addr",
        &addr,
        "--json",
    ]);
    let flushed_rows: u64 = segments["segments"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["state"] == "flushed" || s["state"] == "compacted")
        .map(|s| s["rows"].as_u64().unwrap())
        .sum();
    assert_eq!(
        flushed_rows,
        inserted.len() as u64,
        "every row flushed once: {segments}"
    );
}
