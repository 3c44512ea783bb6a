//! What every server role shares: binding the listeners first (a bad or busy address fails at
//! once, before recovery or a campaign), TLS and tokens, the HTTP endpoints, the gRPC server
//! with its admission control, the ready file, and the shutdown signal.

use std::{net::SocketAddr, path::Path, time::Duration};

use anyhow::Context;
use axum::Router;
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tracing::info;
use walden_connect::ConnectOptions;

use crate::{auth, config::ServerConfig, listener, tls};

/// The bound listeners.
#[derive(Debug)]
pub struct Bound {
    pub grpc: TcpListener,
    pub addr: SocketAddr,
    pub http: Option<TcpListener>,
    pub max_connections: usize,
}

/// Binds `server.listen` and `server.metrics_listen`, and raises the open-file limit.
pub async fn bind(config: &ServerConfig) -> anyhow::Result<Bound> {
    let grpc = TcpListener::bind(&config.listen)
        .await
        .with_context(|| format!("binding server.listen {}", config.listen))?;
    let addr = grpc.local_addr()?;
    let http = if config.metrics_listen.is_empty() {
        None
    } else {
        Some(
            TcpListener::bind(&config.metrics_listen)
                .await
                .with_context(|| {
                    format!("binding server.metrics_listen {}", config.metrics_listen)
                })?,
        )
    };
    let max_connections = match listener::raise_fd_limit() {
        Ok((before, now)) => {
            info!(soft_before = before, soft_now = now, "open-file limit");
            listener::effective_max_connections(config.max_connections, now)
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not raise the open-file limit");
            config.max_connections
        }
    };
    if max_connections < config.max_connections {
        tracing::warn!(
            configured = config.max_connections,
            max_connections,
            "server.max_connections lowered to what the open-file limit leaves"
        );
    }
    Ok(Bound {
        grpc,
        addr,
        http,
        max_connections,
    })
}

/// Binds `milvus.listen` (none when empty): a bad or busy address fails at once too.
pub async fn bind_milvus(
    config: &crate::config::MilvusConfig,
) -> anyhow::Result<Option<TcpListener>> {
    if config.listen.is_empty() {
        return Ok(None);
    }
    Ok(Some(TcpListener::bind(&config.listen).await.with_context(
        || {
            format!(
                "binding milvus.listen {} (--milvus-listen \"\" turns it off)",
                config.listen
            )
        },
    )?))
}

/// TLS and bearer tokens, read before anything else runs: a bad file is named at once.
#[derive(Clone, Debug)]
pub struct Security {
    pub tls: Option<tls::TlsFiles>,
    pub tokens: auth::Tokens,
}

impl Security {
    pub fn load(config: &ServerConfig, addr: SocketAddr) -> anyhow::Result<Self> {
        let tls = match (&config.tls_cert_file, &config.tls_key_file) {
            (Some(cert), Some(key)) => Some(tls::load(cert, key)?),
            _ => None,
        };
        let tokens = match &config.auth_token_file {
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
        Ok(Self { tls, tokens })
    }

    /// `http` or `https`.
    pub fn scheme(&self) -> &'static str {
        if self.tls.is_some() { "https" } else { "http" }
    }

    /// How a process reaches its own gRPC server (the Milvus API of a standalone): its own
    /// token, and with TLS the authority of `cluster.tls_ca_file`, or else its own certificate
    /// (a self-signed one is its own authority).
    pub fn own_client(
        &self,
        cluster: &crate::config::ClusterConfig,
    ) -> anyhow::Result<ConnectOptions> {
        let tls_ca_pem =
            match (&cluster.tls_ca_file, &self.tls) {
                (Some(path), _) => Some(std::fs::read(path).with_context(|| {
                    format!("cluster.tls_ca_file: cannot read {}", path.display())
                })?),
                (None, Some(t)) => Some(t.cert_pem.clone()),
                (None, None) => None,
            };
        Ok(ConnectOptions {
            token: self.tokens.own(),
            tls_ca_pem,
        })
    }

    /// How this cluster process reaches the others (docs/design.md §11.1): its own token, and
    /// the authority of `cluster.tls_ca_file`, required when this process serves TLS (the
    /// others advertise `https://` then).
    pub fn peers(&self, cluster: &crate::config::ClusterConfig) -> anyhow::Result<ConnectOptions> {
        let tls_ca_pem =
            match &cluster.tls_ca_file {
                Some(path) => Some(std::fs::read(path).with_context(|| {
                    format!("cluster.tls_ca_file: cannot read {}", path.display())
                })?),
                None => None,
            };
        anyhow::ensure!(
            self.tls.is_none() || tls_ca_pem.is_some(),
            "cluster.tls_ca_file must name the authority of the cluster's certificates when              server.tls_cert_file is set: the other processes serve TLS too"
        );
        Ok(ConnectOptions {
            token: self.tokens.own(),
            tls_ca_pem,
        })
    }
}

