//! The streaming node: hosts pchannel WALs and serves produce, consume and status.
//!
//! * [`manager::WalManager`] opens each pchannel it is assigned under the term it is given,
//!   recovers it and serves it; [`assigner`] is standalone's assigner (the coordinator's job in
//!   one process).
//! * [`channel::Channel`] is one open pchannel: the append path (tick allocation and enqueue
//!   under one lock, so id order is tick order), the ack bookkeeping that makes messages
//!   visible strictly in tick order, TimeTick messages, and the write-ahead buffer.
//! * [`scanner`] delivers a pchannel's messages to a consumer: catching up from storage, then
//!   tailing the write-ahead buffer, falling back to storage when the buffer has moved on.
//! * [`service`] is the gRPC face of all this.

pub mod agent;
pub mod assigner;
pub mod channel;
pub mod config;
pub mod dedup;
pub mod manager;
pub mod metrics;
pub mod per_channel;
pub mod scanner;
pub mod service;
pub mod shard;
pub mod txn;
pub mod wab;

use thiserror::Error;
use walden_common::{ErrorCode, HasErrorCode, Term};
use walden_message::DecodeError;
use walden_metastore_api::MetaError;
use walden_wal_api::WalError;

pub use config::NodeConfig;

/// Errors of the streaming node, each with a stable code.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum NodeError {
    #[error("pchannel {0:?} is not served by this node")]
    ChannelNotFound(String),
    #[error("pchannel {pchannel}: term {requested} does not match the serving term {current}")]
    TermMismatch {
        pchannel: String,
        requested: Term,
        current: Term,
    },
    #[error("invalid request: {0}")]
    InvalidArgument(String),
    #[error("message of {size} bytes exceeds the limit of {limit} bytes (node.max_message_bytes)")]
    MessageTooLarge { size: usize, limit: usize },
    #[error("pchannel {0} is closing or being reopened")]
    ChannelClosed(String),
    /// Another writer took the pchannel's log over; this node does not reopen it.
    #[error("pchannel {pchannel} was taken over by another writer: {why}")]
    Fenced { pchannel: String, why: String },
    #[error("the node is shutting down")]
    ShuttingDown,
    #[error("{0}")]
    InvalidSequence(String),
    #[error(transparent)]
    Wal(#[from] WalError),
    #[error(transparent)]
    Meta(#[from] MetaError),
    #[error(transparent)]
    Tso(#[from] walden_tso::TsoError),
    #[error("stored message is malformed: {0}")]
    Decode(#[from] DecodeError),
    #[error("internal error: {0}")]
    Internal(String),
    #[error("collection not found: {0}")]
    CollectionNotFound(String),
    #[error("collection exists: {0}")]
    CollectionExists(String),
    #[error("{0}")]
    CollectionDropped(String),
    #[error("partition not found: {0}")]
    PartitionNotFound(String),
    #[error("partition exists: {0}")]
    PartitionExists(String),
    #[error("{0}")]
    SegmentSealed(String),
    #[error(transparent)]
    Schema(#[from] walden_schema::SchemaError),
    #[error("{0}")]
    TxnExpired(String),
    #[error(
        "transaction {txn} would hold {size} payload bytes, over node.txn_max_bytes ({limit}); \
         commit or roll back"
    )]
    TxnTooLarge { txn: u64, size: u64, limit: u64 },
}

impl HasErrorCode for NodeError {
    fn code(&self) -> ErrorCode {
        match self {
            Self::ChannelNotFound(_) => ErrorCode::ChannelNotFound,
            Self::TermMismatch { .. } => ErrorCode::ChannelFenced,
            Self::InvalidArgument(_) => ErrorCode::InvalidArgument,
            Self::MessageTooLarge { .. } => ErrorCode::MessageTooLarge,
            Self::ChannelClosed(_) => ErrorCode::StorageUnavailable,
            Self::Fenced { .. } => ErrorCode::ChannelFenced,
            Self::ShuttingDown => ErrorCode::OnShutdown,
            Self::InvalidSequence(_) => ErrorCode::InvalidRequestSequence,
            Self::Wal(e) => e.code(),
            Self::Meta(e) => e.code(),
            Self::Tso(e) => e.code(),
            Self::Decode(e) => e.code(),
            Self::Internal(_) => ErrorCode::Internal,
            Self::CollectionNotFound(_) => ErrorCode::CollectionNotFound,
            Self::CollectionExists(_) => ErrorCode::CollectionExists,
            Self::CollectionDropped(_) => ErrorCode::CollectionDropped,
            Self::PartitionNotFound(_) => ErrorCode::PartitionNotFound,
            Self::PartitionExists(_) => ErrorCode::PartitionExists,
            Self::SegmentSealed(_) => ErrorCode::SegmentSealed,
            Self::Schema(e) => e.code(),
            Self::TxnExpired(_) => ErrorCode::TxnExpired,
            Self::TxnTooLarge { .. } => ErrorCode::MessageTooLarge,
        }
    }
}

impl NodeError {
    /// The wire form.
    pub fn to_proto(&self) -> walden_proto::v1::Error {
        walden_proto::status::error(self.code(), self.to_string())
    }
}
