//! `walden standalone`: every role in one process on embedded defaults. This is the one place
//! that picks concrete backends.

use std::sync::Arc;

use anyhow::Context;
use tracing::info;
use walden_common::HasErrorCode;
use walden_coordinator::{AppendError, Appender, Coordinator, service::CollectionService};
use walden_delegator::{Delegators, service::QueryService};
use walden_flusher::service::StorageService;
use walden_message::MutableMessage;
use walden_metastore_api::MetaStore;
use walden_streaming_node::{
    NodeError, manager::WalManager, metrics::Metrics, service::NodeService,
};
use walden_wal_local::Reserve;

use crate::{
    backends,
    config::Config,
    local_cluster::LocalCluster,
    node_http,
    server::{self, GrpcServer},
};

/// The coordinator's view of the node in the same process.
#[derive(Debug)]
struct LocalNode {
    manager: Arc<WalManager>,
    pchannels: Vec<String>,
}

#[async_trait::async_trait]
impl Appender for LocalNode {
    fn pchannels(&self) -> Vec<String> {
        self.pchannels.clone()
    }

    async fn append(&self, pchannel: &str, msg: MutableMessage) -> Result<u64, AppendError> {
        let err = |e: NodeError| AppendError {
            code: e.code(),
            message: e.to_string(),
        };
        let channel = self.manager.get(pchannel, 0).map_err(err)?;
        let placed = channel.append(msg).await.map_err(err)?;
        Ok(placed.tick.0)
    }
}

/// Where the kernel says whether transparent huge pages are used for every anonymous mapping.
const THP_ENABLED: &str = "/sys/kernel/mm/transparent_hugepage/enabled";

/// Whether `enabled` (the content of [`THP_ENABLED`]) selects `always`.
fn thp_always(enabled: &str) -> bool {
    enabled.contains("[always]")
}

pub async fn run(config: Config, ready_file: Option<std::path::PathBuf>) -> anyhow::Result<()> {
    // Walden's allocator asks for no huge pages, but with `always` the kernel uses them anyway,
    // and zeroing 2 MiB on a first touch stalled appends for 30-40 ms (docs/benchmarks.md).
    if std::fs::read_to_string(THP_ENABLED).is_ok_and(|e| thp_always(&e)) {
        tracing::warn!(
            "transparent huge pages are `always` on this host: expect append latency spikes; \
             `madvise` or `never` in {THP_ENABLED} avoids them"
        );
    }
    // Bound first: a bad or busy address is refused at once, before recovery runs and terms
    // are raised; certificates and tokens are read before recovery too.
    let bound = server::bind(&config.server).await?;
    let addr = bound.addr;
    let milvus_listener = server::bind_milvus(&config.milvus).await?;
    let security = server::Security::load(&config.server, addr)?;

    let data_dir = &config.server.data_dir;
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating data dir {}", data_dir.display()))?;
    // On a full disk the ballast goes first, so that recovery can write what it must.
    let reserve = Reserve::new(data_dir, config.wal_local.min_free_bytes);
    reserve.release_if_short();
    let meta: Arc<dyn MetaStore> = Arc::new(
        walden_metastore_embedded::open(&data_dir.join("meta.redb"))
            .context("opening the metastore (is another walden using this data dir?)")?,
    );
    let metrics = Metrics::new();
    crate::search_metrics::register(&metrics.registry);
    let blobs = backends::object_store(&config, &metrics).await?;
    let storage = backends::wal_storage(&config, &blobs)?;
    let manager = WalManager::start(storage, meta.clone(), config.node.clone(), metrics.clone())
        .await
        .context("opening the pchannels")?;
    let flushers = backends::flushers(&config, &meta, &blobs, &metrics)?;
    flushers.follow(manager.clone());
    let delegators = Delegators::new(
        meta.clone(),
        blobs.clone(),
        config.query.clone(),
        walden_connect::ConnectOptions::default(),
    );
    delegators.follow(manager.clone());
    let coordinator = Coordinator::start(
        meta,
        Arc::new(LocalNode {
            manager: manager.clone(),
            pchannels: config.node.pchannel_names(),
        }),
    )
    .await
    .context("starting the coordinator")?;
    reserve.ensure();

    let http_addr = node_http::spawn(bound.http, &manager, &metrics, &security, &config.server)?;
    let node_id = format!("standalone@{addr}");
    let routes =
        tonic::service::Routes::new(NodeService::new(manager.clone(), node_id).into_server())
            .add_service(CollectionService::new(coordinator).into_server())
            .add_service(StorageService::new(flushers).into_server())
            .add_service(QueryService::new(delegators).into_server())
            .add_service(
                LocalCluster::new(manager.clone(), format!("{}://{addr}", security.scheme()))
                    .into_server(),
            );
    let grpc = GrpcServer::start(
        bound.grpc,
        bound.max_connections,
        &config.server,
        &security,
        routes,
    )?;
    // Milvus's API calls this server through Walden's client, as `walden proxy` calls a cluster.
    let milvus = match milvus_listener {
        Some(listener) => {
            let milvus_addr = listener.local_addr()?;
            let client = match walden_client::Client::connect_with(
                &format!("{}://{addr}", security.scheme()),
                &security.own_client(&config.cluster)?,
            )
            .await
            {
                Ok(c) => c,
                // With TLS, the API calls this server as any client does: it needs the
                // authority of the server's certificate.
                Err(e) if security.tls.is_some() && config.cluster.tls_ca_file.is_none() => {
                    anyhow::bail!(
                        "the Milvus API cannot reach this server over TLS ({e}): set \
                         cluster.tls_ca_file to the authority of server.tls_cert_file, or \
                         turn the Milvus API off (milvus.listen = \"\")"
                    );
                }
                Err(e) => {
                    return Err(
                        anyhow::Error::new(e).context("the Milvus API's client of this server")
                    );
                }
            };
            let routes =
                tonic::service::Routes::new(walden_milvus::Milvus::new(client).into_service());
            let server = GrpcServer::start_milvus(
                listener,
                bound.max_connections,
                &config.server,
                &security,
                routes,
            )?;
            info!(%milvus_addr, "Milvus API ready");
            Some((server, milvus_addr))
        }
        None => None,
    };
    info!(%addr, data_dir = %data_dir.display(), "walden standalone ready");
    if let Some(path) = &ready_file {
        let extra = serde_json::json!({
            "milvus": milvus.as_ref().map(|(_, a)| a.to_string()),
        });
        server::write_ready_file(path, addr, http_addr, extra)?;
    }
    let mut milvus = milvus.map(|(server, _)| server);
    let mut grpc = grpc;
    tokio::select! {
        r = &mut grpc.task => {
            r.context("the gRPC server task")?.context("serving gRPC")?;
        }
        () = server::shutdown_signal() => {
            info!("shutting down: draining connections");
            if let Some(m) = milvus.take() {
                m.stop().await;
            }
            grpc.stop().await;
        }
    }
    info!("closing pchannels");
    manager.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::thp_always;

    #[test]
    fn only_the_always_setting_of_transparent_huge_pages_is_warned_about() {
        assert!(thp_always("[always] madvise never\n"));
        assert!(!thp_always("always [madvise] never\n"));
        assert!(!thp_always("always madvise [never]\n"));
    }
}
