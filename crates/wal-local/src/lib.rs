//! The local-disk WAL: Walden's standalone default.
//!
//! One directory per pchannel holding segment files (format in [`format`] and
//! `docs/design.md`). One writer thread per open pchannel does group commit: it drains every
//! append queued while the previous batch was syncing, writes them with one `write` and one
//! `fdatasync`, and only then acknowledges each caller. An exclusive file lock keeps a second
//! process from opening the pchannel, and a `TERM` file refuses writers of an older term.
//!
//! Recovery on open scans only the active (last) segment: a torn tail (an incomplete or
//! damaged record with nothing valid after it) is cut off; a damaged record followed by valid
//! ones is corruption and the open fails. Sealed segments are checked record by record as they
//! are read.

pub mod format;
pub mod fs;

use std::{
    collections::HashMap,
    io,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, MutexGuard, Weak,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc,
    },
    thread,
};

use bytes::Bytes;
use futures::{FutureExt, future::BoxFuture};
use tokio::sync::oneshot;
use tracing::{info, warn};
use walden_common::{MessageId, Term, validate_channel_name};
use walden_wal_api::{ReadFrom, Wal, WalError, WalReader, WalStorage};

use crate::{
    format::{RecordAt, SegmentHeader},
    fs::{FileSystem, LockGuard, StdFs, WalFile},
};

/// Settings of the local WAL.
#[derive(Clone, Debug)]
pub struct LocalWalConfig {
    /// A segment is sealed and a new one started once it would grow past this many bytes.
    /// Default 64 MiB.
    pub segment_bytes: u64,
    /// Most bytes written by one group commit. Default 4 MiB.
    pub max_batch_bytes: usize,
}

