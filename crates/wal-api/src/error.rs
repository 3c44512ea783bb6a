use std::io;

use thiserror::Error;
use walden_common::{ErrorCode, HasErrorCode, MessageId, Term};

/// What a WAL backend can fail with.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum WalError {
    /// A writer of a newer term exists: this one may not write.
    #[error("pchannel {pchannel}: term {term} is fenced by term {current}")]
    Fenced {
        pchannel: String,
        term: Term,
        current: Term,
    },
    /// A newer writer took the pchannel's log over (on shared storage, where writers need not
    /// share a metastore, so epochs, not terms, order them): this one may not write.
    #[error(
        "pchannel {pchannel}: a newer writer (epoch {by_epoch}) took the log over from this one (epoch {epoch})"
    )]
    Superseded {
        pchannel: String,
        epoch: u64,
        by_epoch: u64,
    },
    /// Another process holds the pchannel open for writing.
    #[error("pchannel {pchannel} is locked by another writer ({path})")]
    Locked { pchannel: String, path: String },
    /// The position was truncated away.
    #[error("pchannel {pchannel}: id {requested} was truncated (first retained id is {first})")]
    Truncated {
        pchannel: String,
        requested: MessageId,
        first: MessageId,
    },
    /// An I/O failure; the handle is now failed and the pchannel must be reopened.
    #[error("pchannel {pchannel}: {context}: {source}")]
    Io {
        pchannel: String,
        context: String,
        #[source]
        source: io::Error,
    },
    /// Remote storage failed or could not be reached (after the backend's own retries); the
    /// handle is now failed and the pchannel must be reopened.
    #[error("pchannel {pchannel}: {context}: {detail}")]
    Unavailable {
        pchannel: String,
        context: String,
        detail: String,
    },
    /// Stored bytes are not what was written, somewhere other than a torn tail.
    #[error("pchannel {pchannel}: corruption in {location}: {detail}")]
    Corrupted {
        pchannel: String,
        location: String,
        detail: String,
    },
    /// The handle failed earlier or was closed; reopen the pchannel.
    #[error("pchannel {pchannel}: the WAL handle is closed ({reason})")]
    Closed { pchannel: String, reason: String },
    /// The record is larger than the backend accepts.
    #[error("record of {size} bytes exceeds the backend limit of {limit}")]
    TooLarge { size: usize, limit: usize },
    /// The storage is (nearly) full: appends are refused, nothing was written, and they are
    /// accepted again once space is freed. Reads go on.
    #[error("pchannel {pchannel}: {detail}")]
    NoSpace { pchannel: String, detail: String },
    /// A bad argument (e.g. an invalid pchannel name).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

impl WalError {
    pub fn io(pchannel: &str, context: impl Into<String>, source: io::Error) -> Self {
        Self::Io {
            pchannel: pchannel.to_owned(),
            context: context.into(),
            source,
        }
    }
}

impl HasErrorCode for WalError {
    fn code(&self) -> ErrorCode {
        match self {
            Self::Fenced { .. } | Self::Superseded { .. } | Self::Locked { .. } => {
                ErrorCode::ChannelFenced
            }
            Self::Truncated { .. } => ErrorCode::Truncated,
            Self::Io { .. } | Self::Unavailable { .. } | Self::Closed { .. } => {
                ErrorCode::StorageUnavailable
            }
            Self::Corrupted { .. } => ErrorCode::Corrupted,
            Self::TooLarge { .. } => ErrorCode::MessageTooLarge,
            Self::NoSpace { .. } => ErrorCode::ResourceExhausted,
            Self::InvalidArgument(_) => ErrorCode::InvalidArgument,
        }
    }
}
