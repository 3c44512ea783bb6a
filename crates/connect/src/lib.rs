//! The one way to reach another Walden process (docs/design.md §11.1): the client, a node's
//! clock calls to the leader coordinator, the coordinator's catalog appends, a delegator's
//! calls to query nodes and a read replica's stream from the owner all build their
//! connections here, so a cluster with TLS and tokens works end to end.
//!
//! **Contract.**
//! * [`ConnectOptions`] names the token and the certificate authority. With a CA, an address
//!   without a scheme means `https://`, and the server's certificate must chain to it; without
//!   one, `http://`. An explicit scheme is kept.
//! * [`endpoint`] sets the connect timeout (5 s), `TCP_NODELAY` and HTTP/2 keepalive (10 s),
//!   the same for every caller; a caller may add a per-call timeout.
//! * [`Bearer`] adds `authorization: Bearer TOKEN` to every call when there is a token; it
//!   never prints the token.
//! * Errors name the address and are `INVALID_ARGUMENT`: a bad address or CA is a setting to
//!   fix, not an outage to retry.

use std::time::Duration;

use thiserror::Error;
use tonic::{
    metadata::{Ascii, MetadataValue},
    service::interceptor::InterceptedService,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint},
};
use walden_common::{ErrorCode, HasErrorCode};

/// How to reach a Walden process beyond its address.
#[derive(Clone, Default)]
pub struct ConnectOptions {
    /// A bearer token sent with every call (`[server] auth_token_file` on the server).
    pub token: Option<String>,
    /// PEM certificate(s) of the authority that signed the server's certificate: turns TLS on
    /// (an address without a scheme then means `https://`).
    pub tls_ca_pem: Option<Vec<u8>>,
}

impl std::fmt::Debug for ConnectOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectOptions")
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .field("tls", &self.tls_ca_pem.is_some())
            .finish()
    }
}

impl ConnectOptions {
    /// The interceptor that sends this token.
    pub fn bearer(&self) -> Result<Bearer, ConnectError> {
        Bearer::new(self.token.as_deref())
    }
}

/// A setting that cannot work.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConnectError {
    #[error("address {addr:?}: {detail}")]
    Address { addr: String, detail: String },
    #[error("TLS: {0}")]
    Tls(String),
    #[error("the token has characters a header cannot carry")]
    Token,
}

impl HasErrorCode for ConnectError {
    fn code(&self) -> ErrorCode {
        ErrorCode::InvalidArgument
    }
}

/// Adds the bearer token, when there is one, to every call.
#[derive(Clone, Default)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Bearer {
    /// The interceptor for `token` (none: calls go without).
    pub fn new(token: Option<&str>) -> Result<Self, ConnectError> {
        match token {
            None => Ok(Self(None)),
            Some(t) => format!("Bearer {t}")
                .parse()
                .map(|v| Self(Some(v)))
                .map_err(|_| ConnectError::Token),
        }
    }

    /// Whether calls carry a token.
    pub fn is_set(&self) -> bool {
        self.0.is_some()
    }
}

impl std::fmt::Debug for Bearer {
    /// Never the token itself.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Bearer(token)"
        } else {
            "Bearer(none)"
        })
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// A channel whose calls carry the token.
pub type Authed = InterceptedService<Channel, Bearer>;

/// The URL of `addr` (`http://host:port`, `https://...`, or `host:port`).
pub fn url_of(addr: &str, options: &ConnectOptions) -> String {
    if addr.contains("://") {
        addr.to_owned()
    } else if options.tls_ca_pem.is_some() {
        format!("https://{addr}")
    } else {
        format!("http://{addr}")
    }
}

/// The endpoint of `addr`, with the CA when there is one.
pub fn endpoint(addr: &str, options: &ConnectOptions) -> Result<Endpoint, ConnectError> {
    let url = url_of(addr, options);
    let mut endpoint = Endpoint::from_shared(url).map_err(|e| ConnectError::Address {
        addr: addr.to_owned(),
        detail: e.to_string(),
    })?;
    endpoint = endpoint
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10));
    if let Some(ca) = &options.tls_ca_pem {
        // rustls cannot pick a crypto provider by itself when built with more than one; the
        // process's choice stands if it made one.
        let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
        endpoint = endpoint
            .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)))
            .map_err(|e| ConnectError::Tls(walden_common::error_chain(&e)))?;
    }
    Ok(endpoint)
}

/// A lazily connected channel to `addr` whose calls carry the token, each limited to
/// `timeout` when given.
pub fn lazy(
    addr: &str,
    options: &ConnectOptions,
    timeout: Option<Duration>,
) -> Result<Authed, ConnectError> {
    let mut ep = endpoint(addr, options)?;
    if let Some(t) = timeout {
        ep = ep.timeout(t);
    }
    Ok(InterceptedService::new(
        ep.connect_lazy(),
        options.bearer()?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_without_a_scheme_is_https_with_a_ca_and_http_without() {
        let plain = ConnectOptions::default();
        let tls = ConnectOptions {
            tls_ca_pem: Some(b"x".to_vec()),
            ..ConnectOptions::default()
        };
        assert_eq!(url_of("127.0.0.1:1", &plain), "http://127.0.0.1:1");
        assert_eq!(url_of("127.0.0.1:1", &tls), "https://127.0.0.1:1");
        assert_eq!(
            url_of("http://h:1", &tls),
            "http://h:1",
            "an explicit scheme stays"
        );
    }

    #[test]
    fn a_token_is_sent_and_never_printed() {
        let mut b = Bearer::new(Some("s3cret")).unwrap();
        let req = tonic::service::Interceptor::call(&mut b, tonic::Request::new(())).unwrap();
        assert_eq!(
            req.metadata().get("authorization").unwrap(),
            "Bearer s3cret"
        );
        assert!(!format!("{b:?}").contains("s3cret"));
        assert_eq!(Bearer::new(Some("a\nb")).unwrap_err(), ConnectError::Token);
        assert!(
            !format!(
                "{:?}",
                ConnectOptions {
                    token: Some("s3cret".into()),
                    tls_ca_pem: None
                }
            )
            .contains("s3cret")
        );
    }

    #[tokio::test]
    async fn a_bad_address_is_named() {
        let e = endpoint("http://bad host", &ConnectOptions::default()).unwrap_err();
        assert!(e.to_string().contains("bad host"), "{e}");
        assert_eq!(e.code(), ErrorCode::InvalidArgument);
    }
}
