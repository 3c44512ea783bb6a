//! The local-disk WAL: Walden's standalone default, in two layouts.
//!
//! [`SharedLogStorage`] (the default) keeps every pchannel in one log with one group commit for
//! all of them; see [`shared`]. [`LocalWalStorage`], described here, keeps one log per pchannel:
//! one directory per pchannel holding segment files (format in [`format`] and
//! `docs/design.md`). One writer thread per open pchannel does group commit: it drains every
//! append queued while the previous batch was syncing, writes them with one `write` and one
//! `fdatasync`, and only then acknowledges each caller. An exclusive file lock keeps a second
//! process from opening the pchannel, and a `TERM` file refuses writers of an older term.
//!
//! Recovery on open scans only the active (last) segment: a torn tail (an incomplete or
//! damaged record with nothing valid after it) is cut off; a damaged record followed by valid
//! ones is corruption and the open fails. Sealed segments are checked record by record as they
//! are read.

pub mod check;
pub mod format;
pub mod fs;
mod open;
mod prepare;
pub mod ranges;
mod reader;
pub mod shared;
mod space;
mod writer;

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{
        Arc, Mutex, MutexGuard, Weak,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    thread,
};

use bytes::Bytes;
use futures::{FutureExt, future::BoxFuture};
use tokio::sync::oneshot;
use tracing::warn;
use walden_common::{MessageId, Term, validate_channel_name};
use walden_wal_api::{ReadFrom, Wal, WalError, WalReader, WalStorage};

use crate::{
    fs::{FileSystem, StdFs},
    open::open_blocking,
    reader::LocalReader,
};
pub use shared::SharedLogStorage;
use space::Space;
pub use space::{RESERVE_FILE, Reserve};

/// Settings of the local WAL.
#[derive(Clone, Debug)]
pub struct LocalWalConfig {
    /// A segment is sealed and a new one started once it would grow past this many bytes.
    /// Default 64 MiB.
    pub segment_bytes: u64,
    /// Most bytes written by one group commit. Default 4 MiB.
    pub max_batch_bytes: usize,
    /// Appends are refused (RESOURCE_EXHAUSTED) while fewer bytes than this are free on the
    /// WAL's file system, and pre-allocation never goes below it. Default 128 MiB.
    pub min_free_bytes: u64,
}

impl Default for LocalWalConfig {
    fn default() -> Self {
        Self {
            segment_bytes: 64 << 20,
            max_batch_bytes: 4 << 20,
            min_free_bytes: 128 << 20,
        }
    }
}

const TERM_FILE: &str = "TERM";
const LOCK_FILE: &str = "LOCK";
/// Bytes a reader fetches from a segment file at once.
const READ_CHUNK: usize = 1 << 20;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// WAL storage on a local directory: `root/<pchannel>/`.
#[derive(Debug)]
pub struct LocalWalStorage {
    root: PathBuf,
    fs: Arc<dyn FileSystem>,
    config: LocalWalConfig,
    /// Handles this storage opened, so a newer term can take over from an older one in-process.
    open: Mutex<HashMap<String, Weak<Inner>>>,
    space: Arc<Space>,
}

impl LocalWalStorage {
    /// Storage on the real file system under `root`.
    pub fn new(root: impl Into<PathBuf>, config: LocalWalConfig) -> Self {
        Self::with_fs(root, Arc::new(StdFs), config)
    }

    /// Storage on any [`FileSystem`] (tests use [`fs::FaultFs`]).
    pub fn with_fs(
        root: impl Into<PathBuf>,
        fs: Arc<dyn FileSystem>,
        config: LocalWalConfig,
    ) -> Self {
        let root = root.into();
        Self {
            space: Arc::new(Space::new(fs.clone(), root.clone(), config.min_free_bytes)),
            root,
            fs,
            config,
            open: Mutex::new(HashMap::new()),
        }
    }

    /// The directory holding `pchannel`'s files.
    pub fn pchannel_dir(&self, pchannel: &str) -> PathBuf {
        self.root.join(pchannel)
    }
}

