//! `walden standalone`: every role in one process on embedded defaults. This is the one place
//! that picks concrete backends.

use std::sync::Arc;

use anyhow::Context;
use axum::{Router, http::StatusCode, routing::get};
use tokio::net::TcpListener;
use tracing::info;
use walden_common::HasErrorCode;
use walden_coordinator::{AppendError, Appender, Coordinator, service::CollectionService};
use walden_message::MutableMessage;
use walden_metastore_api::MetaStore;
use walden_streaming_node::{
    NodeError, manager::WalManager, metrics::Metrics, service::NodeService,
};
use walden_wal_api::WalStorage;
use walden_wal_local::{LocalWalStorage, Reserve, SharedLogStorage};

use walden_object_store::StoreMetrics;
use walden_wal_object::ObjectWalStorage;

use crate::{
    auth,
    config::{Config, WalStorageKind},
    listener, tls,
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
    // are raised.
    let listener = TcpListener::bind(&config.server.listen)
        .await
        .with_context(|| format!("binding server.listen {}", config.server.listen))?;
    let addr = listener.local_addr()?;
    let http = if config.server.metrics_listen.is_empty() {
        None
    } else {
        Some(
            TcpListener::bind(&config.server.metrics_listen)
                .await
                .with_context(|| {
                    format!(
                        "binding server.metrics_listen {}",
                        config.server.metrics_listen
                    )
                })?,
        )
    };
    let max_connections = match listener::raise_fd_limit() {
        Ok((before, now)) => {
            info!(soft_before = before, soft_now = now, "open-file limit");
            listener::effective_max_connections(config.server.max_connections, now)
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not raise the open-file limit");
            config.server.max_connections
        }
    };
    if max_connections < config.server.max_connections {
        tracing::warn!(
            configured = config.server.max_connections,
            max_connections,
            "server.max_connections lowered to what the open-file limit leaves"
        );
    }

    // Certificates and tokens are read before recovery too: a bad file is named at once.
    let tls = match (&config.server.tls_cert_file, &config.server.tls_key_file) {
        (Some(cert), Some(key)) => Some(tls::load(cert, key)?),
        _ => None,
    };
    let tokens = match &config.server.auth_token_file {
        Some(path) => auth::Tokens::load(path)?,
        None => auth::Tokens::off(),
    };
    tokens.reload_on_sighup();
    if !addr.ip().is_loopback() && (tls.is_none() || !tokens.enabled()) {
        tracing::warn!(
            %addr,
            tls = tls.is_some(),
            auth = tokens.enabled(),
            "listening beyond loopback without TLS and bearer tokens: anyone who reaches the \
             port can read, write and drop collections"
        );
    }

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
    let storage: Arc<dyn WalStorage> = match config.wal.storage {
        WalStorageKind::Local => wal_storage(&data_dir.join("wal"), &config.wal_local)?,
        WalStorageKind::Object => {
            let store_metrics = StoreMetrics::new(&metrics.registry)
                .context("registering the object store's metrics")?;
            // Checked before recovery: a bad endpoint, key or bucket is one line naming the
            // setting to fix.
            let blobs = walden_object_store::open(&config.object_store, store_metrics)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))
                .context("opening the object store for the WAL")?;
            info!(url = %config.object_store.url, "WAL on object storage");
            Arc::new(ObjectWalStorage::new(blobs, (&config.wal_object).into()))
        }
    };
    let manager = WalManager::start(storage, meta.clone(), config.node.clone(), metrics.clone())
        .await
        .context("opening the pchannels")?;
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

    let http_addr = http.as_ref().map(TcpListener::local_addr).transpose()?;
    if let Some(http) = http {
        let http_addr = http.local_addr()?;
        let app = http_app(
            manager.clone(),
            metrics.clone(),
            tokens.clone(),
            config.server.public_healthz,
        );
        let scheme = if tls.is_some() { "https" } else { "http" };
        match &tls {
            Some(t) => {
                let listener = tls::TlsListener::new(http, t.rustls.clone())?;
                tokio::spawn(async move {
                    if let Err(e) = axum::serve(listener, app).await {
                        tracing::warn!(error = %e, "metrics server stopped");
                    }
                });
            }
            None => {
                tokio::spawn(async move {
                    if let Err(e) = axum::serve(http, app).await {
                        tracing::warn!(error = %e, "metrics server stopped");
                    }
                });
            }
        }
        info!(addr = %http_addr, "metrics and health on {scheme}://{http_addr}/metrics, /healthz");
    }

    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(walden_proto::v1::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("building gRPC reflection")?;
    let node_id = format!("standalone@{addr}");
    info!(%addr, data_dir = %data_dir.display(), "walden standalone ready");
    if let Some(path) = &ready_file {
        let doc = serde_json::json!({
            "grpc": addr.to_string(),
            "http": http_addr.map(|a| a.to_string()),
        });
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, doc.to_string())
            .and_then(|()| std::fs::rename(&tmp, path))
            .with_context(|| format!("writing --ready-file {}", path.display()))?;
    }
    let (drain_tx, drain_rx) = tokio::sync::oneshot::channel::<()>();
    let ms = std::time::Duration::from_millis;
    let admission = listener::Admission {
        max_connections,
        handshake_timeout: ms(config.server.handshake_timeout_ms),
    };
    let mut builder = tonic::transport::Server::builder();
    if let Some(t) = &tls {
        builder = builder
            .tls_config(tonic::transport::ServerTlsConfig::new().identity(
                tonic::transport::Identity::from_pem(&t.cert_pem, &t.key_pem),
            ))
            .context("server TLS")?;
    }
    let server = builder
        .layer(tonic::service::InterceptorLayer::new(tokens.interceptor()))
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(ms(config.server.keepalive_interval_ms)))
        .http2_keepalive_timeout(Some(ms(config.server.keepalive_timeout_ms)))
        .add_service(NodeService::new(manager.clone(), node_id).into_server())
        .add_service(CollectionService::new(coordinator).into_server())
        .add_service(reflection)
        .serve_with_incoming_shutdown(listener::incoming(listener, admission), async {
            let _ = drain_rx.await;
        });
    tokio::pin!(server);
    tokio::select! {
        r = &mut server => r.context("serving gRPC")?,
        () = shutdown_signal() => {
            info!("shutting down: draining connections");
            let _ = drain_tx.send(());
            // Open streams (a tailing consumer, an idle producer) would hold a graceful drain
            // forever; past the grace period the node closes anyway. Nothing acknowledged is
            // at risk: acknowledged means durable.
            if tokio::time::timeout(SHUTDOWN_GRACE, &mut server).await.is_err() {
                info!("grace period over; closing with streams still open");
            }
        }
    }
    info!("closing pchannels");
    manager.shutdown().await;
    Ok(())
}

/// The local WAL in the configured layout, refusing a data dir written in the other one (its
/// records would be silently ignored otherwise).
fn wal_storage(
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

/// How long open streams may take to finish after SIGTERM or Ctrl-C.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
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
