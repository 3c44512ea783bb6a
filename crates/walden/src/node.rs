//! `walden node`: a streaming node of a cluster. It serves the pchannels the coordinator
//! assigns it, each under the coordinator's term, on the shared WAL storage; ticks come in
//! batches from the leader coordinator. On SIGTERM it asks to be drained, waits for its
//! pchannels to move, then exits.

use std::sync::Arc;

use anyhow::Context;
use tracing::info;
use walden_delegator::{Delegators, service::QueryService};
use walden_flusher::service::StorageService;
use walden_streaming_node::{
    agent::{AgentConfig, NodeAgent},
    manager::WalManager,
    metrics::Metrics,
    service::NodeService,
};
use walden_tso::BatchedTicks;

use crate::{
    backends,
    cluster::{ClientReader, LeaderClock},
    config::{Config, WalStorageKind},
    node_http,
    server::{self, GrpcServer},
};

pub async fn run(config: Config, ready_file: Option<std::path::PathBuf>) -> anyhow::Result<()> {
    // A log on this node's disk could never move to another node.
    anyhow::ensure!(
        config.wal.storage == WalStorageKind::Object,
        "wal.storage = \"local\" cannot be used by a cluster node: its pchannels could never move \
         to another node; set wal.storage = \"object\" (--wal-storage object) with an object store \
         every node reaches"
    );
    let bound = server::bind(&config.server).await?;
    let addr = bound.addr;
    let security = server::Security::load(&config.server, addr)?;
    let peers = security.peers(&config.cluster)?;
    let advertise = server::advertised(&config.cluster.advertise, addr, &security)?;
    anyhow::ensure!(
        !config.object_store.url.is_empty(),
        "object_store.url must be set for a cluster node: an object store every node reaches"
    );
    let meta = backends::etcd(&config).await?;
    let metrics = Metrics::new();
    crate::search_metrics::register(&metrics.registry);
    let blobs = backends::object_store(&config, &metrics).await?;
    let storage = backends::wal_storage(&config, &blobs)?;
    let ms = std::time::Duration::from_millis;
    let c = &config.cluster;
    let ticks = Arc::new(BatchedTicks::new(
        Arc::new(LeaderClock::new(meta.clone(), peers.clone())),
        c.tick_batch,
        ms(c.tick_batch_max_age_ms),
    ));
    let manager = WalManager::new(
        storage,
        meta.clone(),
        ticks,
        config.node.clone(),
        metrics.clone(),
    )
    .context("starting the WAL manager")?;
    let flushers = backends::flushers(&config, &meta, &blobs, &metrics)?;
    flushers.follow(manager.clone());
    let delegators = Delegators::new(
        meta.clone(),
        blobs.clone(),
        config.query.clone(),
        peers.clone(),
    );
    delegators.follow(manager.clone());
    let http_addr = node_http::spawn(bound.http, &manager, &metrics, &security, &config.server)?;
    let routes = tonic::service::Routes::new(
        NodeService::new(manager.clone(), format!("node@{advertise}")).into_server(),
    )
    .add_service(StorageService::new(flushers).into_server())
    .add_service(QueryService::new(delegators.clone()).into_server());
    let mut grpc = GrpcServer::start(
        bound.grpc,
        bound.max_connections,
        &config.server,
        &security,
        routes,
    )?;
    // Serving before joining: the coordinator may assign at once.
    let agent = NodeAgent::join(
        manager.clone(),
        meta.clone(),
        AgentConfig {
            address: advertise.clone(),
            http_address: http_addr
                .map(|a| format!("{}://{a}", security.scheme()))
                .unwrap_or_default(),
            lease_ttl: ms(c.node_lease_ttl_ms),
        },
    )
    .await
    .context("joining the cluster")?;
    // Read replicas of vchannels other nodes serve, as the leader places them.
    delegators.follow_replicas(
        {
            let agent = agent.clone();
            move || agent.id()
        },
        Arc::new(ClientReader::new(meta, peers)),
    );
    info!(%addr, advertise, node = agent.id(), "walden node ready");
    if let Some(path) = &ready_file {
        server::write_ready_file(
            path,
            addr,
            http_addr,
            serde_json::json!({ "node_id": agent.id() }),
        )?;
    }
    tokio::select! {
        r = &mut grpc.task => {
            r.context("the gRPC server task")?.context("serving gRPC")?;
        }
        () = server::shutdown_signal() => {
            info!(node = agent.id(), "draining: moving pchannels away before exiting");
            let left = agent.drain(ms(c.drain_timeout_ms)).await;
            if left > 0 {
                tracing::warn!(left, "drain timed out; closing the rest");
            }
            grpc.stop().await;
        }
    }
    manager.shutdown().await;
    Ok(())
}
