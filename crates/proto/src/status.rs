//! Errors on the wire: the typed `walden.v1.Error` (stable code, retry hint), and the gRPC status
//! that carries it in its details for unary calls. Every service builds them here, so a code
//! maps to the same gRPC code and the same bounded text everywhere.

use prost::Message as _;
use tonic::Status;
use walden_common::ErrorCode;

use crate::v1;

/// Longest error text sent back: the text travels twice in HTTP/2 headers (grpc-message and the
/// details), where a 100 KB name once broke the stream.
pub const MAX_ERROR_MESSAGE: usize = 2048;

/// The typed error, its text bounded.
pub fn error(code: ErrorCode, message: String) -> v1::Error {
    v1::Error {
        code: code.as_u32(),
        message: walden_common::truncate_message(message, MAX_ERROR_MESSAGE),
        retryable: code.is_retryable(),
    }
}

/// The coarse gRPC code for a Walden code (clients read the typed error from the details).
pub fn grpc_code(code: ErrorCode) -> tonic::Code {
    match code {
        ErrorCode::CollectionNotFound
        | ErrorCode::PartitionNotFound
        | ErrorCode::ChannelNotFound => tonic::Code::NotFound,
        ErrorCode::CollectionExists | ErrorCode::PartitionExists => tonic::Code::AlreadyExists,
        ErrorCode::InvalidArgument | ErrorCode::SchemaMismatch | ErrorCode::MessageTooLarge => {
            tonic::Code::InvalidArgument
        }
        ErrorCode::Unauthenticated => tonic::Code::Unauthenticated,
        c if c.is_retryable() => tonic::Code::Unavailable,
        _ => tonic::Code::Internal,
    }
}

/// The status of a failed unary call: the coarse code, and the typed error in the details.
pub fn status(code: ErrorCode, message: String) -> Status {
    let detail = error(code, message);
    Status::with_details(
        grpc_code(code),
        detail.message.clone(),
        detail.encode_to_vec().into(),
    )
}

/// [`status`] for any error that knows its code.
pub fn of<E: walden_common::HasErrorCode + std::fmt::Display>(e: &E) -> Status {
    status(e.code(), e.to_string())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn the_details_carry_the_code_and_retry_hint_and_the_text_is_bounded() {
        let s = status(ErrorCode::NotLeader, "x".repeat(100_000));
        assert_eq!(s.code(), tonic::Code::Unavailable);
        let e = v1::Error::decode(s.details()).unwrap();
        assert_eq!(e.code, ErrorCode::NotLeader.as_u32());
        assert!(e.retryable);
        assert!(e.message.len() <= MAX_ERROR_MESSAGE && s.message().len() <= MAX_ERROR_MESSAGE);
        assert_eq!(grpc_code(ErrorCode::ChannelNotFound), tonic::Code::NotFound);
        assert_eq!(grpc_code(ErrorCode::Corrupted), tonic::Code::Internal);
    }
}
