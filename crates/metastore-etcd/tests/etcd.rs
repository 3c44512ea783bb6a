//! The metastore contract on a real etcd, and what etcd adds: restarts and bad addresses.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use walden_metastore_api::{EventKind, MetaError, MetaStore};
use walden_metastore_etcd::{EtcdConfig, EtcdMetaStore, testing::EtcdServer};

async fn connect(etcd: &EtcdServer) -> EtcdMetaStore {
    EtcdMetaStore::connect(EtcdConfig::from_endpoints(&etcd.endpoints()).unwrap())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_passes_the_metastore_conformance_suite() {
    let etcd = EtcdServer::start().unwrap();
    let store: Arc<dyn MetaStore> = Arc::new(connect(&etcd).await);
    walden_metastore_api::conformance::run_all(|| store.clone()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_resumes_after_an_etcd_restart_without_missing_or_repeating_a_change() {
    let mut etcd = EtcdServer::start().unwrap();
    let store = connect(&etcd).await;
    let mut w = store.watch("w/").await.unwrap();
    store.put("w/a", Bytes::from("1"), None).await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(5), w.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.kv.value, Bytes::from("1"));

    etcd.restart().unwrap();
    // The client reconnects by itself; writes made after the restart reach the same watch.
    let mut wrote = Vec::new();
    for i in 2..5 {
        let v = Bytes::from(i.to_string());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            match store.put("w/a", v.clone(), None).await {
                Ok(rev) => {
                    wrote.push(rev);
                    break;
                }
                Err(e) => {
                    assert!(tokio::time::Instant::now() < deadline, "etcd back: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
    let mut seen = Vec::new();
    for _ in 0..3 {
        let e = tokio::time::timeout(Duration::from_secs(20), w.recv())
            .await
            .expect("event after the restart")
            .expect("watch still open");
        assert_eq!(e.kind, EventKind::Put);
        seen.push(e.kv.mod_revision);
    }
    assert_eq!(
        seen, wrote,
        "every change after the restart, once, in order"
    );
    assert!(w.try_recv().is_err(), "nothing repeated");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_etcd_is_unavailable_at_connect_and_a_dead_one_fails_requests_in_time() {
    let mut config = EtcdConfig::from_endpoints("http://127.0.0.1:1").unwrap();
    config.connect_timeout = Duration::from_millis(500);
    config.request_timeout = Duration::from_millis(500);
    let err = EtcdMetaStore::connect(config).await.unwrap_err();
    assert!(matches!(err, MetaError::Unavailable { .. }), "{err}");
    assert!(
        err.to_string().contains("127.0.0.1:1"),
        "names the address: {err}"
    );

    let mut etcd = EtcdServer::start().unwrap();
    let mut config = EtcdConfig::from_endpoints(&etcd.endpoints()).unwrap();
    config.request_timeout = Duration::from_secs(1);
    let store = EtcdMetaStore::connect(config).await.unwrap();
    etcd.kill();
    let started = std::time::Instant::now();
    let err = store.get("k").await.unwrap_err();
    assert!(matches!(err, MetaError::Unavailable { .. }), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "bounded by the request timeout"
    );
}

#[test]
fn endpoint_lists_are_checked() {
    assert!(EtcdConfig::from_endpoints("").is_err());
    assert!(
        EtcdConfig::from_endpoints("127.0.0.1:2379").is_err(),
        "scheme required"
    );
    let c = EtcdConfig::from_endpoints("http://a:1, http://b:2").unwrap();
    assert_eq!(c.endpoints, ["http://a:1", "http://b:2"]);
}
