//! The zero-disk WAL: every pchannel's log lives in object storage, so a node's disk holds
//! nothing that must survive and a pchannel can move to any node that reaches the store.
//!
//! # Layout
//!
//! A pchannel's log is a run of *segments*; a segment is a run of *fragment* objects numbered
//! densely from 0, each holding many records behind a small header ([`format`]; keys in
//! [`keys`]; both in `docs/design.md` §3.4). One *marker* object per segment names its first id,
//! so an open lists the markers and the active segment only, never the whole history. A sealed
//! segment has a *manifest* listing each fragment's record count and size.
//!
//! # Writing
//!
//! Appends are grouped into fragments (cut at `fragment_bytes`, or once a record has waited
//! `flush_interval` while an upload slot is free) and uploaded with up to
//! `max_uploads_in_flight` at once. An append is acknowledged only when its fragment and every
//! earlier one are durable, so acknowledgement order is id order whatever order the uploads
//! finish in ([`writer`]).
//!
//! # Fencing, on the store alone
//!
//! Every object is created with create-if-absent, never overwritten. A writer that opens a
//! pchannel claims an epoch above every earlier claim (and at least its term), then writes a
//! *fence* at the next fragment key of the segment the previous writer was filling, seals that
//! segment and starts a new one ([`recover`]). The previous writer's next upload meets the
//! fence, fails, and it reports [`WalError::Superseded`]. Nothing here reads a clock or a
//! metastore, so this holds for writers with separate metastores and disagreeing clocks. An
//! upload whose response was lost is resolved by reading its key back.

pub mod format;
pub mod keys;
mod reader;
mod recover;
mod writer;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard, Weak},
    time::Duration,
};

use bytes::Bytes;
use futures::{FutureExt, future::BoxFuture};
use tokio::sync::{Notify, oneshot};
use walden_common::{MessageId, Term, validate_channel_name};
use walden_object_store::{Blobs, ObjectStoreError};
use walden_wal_api::{ReadFrom, Wal, WalError, WalReader, WalStorage, record::MAX_RECORD_LEN};

use crate::keys::Keys;

/// Settings of the object-storage WAL (`[wal_object]`; defaults beside each field).
#[derive(Clone, Debug)]
pub struct ObjectWalConfig {
    /// A fragment is cut once its records reach this many bytes. Default 4 MiB.
    pub fragment_bytes: usize,
    /// Longest a record waits for others to share its fragment while an upload slot is free.
    /// 0 (the default) uploads at once; a larger value trades latency for fewer PUTs.
    pub flush_interval: Duration,
    /// Fragment uploads in flight at once. Default 8.
    pub max_uploads_in_flight: usize,
    /// A segment is sealed once it holds this many bytes. Default 256 MiB.
    pub segment_bytes: u64,
    /// ... or this many fragments (bounds a manifest's size). Default 4096.
    pub segment_max_fragments: u32,
    /// ... or is this old (so truncation can free space on an idle pchannel). Default 10 min.
    pub segment_max_age: Duration,
    /// Fragments a catch-up reader fetches ahead, in parallel. Default 8.
    pub read_ahead: usize,
}

impl Default for ObjectWalConfig {
    fn default() -> Self {
        Self {
            fragment_bytes: 4 << 20,
            flush_interval: Duration::ZERO,
            max_uploads_in_flight: 8,
            segment_bytes: 256 << 20,
            segment_max_fragments: 4096,
            segment_max_age: Duration::from_secs(600),
            read_ahead: 8,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A store failure as the WAL reports it.
pub(crate) fn unavailable(pchannel: &str, context: &str, e: &ObjectStoreError) -> WalError {
    WalError::Unavailable {
        pchannel: pchannel.to_owned(),
        context: context.to_owned(),
        detail: e.to_string(),
    }
}

pub(crate) fn corrupted(pchannel: &str, location: &str, detail: impl Into<String>) -> WalError {
    WalError::Corrupted {
        pchannel: pchannel.to_owned(),
        location: location.to_owned(),
        detail: detail.into(),
    }
}

/// WAL storage in an object store (any [`Blobs`]).
#[derive(Debug)]
pub struct ObjectWalStorage {
    blobs: Arc<dyn Blobs>,
    config: ObjectWalConfig,
    /// Handles this storage opened: a newer open in this process stops an older one at once
    /// (the store's fence would stop it at its next upload anyway).
    open: Mutex<HashMap<String, Weak<Shared>>>,
}

impl ObjectWalStorage {
    pub fn new(blobs: Arc<dyn Blobs>, config: ObjectWalConfig) -> Self {
        Self {
            blobs,
            config,
            open: Mutex::new(HashMap::new()),
        }
    }
}

impl WalStorage for ObjectWalStorage {
    fn name(&self) -> &'static str {
        "object"
    }

    fn open<'a>(
        &'a self,
        pchannel: &'a str,
        term: Term,
    ) -> BoxFuture<'a, Result<Arc<dyn Wal>, WalError>> {
        async move {
            validate_channel_name(pchannel).map_err(WalError::InvalidArgument)?;
            let keys = Keys::new(pchannel);
            let r = recover::open(&*self.blobs, &keys, pchannel, term).await?;
            let shared = Arc::new(Shared {
                pchannel: pchannel.to_owned(),
                keys,
                blobs: self.blobs.clone(),
                config: self.config.clone(),
                term,
                epoch: r.epoch,
                st: Mutex::new(State::new(&r)),
                wake: Notify::new(),
                uploads: Default::default(),
            });
            if let Some(prev) = lock(&self.open)
                .insert(pchannel.to_owned(), Arc::downgrade(&shared))
                .and_then(|w| w.upgrade())
            {
                prev.fail(WalError::Fenced {
                    pchannel: pchannel.to_owned(),
                    term: prev.term,
                    current: term,
                });
            }
            let task = tokio::spawn(writer::run(shared.clone()));
            Ok(Arc::new(ObjectWal {
                shared,
                task: tokio::sync::Mutex::new(Some(task)),
            }) as Arc<dyn Wal>)
        }
        .boxed()
    }
}

