//! `walden query-node`: a query node of a cluster (docs/design.md §14.6). It registers in etcd
//! under a lease, loads the flushed segments the leader coordinator places on it from the
//! object store, and serves their searches to the delegators. On SIGTERM it leaves the cluster
//! (its segments move) and exits.

use anyhow::Context;
use tracing::info;
use walden_querynode::{QueryNode, QueryNodeConfig, service::QueryNodeService};

use crate::{
    backends,
    config::Config,
    server::{self, GrpcServer},
};

/// How long a segment the placement moved away stays searchable here, for reads planned
/// before the move.
const RETIRE_GRACE: std::time::Duration = std::time::Duration::from_secs(30);

pub async fn run(config: Config, ready_file: Option<std::path::PathBuf>) -> anyhow::Result<()> {
    anyhow::ensure!(
        !config.object_store.url.is_empty(),
        "object_store.url must be set for a query node: the object store the cluster flushes to"
    );
    let bound = server::bind(&config.server).await?;
    let addr = bound.addr;
    let security = server::Security::load(&config.server, addr)?;
    let advertise = server::advertised(&config.cluster.advertise, addr, &security)?;
    let meta = backends::etcd(&config).await?;
    let metrics = walden_streaming_node::metrics::Metrics::new();
    crate::search_metrics::register(&metrics.registry);
    let blobs = backends::object_store(&config, &metrics).await?;
    let node = QueryNode::start(
        meta,
        blobs,
        QueryNodeConfig {
            address: advertise.clone(),
            lease_ttl: std::time::Duration::from_millis(config.cluster.node_lease_ttl_ms),
            retire_grace: RETIRE_GRACE,
        },
    )
    .await
    .context("joining the cluster as a query node")?;
    let http_addr = match bound.http {
        Some(http) => Some(server::spawn_http(
            http,
            http_app(node.clone(), metrics),
            &security,
            config.server.public_healthz,
        )?),
        None => None,
    };
    let routes = tonic::service::Routes::new(QueryNodeService::new(node.clone()).into_server());
    let mut grpc = GrpcServer::start(
        bound.grpc,
        bound.max_connections,
        &config.server,
        &security,
        routes,
    )?;
    info!(%addr, advertise, id = node.id(), "walden query node ready");
    if let Some(path) = &ready_file {
        server::write_ready_file(
            path,
            addr,
            http_addr,
            serde_json::json!({ "query_node_id": node.id() }),
        )?;
    }
    tokio::select! {
        r = &mut grpc.task => {
            r.context("the gRPC server task")?.context("serving gRPC")?;
        }
        () = server::shutdown_signal() => {
            info!(id = node.id(), "leaving the cluster");
            node.leave().await;
            grpc.stop().await;
        }
    }
    Ok(())
}

/// `/metrics` (the object store's requests) and `/healthz` (registered, and what it holds).
fn http_app(
    node: std::sync::Arc<QueryNode>,
    metrics: walden_streaming_node::metrics::Metrics,
) -> axum::Router {
    use axum::{http::StatusCode, routing::get};
    axum::Router::new()
        .route(
            "/metrics",
            get(move || std::future::ready((StatusCode::OK, metrics.render()))),
        )
        .route(
            "/healthz",
            get(move || {
                let held = node.held_segments();
                std::future::ready((
                    StatusCode::OK,
                    format!("ok: query node {}, {held} segments held\n", node.id()),
                ))
            }),
        )
}
