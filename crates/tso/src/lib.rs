//! The timestamp oracle: hybrid ticks (`physical_ms << 18 | logical`) that are never handed out
//! twice or backwards, across restarts, clock jumps and, in a cluster, leader changes.
//!
//! * [`Oracle`] hands ticks out of a window `[.., upper_ms)` whose upper bound is persisted in
//!   the metastore, by compare-and-swap, *before* any tick in it is used. A new oracle starts
//!   above every persisted bound; an oracle whose bound was moved by another (a newer leader)
//!   stops serving ([`TsoError::Superseded`]).
//! * [`TickSource`] is what a streaming node allocates from: synchronously (under a channel's
//!   append lock), refilled asynchronously when it runs out. [`LocalTicks`] is an oracle in the
//!   same process (standalone); [`BatchedTicks`] fetches batches from a [`TickServer`] (the
//!   coordinator leader, in a cluster).

mod batched;
mod oracle;

use async_trait::async_trait;
use thiserror::Error;
use walden_common::{ErrorCode, HasErrorCode, TimeTick};
use walden_metastore_api::MetaError;

pub use batched::{BatchedTicks, TickServer};
pub use oracle::{LocalTicks, Oracle, now_ms};

/// The source ran out of ticks; call [`TickSource::refill`] and retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exhausted;

/// Errors of the oracle, each with a stable code.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum TsoError {
    #[error(transparent)]
    Meta(#[from] MetaError),
    /// Another oracle (a newer coordinator leader) persisted a bound; this one must stop.
    #[error("timestamp oracle superseded: another oracle moved {key} (this one no longer serves)")]
    Superseded { key: String },
    #[error("timestamp oracle: {0} is not a number")]
    Corrupted(String),
    /// The oracle serving a cluster could not be reached; a retry may succeed.
    #[error("timestamp oracle unavailable: {0}")]
    Unavailable(String),
    #[error("invalid timestamp request: {0}")]
    InvalidArgument(String),
}

impl HasErrorCode for TsoError {
    fn code(&self) -> ErrorCode {
        match self {
            Self::Meta(e) => e.code(),
            Self::Superseded { .. } | Self::Unavailable(_) => ErrorCode::StorageUnavailable,
            Self::Corrupted(_) => ErrorCode::Corrupted,
            Self::InvalidArgument(_) => ErrorCode::InvalidArgument,
        }
    }
}

/// Where a streaming node's channels get their ticks. Ticks from one source strictly increase.
#[async_trait]
pub trait TickSource: Send + Sync + std::fmt::Debug {
    /// The next tick, above every tick this source handed out before; never blocks.
    fn allocate(&self) -> Result<TimeTick, Exhausted>;
    /// Makes ticks available again after [`Exhausted`].
    async fn refill(&self) -> Result<(), TsoError>;
    /// Moves the source past `tick`, a tick found in a log that another writer (another node,
    /// or a process whose clock was ahead) wrote last: ticks keep rising across writers.
    async fn observe(&self, tick: TimeTick) -> Result<(), TsoError>;
    /// The last tick handed out.
    fn last(&self) -> TimeTick;
    /// The oracle behind this source when it is in this process (standalone), to hand out
    /// batches of ticks to others; `None` for a node that gets its ticks from a leader.
    fn server(&self) -> Option<&dyn TickServer> {
        None
    }
}
