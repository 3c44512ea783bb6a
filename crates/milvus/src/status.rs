//! Milvus's `common.Status` as pymilvus reads it: `code` (Milvus's error codes, `merr`), the
//! legacy `error_code` that older clients and some pymilvus paths still test (collection not
//! found is code 100 *and* `CollectionNotExists`: `has_collection` depends on both), `retriable`,
//! and a reason that names what is wrong.

// Milvus still sets the deprecated `error_code` next to `code`, and pymilvus reads it.
#![allow(deprecated)]

use walden_client::ClientError;
use walden_common::{ErrorCode, HasErrorCode};
use walden_milvus_proto::common::{ErrorCode as Legacy, Status};

/// The Milvus error codes Walden answers with (Milvus's `merr` numbering).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Code {
    Success = 0,
    ServiceUnavailable = 2,
    Internal = 5,
    CollectionNotFound = 100,
    CollectionNotLoaded = 101,
    IllegalSchema = 105,
    PartitionNotFound = 200,
    IndexNotFound = 700,
    IndexNotSupported = 701,
    DatabaseNotFound = 800,
    ParameterInvalid = 1100,
    AliasNotFound = 1600,
    AliasExists = 1602,
}

impl Code {
    /// The deprecated `error_code` Milvus still sets next to `code`.
    fn legacy(self) -> Legacy {
        match self {
            Self::Success => Legacy::Success,
            Self::CollectionNotFound => Legacy::CollectionNotExists,
            Self::IndexNotFound => Legacy::IndexNotExist,
            Self::ParameterInvalid | Self::IllegalSchema => Legacy::IllegalArgument,
            _ => Legacy::UnexpectedError,
        }
    }
}

/// Success.
pub fn ok() -> Status {
    Status {
        error_code: Legacy::Success as i32,
        code: Code::Success as i32,
        ..Status::default()
    }
}

/// A failure with `code` and the reason.
pub fn fail(code: Code, reason: impl Into<String>) -> Status {
    Status {
        error_code: code.legacy() as i32,
        reason: reason.into(),
        code: code as i32,
        retriable: matches!(code, Code::ServiceUnavailable),
        ..Status::default()
    }
}

/// Bad input: `ParameterInvalid` naming what is wrong.
pub fn invalid(reason: impl Into<String>) -> Status {
    fail(Code::ParameterInvalid, reason)
}

/// A collection that does not exist, as Milvus words it.
pub fn no_collection(name: &str) -> Status {
    fail(
        Code::CollectionNotFound,
        format!("can't find collection[database=default][collection={name}]"),
    )
}

/// What a Walden client error is in Milvus's terms; the reason keeps Walden's stable code name.
pub fn from_client(e: &ClientError) -> Status {
    let code = match e.code() {
        ErrorCode::CollectionNotFound | ErrorCode::CollectionDropped => Code::CollectionNotFound,
        ErrorCode::PartitionNotFound => Code::PartitionNotFound,
        ErrorCode::NotLoaded => Code::CollectionNotLoaded,
        ErrorCode::AliasNotFound => Code::AliasNotFound,
        ErrorCode::AliasExists => Code::AliasExists,
        ErrorCode::InvalidArgument
        | ErrorCode::SchemaMismatch
        | ErrorCode::CollectionExists
        | ErrorCode::PartitionExists
        | ErrorCode::MessageTooLarge => Code::ParameterInvalid,
        c if e.is_retryable() || c == ErrorCode::Unavailable => Code::ServiceUnavailable,
        _ => Code::Internal,
    };
    let mut s = fail(code, e.to_string());
    s.retriable = e.is_retryable();
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_collection_carries_both_codes_pymilvus_tests() {
        let s = no_collection("c");
        assert_eq!(s.code, 100);
        assert_eq!(s.error_code, Legacy::CollectionNotExists as i32);
        let s = from_client(&ClientError::Server {
            code: ErrorCode::CollectionNotFound.as_u32(),
            message: "collection \"c\" not found".into(),
            retryable: false,
        });
        assert_eq!((s.code, s.error_code), (100, 4));
        assert!(s.reason.contains("COLLECTION_NOT_FOUND"), "{}", s.reason);
        assert_eq!(ok().code, 0);
    }
}
