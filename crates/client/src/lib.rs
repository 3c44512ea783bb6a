//! The Rust client for Walden.
//!
//! ```no_run
//! use bytes::Bytes;
//! use walden_client::{Client, ConsumerOptions, ProducerOptions};
//! use walden_message::{MessageType, MutableMessage};
//!
//! # async fn demo() -> Result<(), walden_client::ClientError> {
//! let client = Client::connect("http://127.0.0.1:19540").await?;
//! let producer = client.producer("walden-dml-0", ProducerOptions::default());
//! let msg = MutableMessage::new(MessageType::Data, "orders", Bytes::from("hello"));
//! let placed = producer.send(msg).await?.await?;
//! println!("appended at id {} tick {}", placed.id, placed.tick);
//!
//! let mut consumer = client.consumer("walden-dml-0", ConsumerOptions::default());
//! while let Some(m) = consumer.next().await {
//!     let m = m?;
//!     println!("{} {:?}", m.id, m.payload);
//! #   break;
//! }
//! # Ok(()) }
//! ```
//!
//! The producer pipelines appends within a bounded window and, when the stream breaks or the
//! node answers with a retryable error, reconnects and resends every unacknowledged message in
//! its original order. The consumer resumes after a break from the last message it delivered
//! (from that message's last-confirmed id, keeping only greater ticks), so each message is
//! delivered once.

mod collections;
mod consumer;
mod error;
mod producer;
mod txn;

use std::time::Duration;

use tonic::{
    metadata::{Ascii, MetadataValue},
    service::interceptor::InterceptedService,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint},
};
use walden_proto::v1::{StatusRequest, StatusResponse, streaming_node_client::StreamingNodeClient};

pub use collections::{Collections, WriteResult};
pub use consumer::{Consumer, ConsumerOptions, DeliverFrom};
pub use error::ClientError;

pub use producer::{AppendResult, DEFAULT_MAX_MESSAGE_BYTES, Producer, ProducerOptions};
pub use txn::Txn;

/// Adds the bearer token, when there is one, to every call.
#[derive(Clone, Default)]
pub struct Auth(Option<MetadataValue<Ascii>>);

impl std::fmt::Debug for Auth {
    /// Never the token itself.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Auth(token)"
        } else {
            "Auth(none)"
        })
    }
}

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// The node's gRPC client as every part of this crate uses it.
pub(crate) type Grpc = StreamingNodeClient<InterceptedService<Channel, Auth>>;

/// How to reach a node beyond its address.
#[derive(Clone, Default)]
pub struct ConnectOptions {
    /// A bearer token sent with every call (`[server] auth_token_file` on the node).
    pub token: Option<String>,
    /// PEM certificate(s) of the authority that signed the node's certificate: turns TLS on
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

/// A connection to a Walden node. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Client {
    grpc: Grpc,
    channel: Channel,
    auth: Auth,
    addr: String,
}

impl Client {
    /// Connects to `addr` (`http://host:port`, or `host:port`) without TLS or a token.
    pub async fn connect(addr: &str) -> Result<Self, ClientError> {
        Self::connect_with(addr, &ConnectOptions::default()).await
    }

    /// Connects to `addr` with a token and/or TLS.
    pub async fn connect_with(addr: &str, options: &ConnectOptions) -> Result<Self, ClientError> {
        let tls = options.tls_ca_pem.is_some();
        let url = if addr.contains("://") {
            addr.to_owned()
        } else if tls {
            format!("https://{addr}")
        } else {
            format!("http://{addr}")
        };
        let mut endpoint = Endpoint::from_shared(url.clone())
            .map_err(|e| ClientError::InvalidArgument(format!("address {addr:?}: {e}")))?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10));
        if let Some(ca) = &options.tls_ca_pem {
            // rustls cannot pick a crypto provider by itself when built with more than one;
            // the process's choice stands if it made one.
            let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
            endpoint = endpoint
                .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)))
                .map_err(|e| ClientError::InvalidArgument(format!("TLS: {}", error::chain(&e))))?;
        }
        let auth = match &options.token {
            None => Auth(None),
            Some(t) => Auth(Some(format!("Bearer {t}").parse().map_err(|_| {
                ClientError::InvalidArgument(
                    "the token has characters a header cannot carry".into(),
                )
            })?)),
        };
        let channel = endpoint.connect().await.map_err(|e| ClientError::Connect {
            addr: url.clone(),
            detail: error::chain(&e),
        })?;
        Ok(Self {
            channel: channel.clone(),
            grpc: StreamingNodeClient::with_interceptor(channel, auth.clone())
                .max_decoding_message_size(256 << 20)
                .max_encoding_message_size(256 << 20),
            auth,
            addr: url,
        })
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The node's pchannels, terms, ticks and sizes.
    pub async fn status(&self) -> Result<StatusResponse, ClientError> {
        Ok(self
            .grpc
            .clone()
            .status(StatusRequest {})
            .await?
            .into_inner())
    }

    /// A producer on `pchannel`. It connects lazily, on the first send.
    pub fn producer(&self, pchannel: &str, options: ProducerOptions) -> Producer {
        Producer::start(self.grpc.clone(), pchannel.to_owned(), options)
    }

    /// The collections API (create, describe, insert, delete, flush, ...).
    pub fn collections(&self) -> Collections {
        Collections::new(self.clone(), self.channel.clone(), self.auth.clone())
    }

    /// A consumer of `pchannel`. It connects lazily, on the first `next`.
    pub fn consumer(&self, pchannel: &str, options: ConsumerOptions) -> Consumer {
        Consumer::start(self.grpc.clone(), pchannel.to_owned(), options)
    }
}
