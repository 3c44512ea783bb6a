use thiserror::Error;
use walden_common::{ErrorCode, HasErrorCode};

/// What a client call can fail with.
#[derive(Debug, Error, Clone)]
#[non_exhaustive]
pub enum ClientError {
    #[error("cannot connect to {addr}: {detail}")]
    Connect { addr: String, detail: String },
    #[error("transport: {0}")]
    Transport(String),
    /// A typed error from the node.
    #[error("{message} [{}]", code_name(*code))]
    Server {
        code: u32,
        message: String,
        retryable: bool,
    },
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("the producer or consumer was closed")]
    Closed,
    #[error("gave up after retrying for {seconds:.1} s: {last}")]
    RetriesExhausted {
        seconds: f64,
        last: Box<ClientError>,
    },
}

fn code_name(code: u32) -> String {
    ErrorCode::from_u32(code).map_or_else(|| format!("code {code}"), |c| c.to_string())
}

pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

impl From<tonic::Status> for ClientError {
    /// A status whose details hold a typed error (what unary Walden calls return) becomes
    /// that error; any other status is a transport problem.
    fn from(s: tonic::Status) -> Self {
        use prost::Message as _;
        match walden_proto::v1::Error::decode(s.details()) {
            Ok(e) if e.code != 0 => e.into(),
            _ => Self::Transport(format!("{}: {}", s.code(), s.message())),
        }
    }
}

impl From<walden_proto::v1::Error> for ClientError {
    fn from(e: walden_proto::v1::Error) -> Self {
        Self::Server {
            code: e.code,
            message: e.message,
            retryable: e.retryable,
        }
    }
}

impl HasErrorCode for ClientError {
    fn code(&self) -> ErrorCode {
        match self {
            Self::Connect { .. } | Self::Transport(_) => ErrorCode::StorageUnavailable,
            Self::Server { code, .. } => ErrorCode::from_u32(*code).unwrap_or(ErrorCode::Internal),
            Self::InvalidArgument(_) => ErrorCode::InvalidArgument,
            Self::Closed => ErrorCode::OnShutdown,
            Self::RetriesExhausted { last, .. } => last.code(),
        }
    }

    fn is_retryable(&self) -> bool {
        match self {
            Self::Connect { .. } | Self::Transport(_) => true,
            Self::Server { retryable, .. } => *retryable,
            Self::InvalidArgument(_) | Self::Closed | Self::RetriesExhausted { .. } => false,
        }
    }
}