/// Serves `app` on the HTTP listener (with the server's TLS, if on). With tokens on, every
/// path needs one (401 without), `/healthz` too unless `public_healthz`: the same rule for
/// every role's endpoints.
pub fn spawn_http(
    http: TcpListener,
    app: Router,
    security: &Security,
    public_healthz: bool,
) -> anyhow::Result<SocketAddr> {
    let addr = http.local_addr()?;
    let tokens = security.tokens.clone();
    let app = app.layer(axum::middleware::from_fn(
        move |req: axum::extract::Request, next: axum::middleware::Next| {
            let allowed = (public_healthz && req.uri().path() == "/healthz")
                || tokens.accepts(
                    req.headers()
                        .get(axum::http::header::AUTHORIZATION)
                        .map(|v| v.as_bytes()),
                );
            async move {
                if allowed {
                    next.run(req).await
                } else {
                    axum::response::IntoResponse::into_response((
                        axum::http::StatusCode::UNAUTHORIZED,
                        "a valid bearer token is required\n",
                    ))
                }
            }
        },
    ));
    match &security.tls {
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
    info!(%addr, "metrics and health on {}://{addr}/metrics, /healthz", security.scheme());
    Ok(addr)
}

/// Writes the bound addresses as JSON (atomically), for scripts that started on port 0.
pub fn write_ready_file(
    path: &Path,
    addr: SocketAddr,
    http: Option<SocketAddr>,
    extra: serde_json::Value,
) -> anyhow::Result<()> {
    let mut doc = serde_json::json!({
        "grpc": addr.to_string(),
        "http": http.map(|a| a.to_string()),
    });
    if let (Some(d), serde_json::Value::Object(e)) = (doc.as_object_mut(), extra) {
        d.extend(e);
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, doc.to_string())
        .and_then(|()| std::fs::rename(&tmp, path))
        .with_context(|| format!("writing --ready-file {}", path.display()))
}

/// How long open streams may take to finish after the server stops accepting.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// A running gRPC server.
#[derive(Debug)]
pub struct GrpcServer {
    drain: Option<oneshot::Sender<()>>,
    pub task: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl GrpcServer {
    /// Serves `routes` (and gRPC reflection of Walden's API) on the bound listener, behind the
    /// token interceptor and admission control.
    pub fn start(
        bound_grpc: TcpListener,
        max_connections: usize,
        config: &ServerConfig,
        security: &Security,
        routes: tonic::service::Routes,
    ) -> anyhow::Result<Self> {
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(walden_proto::v1::FILE_DESCRIPTOR_SET)
            .build_v1()
            .context("building gRPC reflection")?;
        Self::serve(
            bound_grpc,
            max_connections,
            config,
            security,
            routes.add_service(reflection),
            security.tokens.interceptor(),
        )
    }

    /// Serves Milvus's API on its listener: the server's TLS and admission control, and its
    /// tokens as Milvus clients send them.
    pub fn start_milvus(
        bound: TcpListener,
        max_connections: usize,
        config: &ServerConfig,
        security: &Security,
        routes: tonic::service::Routes,
    ) -> anyhow::Result<Self> {
        Self::serve(
            bound,
            max_connections,
            config,
            security,
            routes,
            security.tokens.milvus_interceptor(),
        )
    }

    fn serve<I>(
        bound_grpc: TcpListener,
        max_connections: usize,
        config: &ServerConfig,
        security: &Security,
        routes: tonic::service::Routes,
        interceptor: I,
    ) -> anyhow::Result<Self>
    where
        I: tonic::service::Interceptor + Clone + Send + Sync + 'static,
    {
        let ms = Duration::from_millis;
        let admission = listener::Admission {
            max_connections,
            handshake_timeout: ms(config.handshake_timeout_ms),
        };
        let mut builder = tonic::transport::Server::builder();
        if let Some(t) = &security.tls {
            builder = builder
                .tls_config(tonic::transport::ServerTlsConfig::new().identity(
                    tonic::transport::Identity::from_pem(&t.cert_pem, &t.key_pem),
                ))
                .context("server TLS")?;
        }
        let (drain_tx, drain_rx) = oneshot::channel::<()>();
        let mut builder = builder
            .layer(tonic::service::InterceptorLayer::new(interceptor))
            .tcp_nodelay(true)
            .http2_keepalive_interval(Some(ms(config.keepalive_interval_ms)))
            .http2_keepalive_timeout(Some(ms(config.keepalive_timeout_ms)));
        let server = builder.add_routes(routes).serve_with_incoming_shutdown(
            listener::incoming(bound_grpc, admission),
            async {
                let _ = drain_rx.await;
            },
        );
        Ok(Self {
            drain: Some(drain_tx),
            task: tokio::spawn(server),
        })
    }

    /// Stops accepting and waits for open streams, at most [`SHUTDOWN_GRACE`]. Open streams (a
    /// tailing consumer, an idle producer) would hold a graceful drain forever; nothing
    /// acknowledged is at risk: acknowledged means durable.
    pub async fn stop(mut self) {
        if let Some(d) = self.drain.take() {
            let _ = d.send(());
        }
        if tokio::time::timeout(SHUTDOWN_GRACE, &mut self.task)
            .await
            .is_err()
        {
            info!("grace period over; closing with streams still open");
        }
    }
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
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

/// The address others reach this server at: `advertise` if set, else the bound address (a
/// wildcard bind cannot be advertised: it is refused).
pub fn advertised(
    advertise: &str,
    addr: SocketAddr,
    security: &Security,
) -> anyhow::Result<String> {
    if !advertise.is_empty() {
        return Ok(if advertise.contains("://") {
            advertise.to_owned()
        } else {
            format!("{}://{advertise}", security.scheme())
        });
    }
    anyhow::ensure!(
        !addr.ip().is_unspecified(),
        "server.listen {addr} is a wildcard address: set cluster.advertise to the address other \
         processes reach this one at"
    );
    Ok(format!("{}://{addr}", security.scheme()))
}
