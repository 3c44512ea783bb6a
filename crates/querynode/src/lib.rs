//! The query node (docs/design.md §14.6): a process of its own in a cluster
//! (`walden query-node`). It registers under a lease, holds the flushed segments the leader
//! coordinator's placement names it for (their Parquet files and delete logs, with the graph
//! index built), applies the deletes delegators forward, and searches the segments a delegator
//! names. Loading is shared with the standalone delegator, which holds flushed segments itself.

pub mod load;
mod node;
pub mod service;
pub mod wire;

use thiserror::Error;
use walden_common::{ErrorCode, HasErrorCode};
use walden_metastore_api::MetaError;
use walden_object_store::ObjectStoreError;
use walden_query::QueryError;

pub use node::{QueryNode, QueryNodeConfig};

/// Errors of a query node.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum QueryNodeError {
    #[error(transparent)]
    Meta(#[from] MetaError),
    #[error(transparent)]
    Store(#[from] ObjectStoreError),
    #[error(transparent)]
    Query(#[from] QueryError),
    #[error(transparent)]
    File(#[from] walden_segment_format::FormatError),
    #[error(transparent)]
    Schema(#[from] walden_schema::SchemaError),
    /// A record or payload that cannot be read.
    #[error("{0}")]
    Format(String),
    #[error("{0}")]
    InvalidArgument(String),
    /// The asker synced with another incarnation of this node, or names a segment it does not
    /// hold (moved, or not loaded yet): another replica may serve; retryable.
    #[error("{0}")]
    NotHeld(String),
}

impl HasErrorCode for QueryNodeError {
    fn code(&self) -> ErrorCode {
        match self {
            Self::Meta(e) => e.code(),
            Self::Store(e) => e.code(),
            Self::Query(e) => e.code(),
            Self::File(e) => e.code(),
            Self::Schema(e) => e.code(),
            Self::Format(_) => ErrorCode::Corrupted,
            Self::InvalidArgument(_) => ErrorCode::InvalidArgument,
            Self::NotHeld(_) => ErrorCode::Unavailable,
        }
    }
}

impl From<walden_expr::ExprError> for QueryNodeError {
    fn from(e: walden_expr::ExprError) -> Self {
        Self::Query(e.into())
    }
}
