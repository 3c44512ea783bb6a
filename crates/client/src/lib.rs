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

use tonic::transport::{Channel, Endpoint};
use walden_proto::v1::{StatusRequest, StatusResponse, streaming_node_client::StreamingNodeClient};

pub use collections::{Collections, WriteResult};
pub use consumer::{Consumer, ConsumerOptions, DeliverFrom};
pub use error::ClientError;
pub use producer::{AppendResult, DEFAULT_MAX_MESSAGE_BYTES, Producer, ProducerOptions};
pub use txn::Txn;

/// A connection to a Walden node. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Client {
    grpc: StreamingNodeClient<Channel>,
    channel: Channel,
    addr: String,
}

impl Client {
    /// Connects to `addr` (`http://host:port`, or `host:port`).
    pub async fn connect(addr: &str) -> Result<Self, ClientError> {
        let url = if addr.contains("://") {
            addr.to_owned()
        } else {
            format!("http://{addr}")
        };
        let endpoint = Endpoint::from_shared(url.clone())
            .map_err(|e| ClientError::InvalidArgument(format!("address {addr:?}: {e}")))?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10));
        let channel = endpoint.connect().await.map_err(|e| ClientError::Connect {
            addr: url.clone(),
            detail: error::chain(&e),
        })?;
        Ok(Self {
            channel: channel.clone(),
            grpc: StreamingNodeClient::new(channel)
                .max_decoding_message_size(256 << 20)
                .max_encoding_message_size(256 << 20),
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
        Collections::new(self.clone(), self.channel.clone())
    }

    /// A consumer of `pchannel`. It connects lazily, on the first `next`.
    pub fn consumer(&self, pchannel: &str, options: ConsumerOptions) -> Consumer {
        Consumer::start(self.grpc.clone(), pchannel.to_owned(), options)
    }
}
