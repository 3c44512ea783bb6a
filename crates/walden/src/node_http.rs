//! A node's HTTP endpoints (standalone's and a cluster node's): `/metrics` and `/healthz`.

use std::{net::SocketAddr, sync::Arc};

use axum::{Router, http::StatusCode, routing::get};
use tokio::net::TcpListener;
use walden_streaming_node::{manager::WalManager, metrics::Metrics};

use crate::{
    auth,
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
    let app = http_app(
        manager.clone(),
        metrics.clone(),
        security.tokens.clone(),
        config.public_healthz,
    );
    Ok(Some(server::spawn_http(http, app, security)?))
}

/// `/metrics` and `/healthz`; with tokens on, both need one (`/healthz` not with
/// `public_healthz`), else 401.
fn http_app(
    manager: Arc<WalManager>,
    metrics: Metrics,
    tokens: auth::Tokens,
    public_healthz: bool,
) -> Router {
    use axum::http::{HeaderMap, header::AUTHORIZATION};
    let allowed = move |headers: &HeaderMap, public: bool| {
        public || tokens.accepts(headers.get(AUTHORIZATION).map(|v| v.as_bytes()))
    };
    let denied = || {
        (
            StatusCode::UNAUTHORIZED,
            "a valid bearer token is required\n".to_owned(),
        )
    };
    let m2 = manager.clone();
    let a2 = allowed.clone();
    Router::new()
        .route(
            "/metrics",
            get(move |headers: HeaderMap| {
                let manager = manager.clone();
                let metrics = metrics.clone();
                async move {
                    if !allowed(&headers, false) {
                        return denied();
                    }
                    manager.refresh_metrics();
                    (StatusCode::OK, metrics.render())
                }
            }),
        )
        .route(
            "/healthz",
            get(move |headers: HeaderMap| {
                let manager = m2.clone();
                async move {
                    if !a2(&headers, public_healthz) {
                        return denied();
                    }
                    health(&manager)
                }
            }),
        )
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
