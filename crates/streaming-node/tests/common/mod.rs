//! Starting a node on the in-memory WAL and metastore, for the node's tests.

#![allow(dead_code, clippy::unwrap_used)]

use std::sync::Arc;

use walden_metastore_api::{MemoryMetaStore, MetaStore};
use walden_streaming_node::{NodeConfig, manager::WalManager, metrics::Metrics};
use walden_wal_api::{WalStorage, memory::MemoryWalStorage};

/// A node over `storage` and `meta` (clones share state, so a second start is a restart).
pub async fn start(
    storage: &MemoryWalStorage,
    meta: &MemoryMetaStore,
    config: NodeConfig,
) -> Arc<WalManager> {
    WalManager::start(
        Arc::new(storage.clone()) as Arc<dyn WalStorage>,
        Arc::new(meta.clone()) as Arc<dyn MetaStore>,
        config,
        Metrics::new(),
    )
    .await
    .unwrap()
}

/// Awaits `f`, failing the test after 10 s instead of hanging it.
pub async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(std::time::Duration::from_secs(10), f)
        .await
        .expect("no answer within 10 s")
}