pub(crate) type Ack = oneshot::Sender<Result<MessageId, WalError>>;

/// One fragment's place, for readers.
#[derive(Clone, Copy, Debug)]
pub(crate) struct FragLoc {
    pub seg: u64,
    pub frag: u64,
    pub first: u64,
    pub count: u32,
}

/// A segment as the handle knows it.
#[derive(Debug)]
pub(crate) struct Seg {
    pub no: u64,
    pub first: u64,
    /// `(first id, count)` of each durable fragment, in order.
    pub frags: Vec<(u64, u32)>,
    pub bytes: u64,
}

impl Seg {
    pub fn end(&self) -> u64 {
        self.frags
            .last()
            .map_or(self.first, |(f, c)| f + u64::from(*c))
    }
}

#[derive(Debug)]
pub(crate) struct State {
    /// Id the next append gets.
    pub next_id: u64,
    /// Appends not yet cut into a fragment: ids `next_id - pending.len() ..`.
    pub pending: std::collections::VecDeque<(Bytes, Ack)>,
    pub pending_bytes: usize,
    pub pending_since: Option<tokio::time::Instant>,
    /// Retained segments, ascending; the last is the one being written.
    pub segs: std::collections::VecDeque<Seg>,
    pub durable_end: u64,
    /// Why the handle stopped (sticky); every later append fails with it.
    pub failed: Option<String>,
    pub fail_error: Option<FailKind>,
    pub closing: bool,
}

/// What a failed handle answers appends with (`WalError` is not `Clone`).
#[derive(Clone, Debug)]
pub(crate) enum FailKind {
    Fenced { term: Term, current: Term },
    Superseded { epoch: u64, by_epoch: u64 },
    Corrupted { location: String, detail: String },
    Unavailable { context: String, detail: String },
    Other,
}

impl State {
    fn new(r: &recover::Recovered) -> Self {
        Self {
            next_id: r.end,
            pending: Default::default(),
            pending_bytes: 0,
            pending_since: None,
            segs: r
                .segs
                .iter()
                .map(|s| Seg {
                    no: s.no,
                    first: s.first,
                    frags: s.frags.clone(),
                    bytes: s.bytes,
                })
                .collect(),
            durable_end: r.end,
            failed: None,
            fail_error: None,
            closing: false,
        }
    }

    pub fn first_id(&self) -> u64 {
        self.segs.front().map_or(self.durable_end, |s| s.first)
    }
}

/// What the handle, its writer task and its readers share.
#[derive(Debug)]
pub(crate) struct Shared {
    pub pchannel: String,
    pub keys: Keys,
    pub blobs: Arc<dyn Blobs>,
    pub config: ObjectWalConfig,
    pub term: Term,
    pub epoch: u64,
    pub st: Mutex<State>,
    /// Wakes the writer task: new appends, closing, failure.
    pub wake: Notify,
    /// Fragments this handle made durable: its durability barriers.
    pub uploads: std::sync::atomic::AtomicU64,
}

