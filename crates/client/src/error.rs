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
    /// The server does not offer this call (a coordinator asked for a node's status, say).
    #[error("not offered by this server: {0}")]
    Unsupported(String),
    /// A typed error from the node.
    #[error("{message} [{}]", code_name(*code))]
    Server {
        code: u32,
        message: String,
        retryable: bool,
    },
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// Refused before sending: the node would refuse it too, and sending it would buffer it.
    #[error("message of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    /// A write cut into several messages was not all acknowledged: the rows (or keys) in
    /// `not_written` were not written, those in `in_doubt` were sent but never acknowledged (they
    /// may be in the log or not), every other one was written.
    #[error(
        "{written} written, {} not written{}, {} in doubt: {cause}",
        not_written.len(),
        preview(not_written),
        in_doubt.len()
    )]
    PartialWrite {
        written: u64,
        /// Primary keys of the rows (or the keys of a delete) that were not written.
        not_written: Vec<String>,
        /// Primary keys sent in messages that were never acknowledged: they may be in the log.
        in_doubt: Vec<String>,
        cause: Box<ClientError>,
    },
    /// The message was sent, but the producer gave up before an answer came: it may be in the
    /// log or not (an idempotent producer's resend of it would be answered with the original
    /// result, not written twice).
    #[error("sent but not acknowledged, it may be in the log: {0}")]
    Unconfirmed(Box<ClientError>),
    #[error("the producer or consumer was closed")]
    Closed,
    /// The server's answer does not have the shape the protocol gives it.
    #[error("malformed answer from the server: {0}")]
    Protocol(String),
    #[error("gave up after retrying for {seconds:.1} s: {last}")]
    RetriesExhausted {
        seconds: f64,
        last: Box<ClientError>,
    },
}

/// The first few keys, for the error text (the full list is in the error): ` (keys …)`, or
/// nothing for none.
fn preview(keys: &[String]) -> String {
    const SHOW: usize = 10;
    if keys.is_empty() {
        return String::new();
    }
    let mut s = keys
        .iter()
        .take(SHOW)
        .map(|k| walden_common::quote_short(k))
        .collect::<Vec<_>>()
        .join(", ");
    if keys.len() > SHOW {
        s.push_str(&format!(", and {} more", keys.len() - SHOW));
    }
    format!(" (keys {s})")
}

fn code_name(code: u32) -> String {
    ErrorCode::from_u32(code).map_or_else(|| format!("code {code}"), |c| c.to_string())
}

pub(crate) use walden_common::error_chain as chain;

impl From<tonic::Status> for ClientError {
    /// A status whose details hold a typed error (what unary Walden calls return) becomes
    /// that error; any other status is a transport problem.
    fn from(s: tonic::Status) -> Self {
        use prost::Message as _;
        match walden_proto::v1::Error::decode(s.details()) {
            Ok(e) if e.code != 0 => e.into(),
            _ if s.code() == tonic::Code::Unauthenticated => Self::Server {
                code: ErrorCode::Unauthenticated.as_u32(),
                message: s.message().to_owned(),
                retryable: false,
            },
            _ if s.code() == tonic::Code::Unimplemented => {
                Self::Unsupported(format!("{}: {}", s.code(), s.message()))
            }
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
            Self::Connect { .. } | Self::Transport(_) => ErrorCode::Unavailable,
            Self::Server { code, .. } => ErrorCode::from_u32(*code).unwrap_or(ErrorCode::Internal),
            Self::InvalidArgument(_) | Self::Unsupported(_) => ErrorCode::InvalidArgument,
            Self::TooLarge { .. } => ErrorCode::MessageTooLarge,
            Self::Closed => ErrorCode::OnShutdown,
            Self::Protocol(_) => ErrorCode::Internal,
            Self::RetriesExhausted { last, .. } => last.code(),
            Self::PartialWrite { cause, .. } => cause.code(),
            Self::Unconfirmed(cause) => cause.code(),
        }
    }

    fn is_retryable(&self) -> bool {
        match self {
            Self::Connect { .. } | Self::Transport(_) => true,
            Self::Server { retryable, .. } => *retryable,
            Self::InvalidArgument(_)
            | Self::Unsupported(_)
            | Self::TooLarge { .. }
            | Self::Closed
            | Self::Protocol(_)
            | Self::RetriesExhausted { .. }
            | Self::PartialWrite { .. } => false,
            Self::Unconfirmed(cause) => cause.is_retryable(),
        }
    }
}