impl Default for LocalWalConfig {
    fn default() -> Self {
        Self {
            segment_bytes: 64 << 20,
            max_batch_bytes: 4 << 20,
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
        Self {
            root: root.into(),
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
                if term < prev.term {
                    return Err(WalError::Fenced {
                        pchannel: pchannel.to_owned(),
                        term,
                        current: prev.term,
                    });
                }
                // A newer term takes over: the old handle stops writing and frees the lock.
                prev.fenced.store(true, Ordering::SeqCst);
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
            Ok(Arc::new(LocalWal(inner)) as Arc<dyn Wal>)
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
    fenced: AtomicBool,
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
    fn fenced_error(&self) -> WalError {
        WalError::Fenced {
            pchannel: self.pchannel.clone(),
            term: self.term,
            current: Term(self.term.0 + 1),
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
pub struct LocalWal(Arc<Inner>);

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
        if inner.fenced.load(Ordering::SeqCst) {
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
        if inner.fenced.load(Ordering::SeqCst) {
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
        Ok(Box::new(LocalReader {
            inner: self.0.clone(),
            next,
            seg: None,
            buf: Vec::new(),
        }))
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

// ------------------------------------------------------------------------------------------------
// Opening and recovery.

fn io_err(pchannel: &str, context: impl Into<String>) -> impl FnOnce(io::Error) -> WalError {
    let pchannel = pchannel.to_owned();
    let context = context.into();
    move |e| WalError::io(&pchannel, context, e)
}

fn open_blocking(
    fs: Arc<dyn FileSystem>,
    dir: PathBuf,
    pchannel: String,
    term: Term,
    config: LocalWalConfig,
) -> Result<Arc<Inner>, WalError> {
    let p = pchannel.as_str();
    fs.create_dir_all(&dir)
        .map_err(io_err(p, format!("creating {}", dir.display())))?;
    let lock_path = dir.join(LOCK_FILE);
    let guard = fs.try_lock(&lock_path).map_err(|e| {
        if e.kind() == io::ErrorKind::WouldBlock {
            WalError::Locked {
                pchannel: pchannel.clone(),
                path: lock_path.display().to_string(),
            }
        } else {
            WalError::io(p, "locking the pchannel directory", e)
        }
    })?;

    let term_path = dir.join(TERM_FILE);
    if let Some(stored) = read_term(&*fs, &term_path, p)?
        && term < stored
    {
        return Err(WalError::Fenced {
            pchannel,
            term,
            current: stored,
        });
    }
    fs.write_atomic(&term_path, &encode_term(term))
        .map_err(io_err(p, "writing the TERM file"))?;

    let mut firsts: Vec<u64> = fs
        .list(&dir)
        .map_err(io_err(p, "listing segments"))?
        .iter()
        .filter_map(|n| format::parse_segment_file_name(n))
        .collect();
    firsts.sort_unstable();

    let mut size = 0u64;
    for &first in firsts.iter().rev().skip(1) {
        size += check_sealed_segment(&*fs, &dir.join(format::segment_file_name(first)), p, first)?;
    }
    let (active_first, end, active_size, active_records) = match firsts.last() {
        Some(&last) => {
            let path = dir.join(format::segment_file_name(last));
            let (records, len) = recover_active_segment(&*fs, &path, p, last)?;
            (last, last + records, len, records)
        }
        None => (0, 0, 0, 0),
    };

    // Every incarnation writes into a segment whose header carries its term. An active segment
    // without records is rewritten in place (atomically) rather than removed, so the first id
    // is never lost even if everything before it was truncated.
    let header = SegmentHeader {
        term: term.0,
        first_id: end,
        pchannel: pchannel.clone(),
    }
    .encode();
    let active_path = dir.join(format::segment_file_name(end));
    if firsts.is_empty() || active_records == 0 {
        fs.write_atomic(&active_path, &header)
            .map_err(io_err(p, "writing the segment header"))?;
        firsts.retain(|&f| f != active_first);
    } else {
        size += active_size;
        let mut f = fs
            .create_new(&active_path)
            .map_err(io_err(p, "creating a segment"))?;
        f.append(&header)
            .and_then(|()| f.sync_data())
            .and_then(|()| fs.sync_dir(&dir))
            .map_err(io_err(p, "writing the segment header"))?;
    }
    size += header.len() as u64;
    firsts.push(end);
    let file = fs
        .open(&active_path)
        .map_err(io_err(p, "opening the active segment"))?;

    let first_id = firsts[0];
    info!(pchannel = %pchannel, %term, first_id, end, segments = firsts.len(), "local WAL open");
    let (tx, rx) = mpsc::channel();
    let inner = Arc::new(Inner {
        pchannel: pchannel.clone(),
        dir,
        fs,
        term,
        segments: Mutex::new(firsts),
        first_id: AtomicU64::new(first_id),
        durable_end: AtomicU64::new(end),
        size: AtomicU64::new(size),
        syncs: AtomicU64::new(0),
        fenced: AtomicBool::new(false),
        queue: Mutex::new(Queue {
            next_id: end,
            sender: Some(tx),
        }),
        writer: Mutex::new(None),
    });
    let writer = Writer {
        inner: Arc::downgrade(&inner),
        shared: WriterShared::from(&inner),
        rx,
        file,
        active_first: end,
        active_len: header.len() as u64,
        next_id: end,
        failed: None,
        config,
        _lock: guard,
    };
    let handle = thread::Builder::new()
        .name(format!("wal-{pchannel}"))
        .spawn(move || writer.run())
        .map_err(io_err(p, "starting the writer thread"))?;
    *lock(&inner.writer) = Some(handle);
    Ok(inner)
}

fn encode_term(term: Term) -> Vec<u8> {
    let mut b = term.0.to_le_bytes().to_vec();
    let crc = crc32c::crc32c(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    b
}

fn read_term(fs: &dyn FileSystem, path: &Path, p: &str) -> Result<Option<Term>, WalError> {
    let Some(b) = fs
        .read_all(path)
        .map_err(io_err(p, "reading the TERM file"))?
    else {
        return Ok(None);
    };
    let corrupted = || WalError::Corrupted {
        pchannel: p.to_owned(),
        location: path.display().to_string(),
        detail: "TERM file is damaged".into(),
    };
    if b.len() != 12 {
        return Err(corrupted());
    }
    let mut t = [0u8; 8];
    t.copy_from_slice(&b[..8]);
    let crc = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
    if crc32c::crc32c(&t) != crc {
        return Err(corrupted());
    }
    Ok(Some(Term(u64::from_le_bytes(t))))
}

/// Checks a sealed segment's header and returns its size. Its records are checked when read.
fn check_sealed_segment(
    fs: &dyn FileSystem,
    path: &Path,
    p: &str,
    first: u64,
) -> Result<u64, WalError> {
    let f = fs.open(path).map_err(io_err(p, "opening a segment"))?;
    let len = f.len().map_err(io_err(p, "reading a segment's length"))?;
    let mut head = vec![0u8; 64 + walden_common::MAX_PCHANNEL_NAME_LEN];
    let n = f
        .read_at(&mut head, 0)
        .map_err(io_err(p, "reading a segment header"))?;
    check_header(&head[..n], path, p, first)?;
    Ok(len)
}

fn check_header(b: &[u8], path: &Path, p: &str, first: u64) -> Result<usize, WalError> {
    let corrupted = |detail: String| WalError::Corrupted {
        pchannel: p.to_owned(),
        location: path.display().to_string(),
        detail,
    };
    let h = SegmentHeader::decode(b).map_err(|e| corrupted(e.to_string()))?;
    if h.pchannel != p || h.first_id != first {
        return Err(corrupted(format!(
            "header names pchannel {:?} first id {}, expected {p:?} {first}",
            h.pchannel, h.first_id
        )));
    }
    Ok(h.encoded_len())
}

/// Scans the active segment, cutting a torn tail. Returns (records, length after recovery).
fn recover_active_segment(
    fs: &dyn FileSystem,
    path: &Path,
    p: &str,
    first: u64,
) -> Result<(u64, u64), WalError> {
    let mut f = fs
        .open(path)
        .map_err(io_err(p, "opening the active segment"))?;
    let len = f.len().map_err(io_err(p, "reading the active segment"))? as usize;
    let mut b = vec![0u8; len];
    let n = f
        .read_at(&mut b, 0)
        .map_err(io_err(p, "reading the active segment"))?;
    b.truncate(n);
    let header_len = match check_header(&b, path, p, first) {
        Ok(l) => l,
        // A header torn while the segment was being created: nothing was ever written after it.
        Err(e) if b.len() < 64 + p.len() => {
            warn!(pchannel = p, error = %e, "active segment header is torn; recreating it");
            return Ok((0, 0));
        }
        Err(e) => return Err(e),
    };
    let mut off = header_len;
    let mut records = 0u64;
    // Whatever recovery keeps will be served, so it must be durable: a write whose fsync
    // failed may still sit in the page cache, whole, and is synced here (or the open fails).
    f.sync_data()
        .map_err(io_err(p, "syncing the recovered active segment"))?;
    loop {
        match format::record_at(&b[off..]) {
            RecordAt::Valid { start, len } => {
                off += start + len;
                records += 1;
            }
            RecordAt::Incomplete if off == b.len() => break,
            bad => {
                if let Some(at) = format::any_valid_record_after(&b, off + 1) {
                    return Err(WalError::Corrupted {
                        pchannel: p.to_owned(),
                        location: format!("{} at byte {off}", path.display()),
                        detail: format!(
                            "damaged record ({bad:?}) followed by a valid record at byte {at}"
                        ),
                    });
                }
                warn!(
                    pchannel = p,
                    offset = off,
                    dropped = b.len() - off,
                    "cutting a torn tail"
                );
                f.truncate(off as u64)
                    .and_then(|()| f.sync_data())
                    .map_err(io_err(p, "cutting a torn tail"))?;
                break;
            }
        }
    }
    Ok((records, off as u64))
}

// ------------------------------------------------------------------------------------------------
// The writer thread: group commit.

/// What the writer needs of [`Inner`] without keeping it alive (so dropping every handle stops
/// the writer).
#[derive(Debug)]
struct WriterShared {
    pchannel: String,
    dir: PathBuf,
    fs: Arc<dyn FileSystem>,
    term: Term,
}

impl From<&Arc<Inner>> for WriterShared {
    fn from(i: &Arc<Inner>) -> Self {
        Self {
            pchannel: i.pchannel.clone(),
            dir: i.dir.clone(),
            fs: i.fs.clone(),
            term: i.term,
        }
    }
}

#[derive(Debug)]
struct Writer {
    inner: Weak<Inner>,
    shared: WriterShared,
    rx: mpsc::Receiver<Cmd>,
    file: Box<dyn WalFile>,
    active_first: u64,
    active_len: u64,
    next_id: u64,
    /// Set after an I/O failure: every later append fails (fsync errors cannot be retried).
    failed: Option<(io::ErrorKind, String)>,
    config: LocalWalConfig,
    _lock: Box<dyn LockGuard>,
}

impl Writer {
    fn run(mut self) {
        let mut batch: Vec<(Bytes, Ack<MessageId>)> = Vec::new();
        let mut buf: Vec<u8> = Vec::with_capacity(self.config.max_batch_bytes);
        while let Ok(cmd) = self.rx.recv() {
            let mut control = None;
            let mut bytes = 0usize;
            match cmd {
                Cmd::Append(r, ack) => {
                    bytes += r.len();
                    batch.push((r, ack));
                    // Group commit: take everything queued meanwhile, up to the batch limit.
                    while bytes < self.config.max_batch_bytes {
                        match self.rx.try_recv() {
                            Ok(Cmd::Append(r, ack)) => {
                                bytes += r.len();
                                batch.push((r, ack));
                            }
                            Ok(other) => {
                                control = Some(other);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                }
                other => control = Some(other),
            }
            if !batch.is_empty() {
                self.write_batch(&mut batch, &mut buf);
            }
            match control {
                Some(Cmd::Close(ack)) => {
                    let _ = ack.send(Ok(()));
                    break;
                }
                Some(Cmd::Truncate(below, ack)) => {
                    let _ = ack.send(self.truncate(below));
                }
                _ => {}
            }
        }
    }

    fn error(&self, context: &str) -> WalError {
        let (kind, msg) = self
            .failed
            .clone()
            .unwrap_or((io::ErrorKind::Other, "unknown".into()));
        WalError::io(&self.shared.pchannel, context, io::Error::new(kind, msg))
    }

    fn write_batch(&mut self, batch: &mut Vec<(Bytes, Ack<MessageId>)>, buf: &mut Vec<u8>) {
        let inner = self.inner.upgrade();
        let fenced = inner
            .as_ref()
            .is_none_or(|i| i.fenced.load(Ordering::SeqCst));
        if fenced || self.failed.is_some() {
            for (_, ack) in batch.drain(..) {
                let err = match (&inner, fenced) {
                    (Some(i), true) => i.fenced_error(),
                    _ => self.error("an earlier write failed; reopen the pchannel"),
                };
                let _ = ack.send(Err(err));
            }
            return;
        }
        let result = self.write_records(batch, buf);
        if let Err(e) = result {
            warn!(pchannel = %self.shared.pchannel, error = %e, "WAL write failed; failing the handle");
            self.failed = Some((e.kind(), e.to_string()));
            for (_, ack) in batch.drain(..) {
                let _ = ack.send(Err(self.error("group commit")));
            }
            return;
        }
        let first = self.next_id;
        self.next_id += batch.len() as u64;
        if let Some(i) = &inner {
            // Readers may see the records before their writers hear back; never the reverse.
            i.durable_end.store(self.next_id, Ordering::Release);
        }
        for (k, (_, ack)) in batch.drain(..).enumerate() {
            let _ = ack.send(Ok(MessageId(first + k as u64)));
        }
    }

    /// Writes the batch's records, rolling to a new segment where one would grow past its
    /// limit, and syncs. The caller acknowledges only if this returns `Ok`.
    fn write_records(
        &mut self,
        batch: &[(Bytes, Ack<MessageId>)],
        buf: &mut Vec<u8>,
    ) -> io::Result<()> {
        buf.clear();
        for (id, (r, _)) in (self.next_id..).zip(batch.iter()) {
            let incoming = (format::RECORD_HEADER_LEN + r.len()) as u64;
            let has_records = id > self.active_first;
            if has_records
                && self.active_len + buf.len() as u64 + incoming > self.config.segment_bytes
            {
                self.write_out(buf)?;
                self.roll(id)?;
            }
            format::encode_record(r, buf);
        }
        self.write_out(buf)
    }

    /// Appends `buf` to the active segment and makes it durable.
    fn write_out(&mut self, buf: &mut Vec<u8>) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        self.file.append(buf)?;
        self.file.sync_data()?;
        self.active_len += buf.len() as u64;
        if let Some(i) = self.inner.upgrade() {
            i.size.fetch_add(buf.len() as u64, Ordering::Relaxed);
            i.syncs.fetch_add(1, Ordering::Relaxed);
        }
        buf.clear();
        Ok(())
    }

    /// Seals the active segment and starts one whose first record is `first_id`.
    fn roll(&mut self, first_id: u64) -> io::Result<()> {
        let s = &self.shared;
        let path = s.dir.join(format::segment_file_name(first_id));
        let header = SegmentHeader {
            term: s.term.0,
            first_id,
            pchannel: s.pchannel.clone(),
        }
        .encode();
        let mut f = s.fs.create_new(&path)?;
        f.append(&header)?;
        f.sync_data()?;
        s.fs.sync_dir(&s.dir)?;
        self.file = f;
        self.active_first = first_id;
        self.active_len = header.len() as u64;
        if let Some(i) = self.inner.upgrade() {
            lock(&i.segments).push(first_id);
            i.size.fetch_add(header.len() as u64, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Removes whole sealed segments that lie entirely below `below`.
    fn truncate(&mut self, below: MessageId) -> Result<(), WalError> {
        let Some(inner) = self.inner.upgrade() else {
            return Ok(());
        };
        let p = self.shared.pchannel.as_str();
        let doomed: Vec<u64> = {
            let segs = lock(&inner.segments);
            segs.windows(2)
                .filter(|w| w[1] <= below.0)
                .map(|w| w[0])
                .collect()
        };
        if doomed.is_empty() {
            return Ok(());
        }
        // Raise the floor first, so no new reader starts inside a segment being removed.
        let new_first = {
            let mut segs = lock(&inner.segments);
            segs.retain(|f| !doomed.contains(f));
            segs[0]
        };
        inner.first_id.store(new_first, Ordering::Release);
        for first in doomed {
            let path = inner.segment_path(first);
            let len = self
                .shared
                .fs
                .open(&path)
                .and_then(|f| f.len())
                .unwrap_or(0);
            self.shared
                .fs
                .remove(&path)
                .map_err(io_err(p, format!("removing {}", path.display())))?;
            inner.size.fetch_sub(len, Ordering::Relaxed);
        }
        self.shared
            .fs
            .sync_dir(&self.shared.dir)
            .map_err(io_err(p, "syncing the directory after truncation"))?;
        Ok(())
    }
}

// ------------------------------------------------------------------------------------------------
// Readers.

#[derive(Debug)]
struct OpenSegment {
    file: Box<dyn WalFile>,
    /// First id of the segment after this one, once known.
    end: Option<u64>,
    /// Id of the record at `buf[pos]`.
    buf_id: u64,
    /// File offset of `buf[0]`.
    buf_off: u64,
    pos: usize,
    filled: usize,
}

#[derive(Debug)]
struct LocalReader {
    inner: Arc<Inner>,
    next: u64,
    seg: Option<OpenSegment>,
    /// Reused across chunks: fresh memory is slow to touch.
    buf: Vec<u8>,
}

impl LocalReader {
    fn corrupted(&self, detail: impl Into<String>) -> WalError {
        WalError::Corrupted {
            pchannel: self.inner.pchannel.clone(),
            location: format!("record {}", self.next),
            detail: detail.into(),
        }
    }

    fn open_segment_for(&mut self, id: u64) -> Result<(), WalError> {
        let (first, end) = {
            let segs = lock(&self.inner.segments);
            let idx = segs.partition_point(|&f| f <= id);
            if idx == 0 {
                return Err(WalError::Truncated {
                    pchannel: self.inner.pchannel.clone(),
                    requested: MessageId(id),
                    first: MessageId(segs.first().copied().unwrap_or(0)),
                });
            }
            (segs[idx - 1], segs.get(idx).copied())
        };
        let path = self.inner.segment_path(first);
        let inner = self.inner.clone();
        let p = inner.pchannel.as_str();
        let file = inner.fs.open(&path).map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                WalError::Truncated {
                    pchannel: p.to_owned(),
                    requested: MessageId(id),
                    first: MessageId(inner.first_id.load(Ordering::Acquire)),
                }
            } else {
                WalError::io(p, "opening a segment for reading", e)
            }
        })?;
        self.seg = Some(OpenSegment {
            file,
            end,
            buf_id: first,
            buf_off: 0,
            pos: 0,
            filled: 0,
        });
        // Skip the header, then every record before `id`.
        let header_len = {
            self.fill(64 + p.len())?;
            let seg = self
                .seg
                .as_ref()
                .ok_or_else(|| self.corrupted("no segment"))?;
            check_header(&self.buf[..seg.filled], &path, p, first)?
        };
        if let Some(seg) = self.seg.as_mut() {
            seg.pos = header_len;
        }
        while self.seg.as_ref().is_some_and(|s| s.buf_id < id) {
            self.parse_one(false)?;
        }
        Ok(())
    }

    /// Makes at least `need` bytes available from `pos`, if the file has them.
    fn fill(&mut self, need: usize) -> Result<(), WalError> {
        let Some(seg) = self.seg.as_mut() else {
            return Ok(());
        };
        if seg.filled - seg.pos >= need {
            return Ok(());
        }
        // Move the unread rest to the front, then read after it.
        self.buf.copy_within(seg.pos..seg.filled, 0);
        seg.buf_off += seg.pos as u64;
        seg.filled -= seg.pos;
        seg.pos = 0;
        let want = need.max(READ_CHUNK);
        if self.buf.len() < want {
            self.buf.resize(want, 0);
        }
        let n = seg
            .file
            .read_at(&mut self.buf[seg.filled..], seg.buf_off + seg.filled as u64)
            .map_err(|e| WalError::io(&self.inner.pchannel, "reading a segment", e))?;
        seg.filled += n;
        Ok(())
    }

    /// Parses the record at `pos`; returns its payload when `keep`.
    fn parse_one(&mut self, keep: bool) -> Result<Option<Bytes>, WalError> {
        let mut refetched = false;
        loop {
            let seg = self
                .seg
                .as_ref()
                .ok_or_else(|| self.corrupted("no segment"))?;
            match format::record_at(&self.buf[seg.pos..seg.filled]) {
                RecordAt::Valid { start, len } => {
                    let from = seg.pos + start;
                    let payload = keep.then(|| Bytes::copy_from_slice(&self.buf[from..from + len]));
                    if let Some(seg) = self.seg.as_mut() {
                        seg.pos = from + len;
                        seg.buf_id += 1;
                    }
                    return Ok(payload);
                }
                RecordAt::Incomplete => {
                    let have = seg.filled - seg.pos;
                    let need = if have >= format::RECORD_HEADER_LEN {
                        let b = &self.buf[seg.pos..seg.pos + 4];
                        format::RECORD_HEADER_LEN
                            + u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize
                    } else {
                        format::RECORD_HEADER_LEN
                    };
                    self.fill(need)?;
                    let seg = self
                        .seg
                        .as_ref()
                        .ok_or_else(|| self.corrupted("no segment"))?;
                    if seg.filled - seg.pos == have {
                        return Err(self.corrupted("a durable record is missing from its segment"));
                    }
                }
                RecordAt::Invalid(why) if !refetched => {
                    // The bytes may have been read while being written; read them again.
                    refetched = true;
                    if let Some(seg) = self.seg.as_mut() {
                        seg.buf_off += seg.pos as u64;
                        seg.pos = 0;
                        seg.filled = 0;
                    }
                    self.fill(format::RECORD_HEADER_LEN)?;
                    let _ = why;
                }
                RecordAt::Invalid(why) => return Err(self.corrupted(why)),
            }
        }
    }
}

impl WalReader for LocalReader {
    fn next(&mut self) -> BoxFuture<'_, Result<Option<(MessageId, Bytes)>, WalError>> {
        let result = (|| {
            if self.next >= self.inner.durable_end.load(Ordering::Acquire) {
                return Ok(None);
            }
            let first = self.inner.first_id.load(Ordering::Acquire);
            if self.next < first {
                return Err(WalError::Truncated {
                    pchannel: self.inner.pchannel.clone(),
                    requested: MessageId(self.next),
                    first: MessageId(first),
                });
            }
            let in_segment = match &mut self.seg {
                Some(seg) => {
                    if seg.end.is_none() {
                        let segs = lock(&self.inner.segments);
                        let idx = segs.partition_point(|&f| f <= seg.buf_id);
                        seg.end = segs.get(idx).copied();
                    }
                    seg.end.is_none_or(|end| self.next < end) && seg.buf_id == self.next
                }
                None => false,
            };
            if !in_segment {
                self.open_segment_for(self.next)?;
            }
            let payload = self
                .parse_one(true)?
                .ok_or_else(|| self.corrupted("record without payload"))?;
            let id = MessageId(self.next);
            self.next += 1;
            Ok(Some((id, payload)))
        })();
        futures::future::ready(result).boxed()
    }
}
