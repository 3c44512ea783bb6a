//! The one place that picks concrete backends: which WAL storage and which metastore a role
//! runs on. Services see only the traits.

use std::sync::Arc;

use anyhow::Context;
use tracing::info;
use walden_metastore_api::MetaStore;
use walden_object_store::StoreMetrics;
use walden_streaming_node::metrics::Metrics;
use walden_wal_api::WalStorage;
use walden_wal_local::{LocalWalStorage, SharedLogStorage};
use walden_wal_object::ObjectWalStorage;

use crate::config::{Config, WalStorageKind};

/// The WAL storage `wal.storage` names. The object store is reached before anything else runs:
/// a bad endpoint, key or bucket is one line naming the setting to fix.
pub async fn wal_storage(
    config: &Config,
    metrics: &Metrics,
) -> anyhow::Result<Arc<dyn WalStorage>> {
    Ok(match config.wal.storage {
        WalStorageKind::Local => local(&config.server.data_dir.join("wal"), &config.wal_local)?,
        WalStorageKind::Object => {
            let store_metrics = StoreMetrics::new(&metrics.registry)
                .context("registering the object store's metrics")?;
            let blobs = walden_object_store::open(&config.object_store, store_metrics)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))
                .context("opening the object store for the WAL")?;
            info!(url = %config.object_store.url, "WAL on object storage");
            Arc::new(ObjectWalStorage::new(blobs, (&config.wal_object).into()))
        }
    })
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
