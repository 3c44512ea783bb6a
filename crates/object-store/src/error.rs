use thiserror::Error;
use walden_common::{ErrorCode, HasErrorCode};

/// What a call to the object store can fail with.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ObjectStoreError {
    /// A create-if-absent found the key taken. After a call that failed ambiguously and was
    /// retried, the object may be this caller's own: read it back to tell.
    #[error("object {key} already exists")]
    AlreadyExists { key: String },
    #[error("object {key} not found")]
    NotFound { key: String },
    /// The store could not be reached or answered with a transient failure (after retries).
    #[error("object store unavailable ({op} {key}): {detail}")]
    Unavailable {
        op: &'static str,
        key: String,
        detail: String,
    },
    /// Credentials are missing or refused.
    #[error("object store refused the credentials ({op} {key}): {detail}")]
    Denied {
        op: &'static str,
        key: String,
        detail: String,
    },
    /// The configuration cannot work; `key` is the setting to fix.
    #[error("{key}: {detail}")]
    Config { key: &'static str, detail: String },
    #[error("object store ({op} {key}): {detail}")]
    Other {
        op: &'static str,
        key: String,
        detail: String,
    },
}

impl HasErrorCode for ObjectStoreError {
    fn code(&self) -> ErrorCode {
        match self {
            Self::Unavailable { .. } => ErrorCode::StorageUnavailable,
            Self::Config { .. } => ErrorCode::InvalidArgument,
            Self::Denied { .. } => ErrorCode::Unauthenticated,
            Self::AlreadyExists { .. } | Self::NotFound { .. } | Self::Other { .. } => {
                ErrorCode::Internal
            }
        }
    }

    fn is_retryable(&self) -> bool {
        matches!(self, Self::Unavailable { .. })
    }
}

/// The text of an error and its sources, on one line.
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    // Servers put XML bodies in their errors: one line, whitespace folded.
    walden_common::error_chain(e)
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

impl ObjectStoreError {
    /// Classifies an `object_store` error of operation `op` on `key`.
    pub(crate) fn from_store(op: &'static str, key: &str, e: &object_store::Error) -> Self {
        use object_store::Error as E;
        let key = key.to_owned();
        let detail = chain(e);
        match e {
            E::AlreadyExists { .. } | E::Precondition { .. } => Self::AlreadyExists { key },
            E::NotFound { .. } => Self::NotFound { key },
            E::PermissionDenied { .. } | E::Unauthenticated { .. } => {
                Self::Denied { op, key, detail }
            }
            // S3 answers refused credentials with 403 and a code, which object_store passes on
            // as a generic error.
            _ if is_denied(&detail) => Self::Denied { op, key, detail },
            _ if is_transient(&detail) => Self::Unavailable { op, key, detail },
            _ => Self::Other { op, key, detail },
        }
    }
}

/// Whether an error's text says the credentials were refused.
fn is_denied(detail: &str) -> bool {
    [
        "403 Forbidden",
        "SignatureDoesNotMatch",
        "InvalidAccessKeyId",
        "AccessDenied",
        "401 Unauthorized",
    ]
    .iter()
    .any(|w| detail.contains(w))
}

/// Whether an error's text says the store was not reached or failed transiently.
fn is_transient(detail: &str) -> bool {
    let d = detail.to_ascii_lowercase();
    [
        "connect",
        "timed out",
        "timeout",
        "connection reset",
        "broken pipe",
        "dns",
        "server error",
        // `Server returned non-2xx status code: 503 Service Unavailable` (not a bare number:
        // ports and request ids contain digits too).
        "status code: 5",
        "slowdown",
        "retries",
    ]
    .iter()
    .any(|w| d.contains(w))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_transients_and_the_rest_are_told_apart_by_their_text() {
        assert!(is_denied(
            "Server returned non-2xx status code: 403 Forbidden: <Code>SignatureDoesNotMatch</Code>"
        ));
        assert!(is_transient(
            "Server returned non-2xx status code: 503 Service Unavailable"
        ));
        assert!(is_transient("error sending request: connection refused"));
        // Digits in a port or an id are not a status.
        assert!(!is_transient(
            "GET http://127.0.0.1:50213/b?x - status code: 404 Not Found"
        ));
        assert!(!is_denied(
            "GET http://127.0.0.1:40300/b - status code: 404 Not Found"
        ));
    }
}
