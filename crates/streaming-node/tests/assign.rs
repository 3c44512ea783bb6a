//! Assignments: two managers share one storage and one metastore, as two nodes of a cluster do,
//! and a pchannel moves between them under rising terms.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use walden_common::{ErrorCode, HasErrorCode, Term, TimeTick};
use walden_message::{MessageType, MutableMessage};
use walden_metastore_api::{MemoryMetaStore, MetaStore};
use walden_streaming_node::{NodeConfig, NodeError, manager::WalManager, metrics::Metrics};
use walden_tso::{BatchedTicks, Oracle};
use walden_wal_api::{WalStorage, memory::MemoryWalStorage};

/// The coordinator's oracle, in-process (it serves batches itself).
async fn oracle(meta: &MemoryMetaStore) -> Arc<Oracle> {
    Arc::new(
        Oracle::open(Arc::new(meta.clone()), Duration::from_secs(3))
            .await
            .unwrap(),
    )
}

fn node(
    storage: &MemoryWalStorage,
    meta: &MemoryMetaStore,
    oracle: &Arc<Oracle>,
) -> Arc<WalManager> {
    // A large batch held for long: the case where a node's batch is older than another's log.
    let ticks = Arc::new(BatchedTicks::new(
        oracle.clone(),
        100_000,
        Duration::from_secs(60),
    ));
    WalManager::new(
        Arc::new(storage.clone()) as Arc<dyn WalStorage>,
        Arc::new(meta.clone()) as Arc<dyn MetaStore>,
        ticks,
        NodeConfig {
            time_tick_interval_ms: 20,
            ..NodeConfig::default()
        },
        Metrics::new(),
    )
    .unwrap()
}

fn insert(i: usize) -> MutableMessage {
    MutableMessage::new(MessageType::Data, "v", Bytes::from(format!("m{i}")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moved_pchannel_fences_its_old_owner_and_ticks_keep_rising_on_the_new_one() {
    let storage = MemoryWalStorage::new();
    let meta = MemoryMetaStore::new();
    let oracle = oracle(&meta).await;
    let a = node(&storage, &meta, &oracle);
    let b = node(&storage, &meta, &oracle);
    // b takes its batch first, so a's batch is above it; the pchannel then moves from a to b.
    b.assign("p-other", Term(1)).await.unwrap();
    let on_a = a.assign("p", Term(1)).await.unwrap();
    let mut last = TimeTick(0);
    for i in 0..10 {
        last = on_a.append(insert(i)).await.unwrap().tick;
    }

    let on_b = b.assign("p", Term(2)).await.unwrap();
    let err = on_a.append(insert(99)).await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::ChannelFenced, "{err}");
    let next = on_b.append(insert(10)).await.unwrap().tick;
    assert!(next > last, "b's old batch was dropped: {next} > {last}");

    // A late or repeated assignment below the served term is refused; the same term is a no-op.
    let stale = b.assign("p", Term(1)).await.unwrap_err();
    assert!(matches!(stale, NodeError::TermMismatch { .. }), "{stale}");
    assert!(Arc::ptr_eq(&b.assign("p", Term(2)).await.unwrap(), &on_b));

    // Removing under an older term leaves the newer incarnation alone.
    assert!(!b.remove("p", Some(Term(1))).await);
    assert!(b.get("p", 2).is_ok());
    assert!(b.remove("p", Some(Term(2))).await);
    assert_eq!(
        b.get("p", 0).unwrap_err().code(),
        ErrorCode::ChannelNotFound
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_opens_only_what_it_is_assigned() {
    let storage = MemoryWalStorage::new();
    let meta = MemoryMetaStore::new();
    let oracle = oracle(&meta).await;
    let a = node(&storage, &meta, &oracle);
    assert!(a.channels().is_empty());
    assert!(
        a.statuses().is_empty(),
        "nothing served before an assignment"
    );
    a.assign("p", Term(3)).await.unwrap();
    assert_eq!(a.channels().len(), 1);
    assert_eq!(a.channels()[0].term(), Term(3));
    assert!(a.assign("bad/name", Term(1)).await.is_err());
}
