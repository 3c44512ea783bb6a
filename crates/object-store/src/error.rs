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
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
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
            _ if is_transient(&detail) => Self::Unavailable { op, key, detail },
            _ => Self::Other { op, key, detail },
        }
    }
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
        "503",
        "500",
        "502",
        "504",
        "slowdown",
        "retry",
    ]
    .iter()
    .any(|w| d.contains(w))
}