impl WalStorage for LocalWalStorage {
    fn name(&self) -> &'static str {
        "local"
    }

    fn open<'a>(
        &'a self,
        pchannel: &'a str,
        term: Term,
    ) -> BoxFuture<'a, Result<Arc<dyn Wal>, WalError>> {
        async move {
            validate_channel_name(pchannel).map_err(WalError::InvalidArgument)?;
            let previous = lock(&self.open).get(pchannel).and_then(Weak::upgrade);
            if let Some(prev) = previous {
                if let Some(e) = open::stale_term(pchannel, term, prev.term) {
                    return Err(e);
                }
                // A newer term takes over: the old handle stops writing and frees the lock.
                prev.fenced_by.store(term.0, Ordering::SeqCst);
                let prev2 = prev.clone();
                tokio::task::spawn_blocking(move || prev2.stop_writer())
                    .await
                    .map_err(|e| WalError::Closed {
                        pchannel: pchannel.to_owned(),
                        reason: e.to_string(),
                    })?;
            }
            let dir = self.pchannel_dir(pchannel);
            let fs = self.fs.clone();
            let config = self.config.clone();
            let name = pchannel.to_owned();
            let inner =
                tokio::task::spawn_blocking(move || open_blocking(fs, dir, name, term, config))
                    .await
                    .map_err(|e| WalError::Closed {
                        pchannel: pchannel.to_owned(),
                        reason: e.to_string(),
                    })??;
            lock(&self.open).insert(pchannel.to_owned(), Arc::downgrade(&inner));
            Ok(Arc::new(LocalWal(inner, self.space.clone())) as Arc<dyn Wal>)
        }
        .boxed()
    }
}

/// What readers and the writer share.
#[derive(Debug)]
struct Inner {
    pchannel: String,
    dir: PathBuf,
    fs: Arc<dyn FileSystem>,
    term: Term,
    /// First ids of the segments, ascending; the last is the active one.
    segments: Mutex<Vec<u64>>,
    first_id: AtomicU64,
    durable_end: AtomicU64,
    size: AtomicU64,
    syncs: AtomicU64,
    /// The term that fenced this handle (0: not fenced).
    fenced_by: AtomicU64,
    queue: Mutex<Queue>,
    writer: Mutex<Option<thread::JoinHandle<()>>>,
}

#[derive(Debug)]
struct Queue {
    next_id: u64,
    /// `None` once the writer stopped.
    sender: Option<mpsc::Sender<Cmd>>,
}

type Ack<T> = oneshot::Sender<Result<T, WalError>>;

#[derive(Debug)]
enum Cmd {
    Append(Bytes, Ack<MessageId>),
    Truncate(MessageId, Ack<()>),
    Close(Ack<()>),
}

impl Inner {
    fn is_fenced(&self) -> bool {
        self.fenced_by.load(Ordering::SeqCst) != 0
    }

    fn fenced_error(&self) -> WalError {
        WalError::Fenced {
            pchannel: self.pchannel.clone(),
            term: self.term,
            current: Term(self.fenced_by.load(Ordering::SeqCst)),
        }
    }

    fn closed_error(&self, reason: &str) -> WalError {
        WalError::Closed {
            pchannel: self.pchannel.clone(),
            reason: reason.to_owned(),
        }
    }

    fn segment_path(&self, first_id: u64) -> PathBuf {
        self.dir.join(format::segment_file_name(first_id))
    }

    /// Asks the writer to finish what is queued and stop; waits for it (blocking).
    fn stop_writer(&self) {
        let sender = lock(&self.queue).sender.take();
        drop(sender);
        if let Some(handle) = lock(&self.writer).take()
            && handle.join().is_err()
        {
            warn!(pchannel = %self.pchannel, "WAL writer thread panicked");
        }
    }
}

/// A handle on one open pchannel.
#[derive(Debug)]
pub struct LocalWal(Arc<Inner>, Arc<Space>);

impl Drop for LocalWal {
    fn drop(&mut self) {
        // Dropping the sender lets the writer drain and exit; the lock is released with it.
        lock(&self.0.queue).sender.take();
    }
}

