//! The object-store contract on `memory://`, `file://` and a real S3 server (SeaweedFS), and a
//! one-line error naming the key to fix for each setting that cannot work.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use bytes::Bytes;
use prometheus::Registry;
use walden_object_store::{
    ObjectStoreConfig, ObjectStoreError, StoreMetrics, conformance, open, seaweed::SeaweedFs,
};

fn metrics() -> (StoreMetrics, Registry) {
    let r = Registry::new();
    (StoreMetrics::new(&r).unwrap(), r)
}

fn config(url: &str) -> ObjectStoreConfig {
    ObjectStoreConfig {
        url: url.into(),
        ..ObjectStoreConfig::default()
    }
}

fn config_key(e: ObjectStoreError) -> &'static str {
    match e {
        ObjectStoreError::Config { key, .. } => key,
        other => panic!("expected a config error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_passes_the_contract_and_counts_its_calls() {
    let (m, registry) = metrics();
    let store = open(&config("memory://"), m).await.unwrap();
    conformance::run_all(store.clone()).await;
    let text = prometheus::TextEncoder::new()
        .encode_to_string(&registry.gather())
        .unwrap();
    assert!(
        text.contains(r#"object_store_requests_total{op="put_if_absent"}"#),
        "{text}"
    );
    assert!(
        text.contains(r#"object_store_errors_total{kind="already_exists",op="put_if_absent"}"#),
        "{text}"
    );
    assert!(
        text.contains("object_store_latency_seconds_bucket"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_directory_passes_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().display());
    let store = open(&config(&url), metrics().0).await.unwrap();
    conformance::run_all(store).await;
    // The objects are files under the directory.
    assert!(dir.path().join("c/one").is_file());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_that_cannot_work_are_refused_at_open_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("plain-file");
    std::fs::write(&file, b"x").unwrap();
    let e = open(&config(&format!("file://{}", file.display())), metrics().0)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("is not a directory"), "{e}");
    assert_eq!(config_key(e), "object_store.url");
    let e = open(&config("ftp://x"), metrics().0).await.unwrap_err();
    assert!(e.to_string().starts_with("object_store"), "{e}");
    // Nothing listens on port 1.
    let unreachable = ObjectStoreConfig {
        endpoint: "http://127.0.0.1:1".into(),
        allow_http: true,
        max_retries: 0,
        retry_max_ms: 200,
        request_timeout_ms: 2_000,
        ..config("s3://walden")
    };
    let e = open(&unreachable, metrics().0).await.unwrap_err();
    assert!(!e.to_string().contains('\n'), "one line: {e}");
    assert_eq!(config_key(e), "object_store.endpoint");
}

/// One test for everything on SeaweedFS (one server at a time: its other ports are fixed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seaweedfs_passes_the_contract_and_a_missing_bucket_or_refused_credentials_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let weed = SeaweedFs::start(dir.path(), "walden").await.unwrap();
    let store = open(&weed.config("contract"), metrics().0).await.unwrap();
    conformance::run_all(store.clone()).await;
    // The prefix keeps stores apart.
    let other = open(&weed.config("elsewhere"), metrics().0).await.unwrap();
    assert!(other.list("").await.unwrap().is_empty());
    other
        .put_if_absent("c/one", Bytes::from_static(b"mine"))
        .await
        .expect("the same key under another prefix is another object");

    let e = open(
        &ObjectStoreConfig {
            url: "s3://no-such-bucket/p".into(),
            ..weed.config("")
        },
        metrics().0,
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("no-such-bucket"), "{e}");
    assert_eq!(config_key(e), "object_store.url");
    drop(weed);

    // A server that knows one identity: it is served, a wrong secret or none is refused and
    // named.
    let dir = tempfile::tempdir().unwrap();
    let weed = SeaweedFs::start_with(dir.path(), "walden", Some(("walden-ak", "walden-sk")))
        .await
        .unwrap();
    let store = open(&weed.config("p"), metrics().0).await.unwrap();
    store
        .put_if_absent("k", Bytes::from_static(b"v"))
        .await
        .unwrap();
    for (key, secret) in [("walden-ak", "wrong"), ("", "")] {
        let bad = ObjectStoreConfig {
            access_key_id: key.into(),
            secret_access_key: secret.into(),
            ..weed.config("p")
        };
        let e = open(&bad, metrics().0).await.unwrap_err();
        assert!(!e.to_string().contains('\n'), "one line: {e}");
        assert_eq!(config_key(e), "object_store.access_key_id", "key {key:?}");
    }
}

/// The fault wrapper: a lost response leaves the object stored and the call failed; a retry
/// then finds `AlreadyExists`, and reading back tells the caller it was its own write. Calls
/// in flight together complete out of order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_response_is_resolved_by_reading_the_key_back() {
    use std::{sync::Arc, time::Duration};
    use walden_object_store::{
        Blobs,
        faulty::{FaultPlan, Faulty},
    };
    let inner = open(&config("memory://"), metrics().0).await.unwrap();
    let faulty = Arc::new(Faulty::new(
        inner.clone(),
        FaultPlan {
            lose_response_per_mille: 1000,
            ..FaultPlan::default()
        },
    ));
    let data = Bytes::from_static(b"fragment 7");
    let e = faulty.put_if_absent("f/7", data.clone()).await.unwrap_err();
    assert!(walden_common::HasErrorCode::is_retryable(&e), "{e}");
    assert_eq!(inner.get("f/7").await.unwrap(), data, "the object landed");
    faulty.set_plan(FaultPlan::default());
    let e = faulty.put_if_absent("f/7", data.clone()).await.unwrap_err();
    assert!(matches!(e, ObjectStoreError::AlreadyExists { .. }), "{e}");
    assert_eq!(
        faulty.get("f/7").await.unwrap(),
        data,
        "read back: it is ours"
    );

    // Delays reorder completions.
    faulty.set_plan(FaultPlan {
        max_delay: Duration::from_millis(20),
        seed: 7,
        ..FaultPlan::default()
    });
    let order = Arc::new(std::sync::Mutex::new(Vec::new()));
    let tasks: Vec<_> = (0..16u32)
        .map(|i| {
            let (f, order) = (faulty.clone(), order.clone());
            tokio::spawn(async move {
                f.put_if_absent(&format!("o/{i:02}"), Bytes::new())
                    .await
                    .unwrap();
                order.lock().unwrap().push(i);
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let order = order.lock().unwrap().clone();
    assert_eq!(order.len(), 16);
    assert_ne!(
        order,
        (0..16).collect::<Vec<_>>(),
        "completions were not reordered"
    );
}
