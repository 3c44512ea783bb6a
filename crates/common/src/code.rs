//! Stable error codes. They cross the wire and appear in logs and scripts, so a number never
//! changes meaning and a retired number is never reused.

use std::fmt;

/// Every error that leaves a Walden process carries one of these codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorCode {
    /// The pchannel is not served here.
    ChannelNotFound = 1,
    /// The caller's term is older (or newer) than the one the WAL holds: its owner moved.
    ChannelFenced = 2,
    /// The node is shutting down; retry against the new owner.
    OnShutdown = 3,
    /// The request is malformed (bad field, unknown type, missing value).
    InvalidArgument = 4,
    /// The message is larger than the configured limit.
    MessageTooLarge = 5,
    /// The WAL storage failed (I/O); the channel is reopened and a retry may succeed.
    StorageUnavailable = 6,
    /// The requested position was truncated away.
    Truncated = 7,
    /// Too much is in flight; back off and retry.
    ResourceExhausted = 8,
    /// The stored data is corrupt; a retry cannot help.
    Corrupted = 9,
    /// A bug or an unexpected state.
    Internal = 10,
    /// The request protocol was not followed (e.g. produce before open).
    InvalidRequestSequence = 11,
    /// The vchannel or collection does not exist (not yet created, or unknown).
    CollectionNotFound = 12,
    /// A collection with that name (or that vchannel's collection) already exists.
    CollectionExists = 13,
    /// The collection was dropped: nothing more can be written to it.
    CollectionDropped = 14,
    /// The partition does not exist in the collection (never created, or dropped).
    PartitionNotFound = 15,
    /// The partition already exists.
    PartitionExists = 16,
    /// The named segment is sealed (flushed): no more rows go into it.
    SegmentSealed = 17,
    /// Rows do not match the collection's schema (type, dimension, missing primary key).
    SchemaMismatch = 18,
    /// The transaction expired, was rolled back (by a DDL, a restart or the client) or is
    /// unknown: start a new one.
    TxnExpired = 19,
    /// The client could not reach the server (connection refused, reset, timed out); a retry
    /// may help once it is back.
    Unavailable = 20,
    /// The call carried no valid bearer token.
    Unauthenticated = 21,
    /// This coordinator is a standby: the leader (named in the message, when known) does this;
    /// retry there, or here once a leader is elected.
    NotLeader = 22,
    /// A read's consistency level needs data the shard has not read yet, and it did not catch
    /// up within `query.max_wait_ms`; retry later or with a weaker level.
    LagTooLarge = 23,
    /// The collection is released: reads need `walden collection load` first.
    NotLoaded = 24,
    /// No collection has this alias.
    AliasNotFound = 25,
    /// The name is taken: an alias of another collection, or an alias where a collection name
    /// is wanted (and the reverse).
    AliasExists = 26,
}

impl ErrorCode {
    /// The stable number of this code.
    pub fn as_u32(self) -> u32 {
        self as u32
    }

    /// The code for a number, or `None` for a number this version does not know.
    pub fn from_u32(n: u32) -> Option<Self> {
        Some(match n {
            1 => Self::ChannelNotFound,
            2 => Self::ChannelFenced,
            3 => Self::OnShutdown,
            4 => Self::InvalidArgument,
            5 => Self::MessageTooLarge,
            6 => Self::StorageUnavailable,
            7 => Self::Truncated,
            8 => Self::ResourceExhausted,
            9 => Self::Corrupted,
            10 => Self::Internal,
            11 => Self::InvalidRequestSequence,
            12 => Self::CollectionNotFound,
            13 => Self::CollectionExists,
            14 => Self::CollectionDropped,
            15 => Self::PartitionNotFound,
            16 => Self::PartitionExists,
            17 => Self::SegmentSealed,
            18 => Self::SchemaMismatch,
            19 => Self::TxnExpired,
            20 => Self::Unavailable,
            21 => Self::Unauthenticated,
            22 => Self::NotLeader,
            23 => Self::LagTooLarge,
            24 => Self::NotLoaded,
            25 => Self::AliasNotFound,
            26 => Self::AliasExists,
            _ => return None,
        })
    }

