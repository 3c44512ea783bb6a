//! The WAL storage contract.
//!
//! A backend stores, per pchannel, one log of opaque records. The streaming node gives every
//! record its meaning (header, tick); the backend gives it a place and durability.
//!
//! # Contract
//!
//! * **Open under a term.** [`WalStorage::open`] opens a pchannel for writing under a term. A
//!   term lower than the highest one the storage has seen for that pchannel is refused with
//!   [`WalError::Fenced`]. Opening under a higher term fences every handle of a lower term: its
//!   later appends fail with [`WalError::Fenced`] and write nothing.
//! * **Ids in call order.** [`Wal::append`] enqueues the record when it is *called*, not when
//!   the returned future is polled; records get dense, strictly increasing ids in the order of
//!   the calls on one handle. This is what lets the streaming node allocate a time tick and
//!   enqueue under one lock, so that id order equals tick order.
//! * **Acknowledged means durable.** The future resolves with the id only after the record is
//!   durable (survives a process crash and, for disk backends, power loss). If it resolves with
//!   an error, the record is either wholly present after recovery or wholly absent.
//! * **Failure is sticky.** After a storage error the handle fails every later append; the
//!   caller reopens the pchannel (which recovers the log) to go on.
//! * **Reads see only durable records**, in id order. [`WalReader::next`] returns `Ok(None)`
//!   once it has reached the durable end as of that call; calling again later returns newer
//!   records.
//! * **Truncation** removes records below an id. Reading from a truncated position is
//!   [`WalError::Truncated`], never a silent skip. Ids never restart after truncation or
//!   reopening.

mod error;
pub mod memory;
pub mod record;

#[cfg(feature = "conformance")]
pub mod conformance;

use std::{fmt::Debug, sync::Arc};

use bytes::Bytes;
use futures::future::BoxFuture;
use walden_common::{MessageId, Term};

pub use error::WalError;

/// Where a reader starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadFrom {
    /// The first retained record.
    Earliest,
    /// The durable end: only records appended from now on.
    Latest,
    /// The record with this id (inclusive).
    At(MessageId),
    /// The record after this id (exclusive).
    After(MessageId),
}

/// A WAL storage backend: the factory of per-pchannel logs.
pub trait WalStorage: Send + Sync + Debug {
    /// A short name for logs and metrics (`local`, `memory`, ...).
    fn name(&self) -> &'static str;

    /// Opens `pchannel` for writing under `term`, recovering it if it exists and creating it
    /// otherwise.
    fn open<'a>(
        &'a self,
        pchannel: &'a str,
        term: Term,
    ) -> BoxFuture<'a, Result<Arc<dyn Wal>, WalError>>;

    /// Durability barriers issued for every pchannel together, where the backend shares them
    /// between pchannels (then each [`Wal::sync_count`] counts the barriers that carried its
    /// records, and their sum overcounts). `None` where barriers are per pchannel.
    fn sync_count(&self) -> Option<u64> {
        None
    }
}

/// One open pchannel log.
pub trait Wal: Send + Sync + Debug {
    fn pchannel(&self) -> &str;

    fn term(&self) -> Term;

    /// Enqueues `record` now and resolves once it is durable. See the crate contract.
    fn append(&self, record: Bytes) -> BoxFuture<'static, Result<MessageId, WalError>>;

    /// The id the next call to [`Wal::append`] will get: a lower bound on the id of any append
    /// that starts after this call.
    fn next_id(&self) -> MessageId;

    /// The first retained id (everything below was truncated).
    fn first_id(&self) -> MessageId;

    /// One past the last durable id.
    fn durable_end(&self) -> MessageId;

    /// Bytes the log occupies in storage.
    fn size_bytes(&self) -> u64;

    /// Durability barriers (`fdatasync` or the backend's equivalent) issued by this handle, for
    /// metrics; 0 where the backend cannot count them.
    fn sync_count(&self) -> u64 {
        0
    }

    /// Whether an append would be taken now: [`WalError::NoSpace`] when the storage is (nearly)
    /// full. Callers check it before they give a message its place, so a refusal changes
    /// nothing; it clears by itself once space is freed.
    fn writable(&self) -> Result<(), WalError> {
        Ok(())
    }

    /// Id ranges whose records are damaged (and which were not skipped): reading into one
    /// fails with CORRUPTED; everything outside them reads.
    fn damaged(&self) -> Vec<std::ops::Range<MessageId>> {
        Vec::new()
    }

    /// A reader positioned at `from`.
    fn read(&self, from: ReadFrom) -> Result<Box<dyn WalReader>, WalError>;

    /// Drops records with ids below `below` (at the granularity the backend can).
    fn truncate(&self, below: MessageId) -> BoxFuture<'_, Result<(), WalError>>;

    /// Stops the writer once everything enqueued is durable.
    fn close(&self) -> BoxFuture<'_, Result<(), WalError>>;
}

/// A cursor over one pchannel's durable records.
pub trait WalReader: Send + Debug {
    /// The next durable record, or `None` at the durable end (call again later for more).
    fn next(&mut self) -> BoxFuture<'_, Result<Option<(MessageId, Bytes)>, WalError>>;
}
