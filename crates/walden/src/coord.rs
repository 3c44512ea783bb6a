//! `walden coord`: a streaming coordinator of a cluster. Every coordinator serves the topology;
//! the one elected leader also balances, serves the cluster clock and runs the catalog.

use std::sync::Arc;

use anyhow::Context;
use axum::{Router, http::StatusCode, routing::get};
use tracing::info;
use walden_balancer::{
    BalancerConfig, ClusterCoord, CoordConfig, Metrics, service::ClusterService,
};
use walden_proto::v1::CoordinatorInfo;

use crate::{
    backends,
    cluster::{LeaderCatalog, RoutedAppender, run_catalog},
    config::Config,
    server::{self, GrpcServer},
};

pub async fn run(config: Config, ready_file: Option<std::path::PathBuf>) -> anyhow::Result<()> {
    let bound = server::bind(&config.server).await?;
    let addr = bound.addr;
    let security = server::Security::load(&config.server, addr)?;
    let advertise = server::advertised(&config.cluster.advertise, addr, &security)?;
    let meta = backends::etcd(&config).await?;
    let registry = prometheus::Registry::new();
    let metrics = Metrics::new(&registry).context("registering metrics")?;
    let ms = std::time::Duration::from_millis;
    let c = &config.cluster;
    let coord = ClusterCoord::start(
        meta.clone(),
        CoordinatorInfo {
            epoch: 0,
            address: advertise.clone(),
            http_address: String::new(),
        },
        CoordConfig {
            balancer: BalancerConfig {
                pchannels: config.node.pchannel_names(),
                max_moves_in_flight: c.max_moves_in_flight,
                open_timeout: ms(c.open_timeout_ms),
                ..BalancerConfig::default()
            },
            lease_ttl: ms(c.coord_lease_ttl_ms),
            tso_window: ms(config.node.tso_window_ms),
        },
        metrics,
    )
    .await
    .context("starting the coordinator")?;

    let (catalog_tx, catalog_rx) = tokio::sync::watch::channel(None);
    let routes = tonic::service::Routes::new(ClusterService::new(coord.clone()).into_server())
        .add_service(
            walden_proto::v1::collections_server::CollectionsServer::new(LeaderCatalog {
                catalog: catalog_rx,
                meta: meta.clone(),
            }),
        );
    let mut grpc = GrpcServer::start(
        bound.grpc,
        bound.max_connections,
        &config.server,
        &security,
        routes,
    )?;
    let http_addr = match bound.http {
        Some(http) => Some(server::spawn_http(
            http,
            http_app(coord.clone(), registry),
            &security,
            config.server.public_healthz,
        )?),
        None => None,
    };
    // The catalog appends through the routed client, following this coordinator's own topology.
    let client = walden_client::Client::connect_with(&advertise, &security.peers(&config.cluster)?)
        .await
        .context("connecting the catalog's client to this coordinator")?;
    let appender = Arc::new(RoutedAppender {
        client,
        topology: coord.topology().clone(),
    });
    tokio::spawn(run_catalog(coord.clone(), meta, appender, catalog_tx));
    info!(%addr, advertise, "walden coord ready");
    if let Some(path) = &ready_file {
        server::write_ready_file(path, addr, http_addr, serde_json::json!({}))?;
    }
    tokio::select! {
        r = &mut grpc.task => {
            r.context("the gRPC server task")?.context("serving gRPC")?;
        }
        () = server::shutdown_signal() => {
            info!("shutting down");
            coord.resign().await;
            grpc.stop().await;
        }
    }
    Ok(())
}

/// `/metrics`, and `/healthz`: 200 while a leader is known (this one or another).
fn http_app(coord: Arc<ClusterCoord>, registry: prometheus::Registry) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(move || {
                let registry = registry.clone();
                async move {
                    let mut out = String::new();
                    let enc = prometheus::TextEncoder::new();
                    let _ = enc.encode_utf8(&registry.gather(), &mut out);
                    (StatusCode::OK, out)
                }
            }),
        )
        .route(
            "/healthz",
            get(move || {
                let coord = coord.clone();
                async move {
                    let s = coord.status().await;
                    match s.leader {
                        Some(l) => (
                            StatusCode::OK,
                            format!(
                                "ok: {} (leader {} epoch {})\n",
                                if s.answered_by_leader {
                                    "leading"
                                } else {
                                    "standby"
                                },
                                l.address,
                                l.epoch
                            ),
                        ),
                        None => (
                            StatusCode::SERVICE_UNAVAILABLE,
                            "no leader elected\n".into(),
                        ),
                    }
                }
            }),
        )
}
