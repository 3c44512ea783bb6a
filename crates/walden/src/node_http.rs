//! A node's HTTP endpoints (standalone's and a cluster node's): `/metrics` and `/healthz`.

use std::{net::SocketAddr, sync::Arc};

use axum::{Router, http::StatusCode, routing::get};
use tokio::net::TcpListener;
use walden_streaming_node::{manager::WalManager, metrics::Metrics};

use crate::{
    config::ServerConfig,
    server::{self, Security},
};

/// Serves the node's endpoints on `http` (none: `server.metrics_listen` is empty).
pub fn spawn(
    http: Option<TcpListener>,
    manager: &Arc<WalManager>,
    metrics: &Metrics,
    security: &Security,
    config: &ServerConfig,
) -> anyhow::Result<Option<SocketAddr>> {
    let Some(http) = http else { return Ok(None) };
    let app = http_app(manager.clone(), metrics.clone());
    Ok(Some(server::spawn_http(
        http,
        app,
        security,
        config.public_healthz,
    )?))
}

/// `/metrics` and `/healthz` (tokens are checked by [`server::spawn_http`]).
fn http_app(manager: Arc<WalManager>, metrics: Metrics) -> Router {
    let m2 = manager.clone();
    Router::new()
        .route(
            "/metrics",
            get(move || {
                let manager = manager.clone();
                let metrics = metrics.clone();
                async move {
                    manager.refresh_metrics();
                    (StatusCode::OK, metrics.render())
                }
            }),
        )
        .route("/healthz", get(move || std::future::ready(health(&m2))))
}

/// 200 when every pchannel serves reads and writes; else 503 with each one that does not
/// (failed, read-only, corrupted), and why.
fn health(manager: &WalManager) -> (StatusCode, String) {
    let all = manager.statuses();
    let bad: Vec<String> = all
        .iter()
        .filter(|p| p.state != "serving")
        .map(|p| format!("{} {}: {}", p.name, p.state, p.state_detail))
        .collect();
    if all.is_empty() || !bad.is_empty() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not serving: {}\n", bad.join("; ")),
        )
    } else {
        (StatusCode::OK, format!("ok: {} pchannels\n", all.len()))
    }
}