impl Shared {
    pub fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.st)
    }

    /// The error a failed handle answers with.
    pub fn error(&self, st: &State) -> WalError {
        let pchannel = self.pchannel.clone();
        match st.fail_error.clone() {
            Some(FailKind::Fenced { term, current }) => WalError::Fenced {
                pchannel,
                term,
                current,
            },
            Some(FailKind::Superseded { epoch, by_epoch }) => WalError::Superseded {
                pchannel,
                epoch,
                by_epoch,
            },
            Some(FailKind::Corrupted { location, detail }) => WalError::Corrupted {
                pchannel,
                location,
                detail,
            },
            Some(FailKind::Unavailable { context, detail }) => WalError::Unavailable {
                pchannel,
                context,
                detail,
            },
            _ => WalError::Closed {
                pchannel,
                reason: st.failed.clone().unwrap_or_else(|| "closed".into()),
            },
        }
    }

    /// Stops the handle for good: pending appends fail with `e`, and so does every later one.
    pub fn fail(&self, e: WalError) {
        let pending = {
            let mut st = self.lock();
            if st.failed.is_none() {
                st.failed = Some(e.to_string());
                st.fail_error = Some(match &e {
                    WalError::Fenced { term, current, .. } => FailKind::Fenced {
                        term: *term,
                        current: *current,
                    },
                    WalError::Superseded {
                        epoch, by_epoch, ..
                    } => FailKind::Superseded {
                        epoch: *epoch,
                        by_epoch: *by_epoch,
                    },
                    WalError::Corrupted {
                        location, detail, ..
                    } => FailKind::Corrupted {
                        location: location.clone(),
                        detail: detail.clone(),
                    },
                    WalError::Unavailable {
                        context, detail, ..
                    } => FailKind::Unavailable {
                        context: context.clone(),
                        detail: detail.clone(),
                    },
                    _ => FailKind::Other,
                });
                tracing::warn!(pchannel = %self.pchannel, error = %e, "object WAL handle stopped");
            }
            st.pending_bytes = 0;
            std::mem::take(&mut st.pending)
        };
        for (_, ack) in pending {
            let _ = ack.send(Err(self.error(&self.lock())));
        }
        self.wake.notify_one();
    }
}

/// One open pchannel log in object storage.
#[derive(Debug)]
struct ObjectWal {
    shared: Arc<Shared>,
    task: tokio::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Drop for ObjectWal {
    /// The writer task finishes what is queued and stops.
    fn drop(&mut self) {
        self.shared.lock().closing = true;
        self.shared.wake.notify_one();
    }
}

impl Wal for ObjectWal {
    fn pchannel(&self) -> &str {
        &self.shared.pchannel
    }

    fn term(&self) -> Term {
        self.shared.term
    }

    fn append(&self, record: Bytes) -> BoxFuture<'static, Result<MessageId, WalError>> {
        let (tx, rx) = oneshot::channel();
        let refused = {
            let mut st = self.shared.lock();
            if record.len() > MAX_RECORD_LEN {
                Some(WalError::TooLarge {
                    size: record.len(),
                    limit: MAX_RECORD_LEN,
                })
            } else if st.failed.is_some() || st.closing {
                Some(self.shared.error(&st))
            } else {
                st.next_id += 1;
                st.pending_bytes += record.len();
                if st.pending_since.is_none() {
                    st.pending_since = Some(tokio::time::Instant::now());
                }
                st.pending.push_back((record, tx));
                None
            }
        };
        if let Some(e) = refused {
            return futures::future::ready(Err(e)).boxed();
        }
        self.shared.wake.notify_one();
        let pchannel = self.shared.pchannel.clone();
        async move {
            rx.await.unwrap_or_else(|_| {
                Err(WalError::Closed {
                    pchannel,
                    reason: "the writer stopped".into(),
                })
            })
        }
        .boxed()
    }

    fn next_id(&self) -> MessageId {
        MessageId(self.shared.lock().next_id)
    }

    fn first_id(&self) -> MessageId {
        MessageId(self.shared.lock().first_id())
    }

    fn durable_end(&self) -> MessageId {
        MessageId(self.shared.lock().durable_end)
    }

    /// Fragment uploads: each is one durability barrier for the records in it.
    fn sync_count(&self) -> u64 {
        self.shared
            .uploads
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    fn size_bytes(&self) -> u64 {
        self.shared.lock().segs.iter().map(|s| s.bytes).sum()
    }

    fn read(&self, from: ReadFrom) -> Result<Box<dyn WalReader>, WalError> {
        reader::ObjectReader::open(self.shared.clone(), from).map(|r| Box::new(r) as _)
    }

    fn truncate(&self, below: MessageId) -> BoxFuture<'_, Result<(), WalError>> {
        recover::truncate(self.shared.clone(), below.0).boxed()
    }

    fn close(&self) -> BoxFuture<'_, Result<(), WalError>> {
        async move {
            self.shared.lock().closing = true;
            self.shared.wake.notify_one();
            if let Some(task) = self.task.lock().await.take() {
                let _ = task.await;
            }
            Ok(())
        }
        .boxed()
    }
}
