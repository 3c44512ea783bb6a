//! The metadata store contract, shaped after etcd's v3 API so that an etcd backend is a thin
//! adapter: keys with revisions, prefix ranges, compare-and-swap transactions, prefix watches and
//! leases.
//!
//! # Contract
//!
//! * Every mutation bumps a store-wide **revision**; a key remembers the revision that created it
//!   (`create_revision`) and last changed it (`mod_revision`), and how often it changed
//!   (`version`). A deleted key's next creation starts over.
//! * A [`Txn`] evaluates all its comparisons atomically, then applies either its success or its
//!   failure operations, as one revision.
//! * A watch sees every change under its prefix made after it was created, in revision order.
//! * A key put with a lease is deleted when the lease expires or is revoked.

mod fenced;
pub mod keys;
mod memory;

#[cfg(feature = "conformance")]
pub mod conformance;

use std::{fmt::Debug, time::Duration};

use async_trait::async_trait;
use bytes::Bytes;
use thiserror::Error;
use tokio::sync::mpsc;
use walden_common::{ErrorCode, HasErrorCode};

pub use fenced::Fenced;
pub use memory::{MemoryMetaStore, Mutation, Persistence, Snapshot};

/// A store-wide revision number. Revisions start at 1.
pub type Revision = i64;
/// A lease id (never 0).
pub type LeaseId = i64;

/// A key and its value with its history counters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Bytes,
    pub create_revision: Revision,
    pub mod_revision: Revision,
    pub version: i64,
    pub lease: Option<LeaseId>,
}

/// What a comparison looks at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CompareTarget {
    /// 0 when the key does not exist.
    CreateRevision(Revision),
    /// 0 when the key does not exist.
    ModRevision(Revision),
    /// 0 when the key does not exist.
    Version(i64),
    /// A missing key never compares equal to a value.
    Value(Bytes),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompareOp {
    Equal,
    NotEqual,
    Less,
    Greater,
}

/// One condition of a transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Compare {
    pub key: String,
    pub op: CompareOp,
    pub target: CompareTarget,
}

impl Compare {
    /// The key does not exist (etcd's `create_revision == 0`).
    pub fn absent(key: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            op: CompareOp::Equal,
            target: CompareTarget::CreateRevision(0),
        }
    }

    /// The key was last changed at `rev` (0: the key does not exist).
    pub fn mod_revision(key: impl Into<String>, rev: Revision) -> Self {
        Self {
            key: key.into(),
            op: CompareOp::Equal,
            target: CompareTarget::ModRevision(rev),
        }
    }
}

/// One operation of a transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Put {
        key: String,
        value: Bytes,
        lease: Option<LeaseId>,
    },
    Delete {
        key: String,
    },
}

/// A compare-and-swap transaction.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Txn {
    pub compare: Vec<Compare>,
    pub success: Vec<Op>,
    pub failure: Vec<Op>,
}

/// Whether the comparisons held, and the store revision after the transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TxnResponse {
    pub succeeded: bool,
    pub revision: Revision,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    Put,
    Delete,
}

/// One change seen by a watch. For a delete, `kv.value` is empty and `kv.mod_revision` is the
/// revision of the delete.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchEvent {
    pub kind: EventKind,
    pub kv: KeyValue,
}

/// Receives the events of one watch; dropping it cancels the watch.
pub type WatchReceiver = mpsc::UnboundedReceiver<WatchEvent>;

#[derive(Debug, Error)]
#[non_exhaustive]
pub enum MetaError {
    #[error("metastore unavailable: {context}: {detail}")]
    Unavailable { context: String, detail: String },
    #[error("lease {0} not found (expired or revoked)")]
    LeaseNotFound(LeaseId),
    #[error("metastore data is corrupt: {0}")]
    Corrupted(String),
    #[error("invalid metastore request: {0}")]
    InvalidArgument(String),
    /// A fenced write whose fence no longer holds: a newer leader wrote `{0}`.
    #[error("write refused: the fence on {0} no longer holds (this writer was superseded)")]
    FenceLost(String),
}

impl HasErrorCode for MetaError {
    fn code(&self) -> ErrorCode {
        match self {
            Self::Unavailable { .. } => ErrorCode::StorageUnavailable,
            Self::LeaseNotFound(_) | Self::InvalidArgument(_) => ErrorCode::InvalidArgument,
            Self::Corrupted(_) => ErrorCode::Corrupted,
            Self::FenceLost(_) => ErrorCode::NotLeader,
        }
    }
}

pub type MetaResult<T> = Result<T, MetaError>;

/// Adds one to the decimal counter at `key` (absent: 0) with a compare-and-swap, and returns the
/// new value: each value is handed out once, however many callers race.
pub async fn increment(store: &dyn MetaStore, key: &str) -> MetaResult<u64> {
    loop {
        let (rev, value) = match store.get(key).await? {
            Some(kv) => {
                let v = std::str::from_utf8(&kv.value)
                    .ok()
                    .and_then(|s| s.parse::<u64>().ok())
                    .ok_or_else(|| MetaError::Corrupted(format!("{key} is not a number")))?;
                (kv.mod_revision, v)
            }
            None => (0, 0),
        };
        let next = value + 1;
        let resp = store
            .txn(Txn {
                compare: vec![Compare::mod_revision(key, rev)],
                success: vec![Op::Put {
                    key: key.to_owned(),
                    value: Bytes::from(next.to_string()),
                    lease: None,
                }],
                failure: vec![],
            })
            .await?;
        if resp.succeeded {
            return Ok(next);
        }
    }
}

/// An etcd-shaped metadata store.
#[async_trait]
pub trait MetaStore: Send + Sync + Debug {
    async fn get(&self, key: &str) -> MetaResult<Option<KeyValue>>;
    /// Every key that starts with `prefix`, in key order.
    async fn range(&self, prefix: &str) -> MetaResult<Vec<KeyValue>>;
    /// Puts `value`; returns the new revision.
    async fn put(&self, key: &str, value: Bytes, lease: Option<LeaseId>) -> MetaResult<Revision>;
    /// Deletes `key`; returns whether it existed.
    async fn delete(&self, key: &str) -> MetaResult<bool>;
    async fn txn(&self, txn: Txn) -> MetaResult<TxnResponse>;
    /// Like [`MetaStore::txn`], but the store may make it durable later, with a later write:
    /// after a crash it may be missing (never partly applied). For writes that only save work,
    /// such as checkpoints that the WAL can always replay past. By default, a durable `txn`.
    async fn txn_relaxed(&self, txn: Txn) -> MetaResult<TxnResponse> {
        self.txn(txn).await
    }
    /// Watches every key under `prefix` from now on.
    async fn watch(&self, prefix: &str) -> MetaResult<WatchReceiver>;
    /// Grants a lease that expires `ttl` after its last keep-alive.
    async fn grant_lease(&self, ttl: Duration) -> MetaResult<LeaseId>;
    async fn keep_alive(&self, lease: LeaseId) -> MetaResult<()>;
    /// Revokes a lease, deleting its keys.
    async fn revoke_lease(&self, lease: LeaseId) -> MetaResult<()>;
}
