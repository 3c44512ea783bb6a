//! TLS for the gRPC and HTTP endpoints (`[server] tls_cert_file`, `tls_key_file`, PEM), with
//! rustls on ring. gRPC gets it through tonic; the HTTP endpoint through a listener that
//! completes each handshake before handing the connection to axum.

use std::{path::Path, sync::Arc, time::Duration};

use anyhow::Context;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, rustls, server::TlsStream};

/// The certificate chain and key, read and checked at start (a bad file is refused with the
/// key to fix, not found at the first connection).
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    /// The same, as a rustls server config (for the HTTP endpoint).
    pub rustls: Arc<rustls::ServerConfig>,
}

pub fn load(cert: &Path, key: &Path) -> anyhow::Result<TlsFiles> {
    let cert_pem = std::fs::read(cert)
        .with_context(|| format!("reading server.tls_cert_file {}", cert.display()))?;
    let key_pem = std::fs::read(key)
        .with_context(|| format!("reading server.tls_key_file {}", key.display()))?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("server.tls_cert_file {}: not PEM", cert.display()))?;
    anyhow::ensure!(
        !chain.is_empty(),
        "server.tls_cert_file {} holds no certificate",
        cert.display()
    );
    let private = PrivateKeyDer::from_pem_slice(&key_pem)
        .with_context(|| format!("server.tls_key_file {}: no PEM private key", key.display()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("TLS protocol versions")?
    .with_no_client_auth()
    .with_single_cert(chain, private)
    .context("server.tls_cert_file and server.tls_key_file do not form a key pair")?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsFiles {
        cert_pem,
        key_pem,
        rustls: Arc::new(config),
    })
}

/// Longest a client may take over its TLS handshake on the HTTP endpoint.
const HANDSHAKE: Duration = Duration::from_secs(10);

/// A TCP listener whose connections are TLS, for `axum::serve`. Handshakes run side by side
/// (a slow client cannot hold the others up); a failed or slow one drops its connection.
#[derive(Debug)]
pub struct TlsListener {
    local: std::net::SocketAddr,
    ready: tokio::sync::mpsc::Receiver<(TlsStream<TcpStream>, std::net::SocketAddr)>,
}

impl TlsListener {
    pub fn new(tcp: TcpListener, config: Arc<rustls::ServerConfig>) -> std::io::Result<Self> {
        let local = tcp.local_addr()?;
        let acceptor = TlsAcceptor::from(config);
        let (tx, ready) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let (conn, addr) = match tcp.accept().await {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::debug!(error = %e, "metrics accept failed; backing off");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let (acceptor, handed) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE, acceptor.accept(conn)).await {
                        Ok(Ok(tls)) => {
                            let _ = handed.send((tls, addr)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%addr, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%addr, "TLS handshake timed out"),
                    }
                });
                if tx.is_closed() {
                    return;
                }
            }
        });
        Ok(Self { local, ready })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(x) => x,
            // The accept task only ends once this listener is gone.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}