impl LocalWal {
    fn send<T: Send + 'static>(
        &self,
        make: impl FnOnce(Ack<T>) -> Cmd,
    ) -> BoxFuture<'static, Result<T, WalError>> {
        let inner = &self.0;
        if inner.is_fenced() {
            return futures::future::ready(Err(inner.fenced_error())).boxed();
        }
        let (tx, rx) = oneshot::channel();
        let sent = {
            let q = lock(&inner.queue);
            q.sender.as_ref().is_some_and(|s| s.send(make(tx)).is_ok())
        };
        if !sent {
            return futures::future::ready(Err(inner.closed_error("writer stopped"))).boxed();
        }
        let closed = inner.closed_error("writer stopped before acknowledging");
        async move { rx.await.unwrap_or(Err(closed)) }.boxed()
    }
}

impl Wal for LocalWal {
    fn pchannel(&self) -> &str {
        &self.0.pchannel
    }

    fn writable(&self) -> Result<(), WalError> {
        self.1.check(&self.0.pchannel)
    }

    fn term(&self) -> Term {
        self.0.term
    }

    fn append(&self, record: Bytes) -> BoxFuture<'static, Result<MessageId, WalError>> {
        if record.len() > format::MAX_RECORD_LEN {
            let err = WalError::TooLarge {
                size: record.len(),
                limit: format::MAX_RECORD_LEN,
            };
            return futures::future::ready(Err(err)).boxed();
        }
        let inner = &self.0;
        if inner.is_fenced() {
            return futures::future::ready(Err(inner.fenced_error())).boxed();
        }
        let (tx, rx) = oneshot::channel();
        {
            // Id assignment and enqueueing happen under one lock: ids follow call order.
            let mut q = lock(&inner.queue);
            let sent = q
                .sender
                .as_ref()
                .is_some_and(|s| s.send(Cmd::Append(record, tx)).is_ok());
            if !sent {
                let err = inner.closed_error("writer stopped");
                return futures::future::ready(Err(err)).boxed();
            }
            q.next_id += 1;
        }
        let closed = inner.closed_error("writer stopped before acknowledging");
        async move { rx.await.unwrap_or(Err(closed)) }.boxed()
    }

    fn next_id(&self) -> MessageId {
        MessageId(lock(&self.0.queue).next_id)
    }

    fn first_id(&self) -> MessageId {
        MessageId(self.0.first_id.load(Ordering::Acquire))
    }

    fn durable_end(&self) -> MessageId {
        MessageId(self.0.durable_end.load(Ordering::Acquire))
    }

    fn size_bytes(&self) -> u64 {
        self.0.size.load(Ordering::Relaxed)
    }

    fn sync_count(&self) -> u64 {
        self.0.syncs.load(Ordering::Relaxed)
    }

    fn read(&self, from: ReadFrom) -> Result<Box<dyn WalReader>, WalError> {
        let first = self.0.first_id.load(Ordering::Acquire);
        let next = match from {
            ReadFrom::Earliest => first,
            ReadFrom::Latest => self.0.durable_end.load(Ordering::Acquire),
            ReadFrom::At(id) => id.0,
            ReadFrom::After(id) => id.0.saturating_add(1),
        };
        if next < first {
            return Err(WalError::Truncated {
                pchannel: self.0.pchannel.clone(),
                requested: MessageId(next),
                first: MessageId(first),
            });
        }
        Ok(Box::new(LocalReader::new(self.0.clone(), next)))
    }

    fn truncate(&self, below: MessageId) -> BoxFuture<'_, Result<(), WalError>> {
        self.send(|ack| Cmd::Truncate(below, ack))
    }

    fn close(&self) -> BoxFuture<'_, Result<(), WalError>> {
        let done = self.send(Cmd::Close);
        let inner = self.0.clone();
        async move {
            // A handle that already stopped has nothing left to make durable.
            let r = match done.await {
                Err(WalError::Closed { .. }) => Ok(()),
                other => other,
            };
            let _ = tokio::task::spawn_blocking(move || inner.stop_writer()).await;
            r
        }
        .boxed()
    }
}
