use thiserror::Error;
use walden_common::{ErrorCode, HasErrorCode};
use walden_metastore_api::MetaError;
use walden_object_store::ObjectStoreError;
use walden_streaming_node::NodeError;

/// Errors of the flusher. Each stops the pchannel's flusher, which starts again from the
/// manifests (nothing half done is visible: the manifest commit is the only commit point),
/// except [`FlushError::Superseded`], which means another owner took the pchannel.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum FlushError {
    #[error(transparent)]
    Node(#[from] NodeError),
    #[error(transparent)]
    Meta(#[from] MetaError),
    #[error(transparent)]
    Store(#[from] ObjectStoreError),
    /// The pchannel's term moved on: this flusher's writes are refused.
    #[error("pchannel {pchannel}: term {term} was superseded; the manifest was not changed")]
    Superseded { pchannel: String, term: u64 },
    /// A manifest changed under this flusher (only its own writes should change it).
    #[error("manifest of vchannel {0} changed under its flusher")]
    Conflict(String),
    /// A file could not be encoded or decoded (Parquet, Arrow) or a manifest is malformed.
    #[error("{0}")]
    Format(String),
    #[error(transparent)]
    Schema(#[from] walden_schema::SchemaError),
    #[error(transparent)]
    File(#[from] walden_segment_format::FormatError),
    #[error("vchannel {0:?} is not served by this node")]
    NotServed(String),
}

impl FlushError {
    /// Whether starting the flusher again (from the manifests) can help.
    pub fn is_retryable(&self) -> bool {
        !matches!(self, Self::Superseded { .. })
    }
}

impl HasErrorCode for FlushError {
    fn code(&self) -> ErrorCode {
        match self {
            Self::Node(e) => e.code(),
            Self::Meta(e) => e.code(),
            Self::Store(e) => e.code(),
            Self::Superseded { .. } => ErrorCode::ChannelFenced,
            Self::Conflict(_) => ErrorCode::ChannelFenced,
            Self::Format(_) => ErrorCode::Corrupted,
            Self::Schema(e) => e.code(),
            Self::File(e) => e.code(),
            Self::NotServed(_) => ErrorCode::ChannelNotFound,
        }
    }
}

pub(crate) fn format(what: &str, e: impl std::fmt::Display) -> FlushError {
    FlushError::Format(format!("{what}: {e}"))
}
