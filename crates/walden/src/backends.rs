//! The one place that picks concrete backends: which WAL storage and which metastore a role
//! runs on. Services see only the traits.

use std::sync::Arc;

use anyhow::Context;
use tracing::info;
use walden_flusher::Flushers;
use walden_metastore_api::MetaStore;
use walden_object_store::{Blobs, StoreMetrics};
use walden_streaming_node::metrics::Metrics;
use walden_wal_api::WalStorage;
use walden_wal_local::{LocalWalStorage, SharedLogStorage};
use walden_wal_object::ObjectWalStorage;

use crate::config::{Config, WalStorageKind};

/// The object store of `[object_store]` (empty `url`: `file://<data_dir>/objects`, created),
/// shared by the object-storage WAL and the flusher. It is reached before anything else runs:
/// a bad endpoint, key or bucket is one line naming the setting to fix.
pub async fn object_store(config: &Config, metrics: &Metrics) -> anyhow::Result<Arc<dyn Blobs>> {
    let mut c = config.object_store.clone();
    if c.url.is_empty() {
        let dir = config.server.data_dir.join("objects");
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("creating the object store directory {}", dir.display()))?;
        let dir =
            std::fs::canonicalize(&dir).with_context(|| format!("resolving {}", dir.display()))?;
        c.url = format!("file://{}", dir.display());
    }
    let store_metrics =
        StoreMetrics::new(&metrics.registry).context("registering the object store's metrics")?;
    let blobs = walden_object_store::open(&c, store_metrics)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))
        .context("opening the object store")?;
    info!(url = %c.url, "object store");
    Ok(blobs)
}

/// The WAL storage `wal.storage` names.
pub fn wal_storage(config: &Config, blobs: &Arc<dyn Blobs>) -> anyhow::Result<Arc<dyn WalStorage>> {
    Ok(match config.wal.storage {
        WalStorageKind::Local => local(&config.server.data_dir.join("wal"), &config.wal_local)?,
        WalStorageKind::Object => {
            info!("WAL on object storage");
            Arc::new(ObjectWalStorage::new(
                blobs.clone(),
                (&config.wal_object).into(),
            ))
        }
    })
}

/// The flushers of a node's pchannels, writing to `blobs` and committing to `meta`.
pub fn flushers(
    config: &Config,
    meta: &Arc<dyn MetaStore>,
    blobs: &Arc<dyn Blobs>,
    metrics: &Metrics,
) -> anyhow::Result<Arc<Flushers>> {
    let flush_metrics = walden_flusher::Metrics::register(&metrics.registry)
        .context("registering the flusher's metrics")?;
    Flushers::new(
        meta.clone(),
        blobs.clone(),
        config.flush.clone(),
        config.wal.retention,
        flush_metrics,
    )
    .map_err(|e| anyhow::anyhow!("{e}"))
}

/// The cluster's metastore: etcd at `cluster.etcd`.
pub async fn etcd(config: &Config) -> anyhow::Result<Arc<dyn MetaStore>> {
    let etcd = walden_metastore_etcd::EtcdConfig::from_endpoints(&config.cluster.etcd)
        .map_err(|e| anyhow::anyhow!("cluster.etcd: {e}"))?;
    let store = walden_metastore_etcd::EtcdMetaStore::connect(etcd)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))
        .context("connecting to etcd (cluster.etcd / --etcd)")?;
    info!(endpoints = %config.cluster.etcd, "metastore on etcd");
    Ok(Arc::new(store))
}

/// The local WAL in the configured layout, refusing a data dir written in the other one (its
/// records would be silently ignored otherwise).
fn local(
    root: &std::path::Path,
    c: &crate::config::WalLocalConfig,
) -> anyhow::Result<Arc<dyn WalStorage>> {
    let has = |pred: &dyn Fn(&std::path::Path) -> bool| -> bool {
        std::fs::read_dir(root)
            .into_iter()
            .flatten()
            .flatten()
            .any(|d| {
                std::fs::read_dir(d.path())
                    .into_iter()
                    .flatten()
                    .flatten()
                    .any(|f| pred(&f.path()))
            })
    };
    let ext = |e: &'static str| move |p: &std::path::Path| p.extension().is_some_and(|x| x == e);
    if c.layout == crate::config::WalLayout::Shared {
        anyhow::ensure!(
            !has(&ext("seg")),
            "{} holds a per-pchannel WAL; set wal_local.layout = \"per_pchannel\"",
            root.display()
        );
        Ok(Arc::new(SharedLogStorage::new(root, c.into())))
    } else {
        anyhow::ensure!(
            !has(&ext("log")),
            "{} holds a shared WAL; set wal_local.layout = \"shared\"",
            root.display()
        );
        Ok(Arc::new(LocalWalStorage::new(root, c.into())))
    }
}