    /// The upper-snake name used in JSON output and docs.
    pub fn name(self) -> &'static str {
        match self {
            Self::ChannelNotFound => "CHANNEL_NOT_FOUND",
            Self::ChannelFenced => "CHANNEL_FENCED",
            Self::OnShutdown => "ON_SHUTDOWN",
            Self::InvalidArgument => "INVALID_ARGUMENT",
            Self::MessageTooLarge => "MESSAGE_TOO_LARGE",
            Self::StorageUnavailable => "STORAGE_UNAVAILABLE",
            Self::Truncated => "TRUNCATED",
            Self::ResourceExhausted => "RESOURCE_EXHAUSTED",
            Self::Corrupted => "CORRUPTED",
            Self::Internal => "INTERNAL",
            Self::InvalidRequestSequence => "INVALID_REQUEST_SEQUENCE",
            Self::CollectionNotFound => "COLLECTION_NOT_FOUND",
            Self::CollectionExists => "COLLECTION_EXISTS",
            Self::CollectionDropped => "COLLECTION_DROPPED",
            Self::PartitionNotFound => "PARTITION_NOT_FOUND",
            Self::PartitionExists => "PARTITION_EXISTS",
            Self::SegmentSealed => "SEGMENT_SEALED",
            Self::SchemaMismatch => "SCHEMA_MISMATCH",
            Self::TxnExpired => "TXN_EXPIRED",
            Self::Unavailable => "UNAVAILABLE",
            Self::Unauthenticated => "UNAUTHENTICATED",
            Self::NotLeader => "NOT_LEADER",
            Self::LagTooLarge => "LAG_TOO_LARGE",
            Self::NotLoaded => "NOT_LOADED",
            Self::AliasNotFound => "ALIAS_NOT_FOUND",
            Self::AliasExists => "ALIAS_EXISTS",
        }
    }

    /// Whether the same request can succeed later (after backoff, or once the channel has a
    /// new owner). Bad input and corruption never get better by retrying.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            Self::ChannelFenced
                | Self::OnShutdown
                | Self::StorageUnavailable
                | Self::ResourceExhausted
                | Self::ChannelNotFound
                | Self::Unavailable
                | Self::NotLeader
                | Self::LagTooLarge
        )
    }

    /// Every code, for docs and tests.
    pub const ALL: [ErrorCode; 26] = [
        Self::ChannelNotFound,
        Self::ChannelFenced,
        Self::OnShutdown,
        Self::InvalidArgument,
        Self::MessageTooLarge,
        Self::StorageUnavailable,
        Self::Truncated,
        Self::ResourceExhausted,
        Self::Corrupted,
        Self::Internal,
        Self::InvalidRequestSequence,
        Self::CollectionNotFound,
        Self::CollectionExists,
        Self::CollectionDropped,
        Self::PartitionNotFound,
        Self::PartitionExists,
        Self::SegmentSealed,
        Self::SchemaMismatch,
        Self::TxnExpired,
        Self::Unavailable,
        Self::Unauthenticated,
        Self::NotLeader,
        Self::LagTooLarge,
        Self::NotLoaded,
        Self::AliasNotFound,
        Self::AliasExists,
    ];
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}({})", self.name(), self.as_u32())
    }
}

/// Errors of every layer say which stable code they map to.
pub trait HasErrorCode {
    /// The code that this error is reported with outside the process.
    fn code(&self) -> ErrorCode;
    /// Whether retrying can help; by default the code decides.
    fn is_retryable(&self) -> bool {
        self.code().is_retryable()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_round_trips_through_its_number_and_names_are_unique() {
        let mut names = std::collections::HashSet::new();
        for code in ErrorCode::ALL {
            assert_eq!(ErrorCode::from_u32(code.as_u32()), Some(code));
            assert!(names.insert(code.name()));
        }
        assert_eq!(ErrorCode::from_u32(0), None);
        assert_eq!(ErrorCode::from_u32(999), None);
    }

    #[test]
    fn bad_input_is_never_retryable() {
        assert!(!ErrorCode::InvalidArgument.is_retryable());
        assert!(!ErrorCode::MessageTooLarge.is_retryable());
        assert!(!ErrorCode::Corrupted.is_retryable());
        assert!(ErrorCode::StorageUnavailable.is_retryable());
    }
}
