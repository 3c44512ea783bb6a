//! The shared-log layout: every pchannel of a node in one log, one group commit for all.
//!
//! With one log per pchannel, each pchannel's writer can only batch what is in flight on that
//! pchannel, so 16 pchannels pay up to 16 `fdatasync`s where one would do (session 1's
//! profile: 0.41 fsyncs per message at 64 in flight over 16 pchannels). Here one writer thread
//! takes every append queued for any pchannel, writes them with one `write` and makes them
//! durable with one `fdatasync`. Each pchannel keeps an in-memory index (id → segment, offset),
//! rebuilt by scanning the log when the storage opens.
//!
//! Layout under the root: `LOCK` (one process), `log/{seq:020}.log` segments, and per pchannel
//! `{pchannel}/TERM` (as in the per-pchannel layout) and `{pchannel}/FIRST` (the first retained
//! id, written on truncation so ids never restart even when every record of a pchannel is gone).
//!
//! Segment: header `WALDNLOG` | version u32 | seq u64, then records `[len u32][crc32c u32][body]`
//! (the per-pchannel record framing), body = `id u64 | name_len u8 | name | payload`.
//!
//! A segment is deleted once every pchannel with records in it has truncated past them; the
//! active segment never is. A storage failure fails the whole log (every pchannel); the next
//! open of any pchannel reopens it, which recovers it (torn tail cut and synced).

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    io,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, Weak,
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

mod check;
mod layout;
mod reader;
mod writer;

pub(crate) use check::check;
pub(crate) use layout::header;

/// Runs the shared log's parsers over untrusted bytes (the fuzz target `shared_layout`): an
/// index file, a record body, a segment file name. Each refuses what it cannot read and never
/// panics, and an index it accepts encodes back to the same bytes.
#[doc(hidden)]
pub fn parse_untrusted(data: &[u8]) {
    let seq = data
        .get(16..24)
        .map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])));
    if let Some(entries) = layout::decode_index(data, seq) {
        assert_eq!(
            layout::encode_index(seq, &entries),
            data,
            "an accepted index encodes back to itself"
        );
    }
    if let Some((_, name, payload)) = layout::parse_body(data) {
        assert!(9 + name.len() <= payload.start && payload.end == data.len());
    }
    if let Ok(name) = std::str::from_utf8(data)
        && let Some(seq) = layout::parse_segment_name(name)
    {
        assert_eq!(layout::segment_name(seq), name);
    }
}
use layout::*;
use reader::*;
use writer::*;

use crate::{
    LocalWalConfig, READ_CHUNK,
    format::{self, RecordAt},
    fs::{FileSystem, LockGuard, StdFs, WalFile},
    lock,
    open::{claim_term, encode_term, io_err, lock_dir, read_term, stale_term},
    prepare::{Preparer, is_prepared_name},
    ranges::{Ranges, SKIPPED_FILE, read_skipped},
    space::Space,
    writer::{Failed, gather},
};

const MAGIC: &[u8; 8] = b"WALDNLOG";
const VERSION: u32 = 1;
const HEADER_LEN: usize = 20;
const FIRST_FILE: &str = "FIRST";
/// Zeros written ahead of the write position at a time (see [`Writer::make_room`]).
const PREZERO_BYTES: usize = 4 << 20;
/// Name used in errors about the log as a whole.
const LOG: &str = "(shared log)";

/// One pchannel's index and counters; outlives handles (a reopen keeps it).
#[derive(Debug)]
struct Chan {
    name: String,
    index: Mutex<Index>,
    durable_end: AtomicU64,
    size: AtomicU64,
    /// Group commits that carried this pchannel's records.
    syncs: AtomicU64,
    /// Id ranges whose records are damaged (found by the open's scan or by a reader).
    damaged: Mutex<Ranges>,
    /// Id ranges an operator chose to skip (`SKIPPED`, written by `walden wal skip-damaged`):
    /// readers pass over them instead of failing.
    skipped: Mutex<Ranges>,
}

impl Chan {
    fn mark_damaged(&self, ids: std::ops::Range<u64>) {
        lock(&self.damaged).add(ids);
    }

    /// The error a reader gets for damaged id `id`.
    fn damage_error(&self, id: u64, location: String) -> WalError {
        let range = lock(&self.damaged).containing(id).unwrap_or(id..id + 1);
        WalError::Corrupted {
            pchannel: self.name.clone(),
            location,
            detail: format!(
                "records {}..{} are damaged; those before and after read, and \
                 `walden wal skip-damaged` lets readers pass over them",
                range.start, range.end
            ),
        }
    }
}

#[derive(Debug, Default)]
struct Index {
    first_id: u64,
    /// `locs[i]` is where id `first_id + i` is.
    locs: VecDeque<Loc>,
}

#[derive(Debug, Default)]
struct Segment {
    /// Highest id per pchannel in this segment.
    max_ids: HashMap<String, u64>,
}

#[derive(Debug)]
struct Job {
    chan: Arc<Chan>,
    handle: Arc<HandleState>,
    id: u64,
    record: Bytes,
    ack: oneshot::Sender<Result<MessageId, WalError>>,
}

#[derive(Debug)]
enum Cmd {
    Append(Job),
    Truncate(Arc<Chan>, MessageId, oneshot::Sender<Result<(), WalError>>),
    /// Everything before it is written and acknowledged by the time this is answered.
    Barrier(oneshot::Sender<()>),
}

/// The open log: its segments, pchannel indexes and writer.
#[derive(Debug)]
struct Log {
    root: PathBuf,
    dir: PathBuf,
    fs: Arc<dyn FileSystem>,
    chans: Mutex<HashMap<String, Arc<Chan>>>,
    segments: Mutex<BTreeMap<u64, Segment>>,
    failed: AtomicBool,
    /// The storage's counter: it outlives a log reopened after a failure.
    syncs: Arc<AtomicU64>,
    /// Free space on the log's file system.
    space: Arc<Space>,
    /// Damaged byte ranges the open's scan skipped, for the log.
    damage: Mutex<Vec<String>>,
    sender: Mutex<Option<mpsc::Sender<Cmd>>>,
    writer: Mutex<Option<thread::JoinHandle<()>>>,
}

impl Log {
    /// Opens (creating or recovering) the log under `root`: scans every segment, cuts a torn
    /// tail, and starts the writer.
    fn open(
        root: &Path,
        fs: Arc<dyn FileSystem>,
        config: LocalWalConfig,
        syncs: Arc<AtomicU64>,
        space: Arc<Space>,
    ) -> Result<Arc<Self>, WalError> {
        let dir = root.join("log");
        fs.create_dir_all(&dir)
            .map_err(io_err(LOG, format!("creating {}", dir.display())))?;
        let lock_guard = lock_dir(&*fs, root, LOG)?;
        let seqs = segment_seqs(&*fs, &dir)?;
        // Index files whose segment is gone (a crash between the two removals) are leftovers,
        // as are segments prepared but never used (they hold no record).
        for name in fs.list(&dir).map_err(io_err(LOG, "listing segments"))? {
            if is_prepared_name(&name) {
                let _ = fs.remove(&dir.join(&name));
            } else if let Some(seq) = layout::parse_index_name(&name)
                && seqs.binary_search(&seq).is_err()
            {
                let _ = fs.remove(&dir.join(&name));
            }
        }
        let log = Self {
            root: root.to_owned(),
            dir: dir.clone(),
            fs: fs.clone(),
            chans: Mutex::new(HashMap::new()),
            segments: Mutex::new(BTreeMap::new()),
            failed: AtomicBool::new(false),
            syncs,
            space: space.clone(),
            damage: Mutex::new(Vec::new()),
            sender: Mutex::new(None),
            writer: Mutex::new(None),
        };
        let mut active: Option<(u64, Box<dyn WalFile>, u64, u64)> = None;
        let mut buf = Vec::new();
        for (k, &seq) in seqs.iter().enumerate() {
            let last = k + 1 == seqs.len();
            // A sealed segment with a sound index need not be read: its records are checked
            // when they are read.
            if !last && log.load_index(seq) {
                continue;
            }
            let (file, len, zeroed) = log.scan_segment(seq, last, &mut buf)?;
            if last {
                active = Some((seq, file, len, zeroed));
            }
        }
        let (seq, file, len, zeroed) = match active {
            Some(a) => a,
            None => {
                let (f, len) = new_segment(&*fs, &dir, 0)?;
                lock(&log.segments).insert(0, Segment::default());
                (0, f, len, len)
            }
        };
        let log = Arc::new(log);
        let (tx, rx) = mpsc::channel();
        *lock(&log.sender) = Some(tx);
        let writer = Writer {
            log: Arc::downgrade(&log),
            dir,
            fs,
            rx,
            file,
            seq,
            len,
            zeroed,
            zeros: Vec::new(),
            prep: None,
            indexers: Vec::new(),
            config,
            failed: Failed::default(),
            space,
            _lock: lock_guard,
        };
        let handle = thread::Builder::new()
            .name("wal-shared".into())
            .spawn(move || writer.run())
            .map_err(|e| WalError::io(LOG, "starting the writer thread", e))?;
        *lock(&log.writer) = Some(handle);
        Ok(log)
    }

    fn chan(&self, name: &str) -> Arc<Chan> {
        lock(&self.chans)
            .entry(name.to_owned())
            .or_insert_with(|| {
                Arc::new(Chan {
                    name: name.to_owned(),
                    index: Mutex::new(Index::default()),
                    durable_end: AtomicU64::new(0),
                    size: AtomicU64::new(0),
                    syncs: AtomicU64::new(0),
                    damaged: Mutex::new(Ranges::default()),
                    skipped: Mutex::new(Ranges::default()),
                })
            })
            .clone()
    }

    /// Indexes every record of segment `seq`; in the last segment, cuts a torn tail.
    /// Loads sealed segment `seq`'s index file into the pchannel indexes; `false` (nothing
    /// applied) if it is missing, damaged or does not follow on from what is indexed so far.
    fn load_index(&self, seq: u64) -> bool {
        let Ok(Some(b)) = self.fs.read_all(&self.dir.join(index_name(seq))) else {
            return false;
        };
        let Some(entries) = decode_index(&b, seq) else {
            warn!(
                segment = seq,
                "segment index damaged; scanning the segment instead"
            );
            return false;
        };
        // Check every pchannel follows on before changing anything.
        for (name, first, _) in &entries {
            if let Some(c) = lock(&self.chans).get(name.as_str()) {
                let ix = lock(&c.index);
                if !ix.locs.is_empty() && ix.first_id + ix.locs.len() as u64 != *first {
                    return false;
                }
            }
        }
        let mut seg = Segment::default();
        for (name, first, locs) in entries {
            let chan = self.chan(&name);
            let mut ix = lock(&chan.index);
            if ix.locs.is_empty() {
                ix.first_id = first;
            }
            let n = locs.len() as u64;
            let bytes: u64 = locs.iter().map(|l| u64::from(l.len)).sum();
            ix.locs.extend(locs);
            drop(ix);
            chan.durable_end.store(first + n, Ordering::Release);
            chan.size.fetch_add(bytes, Ordering::Relaxed);
            seg.max_ids.insert(name, first + n - 1);
        }
        lock(&self.segments).insert(seq, seg);
        true
    }

    /// Returns the file, the end of its records and its length (zeros may follow the records).
    fn scan_segment(
        &self,
        seq: u64,
        last: bool,
        b: &mut Vec<u8>,
    ) -> Result<(Box<dyn WalFile>, u64, u64), WalError> {
        let path = self.dir.join(segment_name(seq));
        let location = path.display().to_string();
        let mut file = self
            .fs
            .open(&path)
            .map_err(io_err(LOG, format!("opening {location}")))?;
        let len = file
            .len()
            .map_err(io_err(LOG, "reading a segment's size"))?;
        // One buffer for every segment: fresh memory is slow to touch here.
        b.clear();
        b.resize(len as usize, 0);
        let read = file
            .read_at(b, 0)
            .map_err(io_err(LOG, format!("reading {location}")))?;
        b.truncate(read);
        if b.len() < HEADER_LEN || &b[..8] != MAGIC {
            if last && b.len() < HEADER_LEN {
                // Created, but its header never made it to disk whole: no record can be in
                // it, so start it again.
                file.truncate(0)
                    .map_err(io_err(LOG, "resetting an empty segment"))?;
                file.append(&header(seq))
                    .map_err(io_err(LOG, "rewriting a segment header"))?;
                file.sync_data()
                    .map_err(io_err(LOG, "syncing a segment header"))?;
                lock(&self.segments).insert(seq, Segment::default());
                return Ok((file, HEADER_LEN as u64, HEADER_LEN as u64));
            }
            // The header holds nothing a record needs (records check themselves and carry their
            // ids): say so, and read the records that are there.
            warn!(segment = %location, "damaged segment header; reading its records anyway");
            lock(&self.damage).push(format!("{location}: damaged segment header"));
            if b.len() < HEADER_LEN {
                lock(&self.segments).insert(seq, Segment::default());
                let len = b.len() as u64;
                return Ok((file, len, len));
            }
        }
        let mut seg = Segment::default();
        let mut off = HEADER_LEN;
        // Records of one pchannel tend to come in runs: skip the map lookup for those.
        let mut cur: Option<Arc<Chan>> = None;
        loop {
            match format::record_at(&b[off..]) {
                RecordAt::Valid { start, len } => {
                    let body = &b[off + start..off + start + len];
                    let Some((id, name, _)) = parse_body(body) else {
                        warn!(segment = %location, at = off, "record with a damaged body; skipped");
                        off += start + len;
                        continue;
                    };
                    let chan = match &cur {
                        Some(c) if c.name == name => c.clone(),
                        _ => {
                            let c = self.chan(name);
                            cur = Some(c.clone());
                            c
                        }
                    };
                    let mut ix = lock(&chan.index);
                    let expected = ix.first_id + ix.locs.len() as u64;
                    if ix.locs.is_empty() {
                        ix.first_id = id;
                    } else if id < expected {
                        warn!(segment = %location, at = off, pchannel = name, id, expected,
                            "record out of order; skipped");
                        drop(ix);
                        off += start + len;
                        continue;
                    } else if id > expected {
                        // Records of this pchannel were in damaged bytes before this one: hold
                        // their places (so ids stay dense) and remember them as damaged.
                        warn!(segment = %location, at = off, pchannel = name,
                            damaged = %format!("{expected}..{id}"), "records lost to damage");
                        for _ in expected..id {
                            ix.locs.push_back(Loc {
                                seg: seq,
                                off: off as u64,
                                len: 0,
                            });
                        }
                        chan.mark_damaged(expected..id);
                    }
                    let total = (start + len) as u32;
                    ix.locs.push_back(Loc {
                        seg: seq,
                        off: off as u64,
                        len: total,
                    });
                    drop(ix);
                    chan.durable_end.store(id + 1, Ordering::Release);
                    chan.size.fetch_add(u64::from(total), Ordering::Relaxed);
                    match seg.max_ids.get_mut(name) {
                        Some(max) => *max = id,
                        None => {
                            seg.max_ids.insert(name.to_owned(), id);
                        }
                    }
                    off += start + len;
                }
                RecordAt::Incomplete if off == b.len() => break,
                // Zeros written ahead of the records: the clean end.
                _ if b[off..].iter().all(|x| *x == 0) => break,
                damage => {
                    let after = format::any_valid_record_after(b, off + 1);
                    if !last || after.is_some() {
                        // Damage in the middle of the log: confined to the pchannels whose
                        // records it held (found as gaps in their ids); the others read on.
                        let until = after.unwrap_or(b.len());
                        warn!(segment = %location, at = off, until, ?damage,
                            "damaged bytes in the log; skipping them");
                        lock(&self.damage).push(format!(
                            "{location}: bytes {off}..{until} damaged ({damage:?})"
                        ));
                        match after {
                            Some(a) => {
                                off = a;
                                continue;
                            }
                            None => {
                                off = b.len();
                                break;
                            }
                        }
                    }
                    warn!(segment = %location, at = off, "cutting a torn tail");
                    file.truncate(off as u64)
                        .map_err(io_err(LOG, "cutting a torn tail"))?;
                    b.truncate(off);
                    break;
                }
            }
        }
        if last {
            // What recovery keeps must be durable before anyone reads it.
            file.sync_data()
                .map_err(io_err(LOG, "syncing the recovered tail"))?;
        }
        lock(&self.segments).insert(seq, seg);
        Ok((file, off as u64, b.len() as u64))
    }

    fn send(&self, cmd: Cmd) -> bool {
        lock(&self.sender)
            .as_ref()
            .is_some_and(|s| s.send(cmd).is_ok())
    }

    /// Stops the writer once what is queued is answered; it releases the directory lock.
    fn stop(&self) {
        lock(&self.sender).take();
        if let Some(h) = lock(&self.writer).take() {
            // The writer may hold the last reference itself for a moment: never join oneself.
            if h.thread().id() != thread::current().id() && h.join().is_err() {
                warn!("shared WAL writer panicked");
            }
        }
    }
}

impl Drop for Log {
    /// The log lives while the storage or any handle holds it; the last one stops the writer.
    fn drop(&mut self) {
        self.stop();
    }
}

/// What a handle's appends check at commit time.
#[derive(Debug)]
struct HandleState {
    pchannel: String,
    term: Term,
    /// The term that fenced this handle (0: not fenced).
    fenced_by: AtomicU64,
    closed: AtomicBool,
}

impl HandleState {
    fn refusal(&self) -> Option<WalError> {
        let by = self.fenced_by.load(Ordering::SeqCst);
        if by != 0 {
            return Some(WalError::Fenced {
                pchannel: self.pchannel.clone(),
                term: self.term,
                current: Term(by),
            });
        }
        self.closed
            .load(Ordering::SeqCst)
            .then(|| WalError::Closed {
                pchannel: self.pchannel.clone(),
                reason: "closed".into(),
            })
    }
}

/// WAL storage with every pchannel in one log (see the module docs).
#[derive(Debug)]
pub struct SharedLogStorage {
    root: PathBuf,
    fs: Arc<dyn FileSystem>,
    config: LocalWalConfig,
    log: Mutex<Option<Arc<Log>>>,
    handles: Mutex<HashMap<String, Weak<HandleState>>>,
    syncs: Arc<AtomicU64>,
    space: Arc<Space>,
}

impl SharedLogStorage {
    pub fn new(root: impl Into<PathBuf>, config: LocalWalConfig) -> Self {
        Self::with_fs(root, Arc::new(StdFs), config)
    }

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
            log: Mutex::new(None),
            handles: Mutex::new(HashMap::new()),
            syncs: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The open log, (re)opening it if there is none or it failed.
    fn log(&self) -> Result<Arc<Log>, WalError> {
        let mut slot = lock(&self.log);
        if let Some(l) = slot.as_ref()
            && !l.failed.load(Ordering::SeqCst)
        {
            return Ok(l.clone());
        }
        if let Some(old) = slot.take() {
            old.stop();
        }
        let started = std::time::Instant::now();
        let log = Log::open(
            &self.root,
            self.fs.clone(),
            self.config.clone(),
            self.syncs.clone(),
            self.space.clone(),
        )?;
        info!(
            pchannels = lock(&log.chans).len(),
            segments = lock(&log.segments).len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "shared WAL opened"
        );
        *slot = Some(log.clone());
        Ok(log)
    }

    fn open_blocking(&self, pchannel: &str, term: Term) -> Result<Arc<dyn Wal>, WalError> {
        let log = self.log()?;
        let dir = self.root.join(pchannel);
        self.fs
            .create_dir_all(&dir)
            .map_err(io_err(pchannel, "creating the pchannel directory"))?;
        claim_term(&*self.fs, &dir, pchannel, term)?;
        let chan = log.chan(pchannel);
        *lock(&chan.skipped) = read_skipped(&*self.fs, &dir, pchannel)?;
        for r in lock(&chan.skipped).iter() {
            warn!(pchannel, skipped = %format!("{}..{}", r.start, r.end),
                "damaged records skipped by an operator (audit: {SKIPPED_FILE})");
        }
        let persisted_first = read_term(&*self.fs, &dir.join(FIRST_FILE), pchannel)?;
        {
            // Records from the persisted first id (0 if never truncated) up to the first one
            // found were lost to damage (nothing else removes them): keep their places.
            let expected = persisted_first.map_or(0, |t| t.0);
            let mut ix = lock(&chan.index);
            if let Some(front) = ix.locs.front().copied()
                && ix.first_id > expected
            {
                let lost = expected..ix.first_id;
                warn!(pchannel, damaged = %format!("{}..{}", lost.start, lost.end),
                    "the pchannel's first records were lost to damage");
                for _ in lost.clone() {
                    ix.locs.push_front(Loc { len: 0, ..front });
                }
                ix.first_id = expected;
                drop(ix);
                chan.mark_damaged(lost);
            }
        }
        // Ids never restart: the persisted first id holds even when no record is left.
        if let Some(Term(first)) = persisted_first {
            let mut ix = lock(&chan.index);
            if ix.first_id < first {
                // Records below it may survive in a segment another pchannel still needs.
                let n = ((first - ix.first_id) as usize).min(ix.locs.len());
                for loc in ix.locs.drain(..n) {
                    chan.size.fetch_sub(u64::from(loc.len), Ordering::Relaxed);
                }
                ix.first_id = first;
                if chan.durable_end.load(Ordering::Acquire) < first {
                    chan.durable_end.store(first, Ordering::Release);
                }
            }
        }
        let state = Arc::new(HandleState {
            pchannel: pchannel.to_owned(),
            term,
            fenced_by: AtomicU64::new(0),
            closed: AtomicBool::new(false),
        });
        lock(&self.handles).insert(pchannel.to_owned(), Arc::downgrade(&state));
        let next = chan.durable_end.load(Ordering::Acquire);
        Ok(Arc::new(SharedWal {
            log,
            chan,
            state,
            next_id: Mutex::new(next),
        }))
    }
}

impl WalStorage for SharedLogStorage {
    fn name(&self) -> &'static str {
        "local-shared"
    }

    fn sync_count(&self) -> Option<u64> {
        Some(self.syncs.load(Ordering::Relaxed))
    }

    fn open<'a>(
        &'a self,
        pchannel: &'a str,
        term: Term,
    ) -> BoxFuture<'a, Result<Arc<dyn Wal>, WalError>> {
        async move {
            validate_channel_name(pchannel).map_err(WalError::InvalidArgument)?;
            let previous = lock(&self.handles).get(pchannel).and_then(Weak::upgrade);
            if let Some(prev) = previous {
                if let Some(e) = stale_term(pchannel, term, prev.term) {
                    return Err(e);
                }
                prev.fenced_by.store(term.0, Ordering::SeqCst);
                // Appends the old handle already queued are answered (fenced) before ours.
                if let Ok(log) = self.log() {
                    let (tx, rx) = oneshot::channel();
                    if log.send(Cmd::Barrier(tx)) {
                        let _ = rx.await;
                    }
                }
            }
            // The first open scans the whole log: keep the runtime's other tasks moving.
            blocking(|| self.open_blocking(pchannel, term))
        }
        .boxed()
    }
}

/// Runs blocking file work: on a multi-thread runtime the worker hands its other tasks over
/// first; elsewhere (a current-thread runtime, no runtime) it just runs.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// A handle on one pchannel of the shared log.
#[derive(Debug)]
pub struct SharedWal {
    log: Arc<Log>,
    chan: Arc<Chan>,
    state: Arc<HandleState>,
    next_id: Mutex<u64>,
}

impl Wal for SharedWal {
    fn pchannel(&self) -> &str {
        &self.chan.name
    }

    fn writable(&self) -> Result<(), WalError> {
        self.log.space.check(&self.chan.name)
    }

    fn damaged(&self) -> Vec<std::ops::Range<MessageId>> {
        let skipped = lock(&self.chan.skipped).clone();
        lock(&self.chan.damaged)
            .iter()
            .flat_map(|r| skipped.subtract(r.clone()))
            .map(|r| MessageId(r.start)..MessageId(r.end))
            .collect()
    }

    fn term(&self) -> Term {
        self.state.term
    }

    fn append(&self, record: Bytes) -> BoxFuture<'static, Result<MessageId, WalError>> {
        if record.len() > format::MAX_RECORD_LEN - 512 {
            let err = WalError::TooLarge {
                size: record.len(),
                limit: format::MAX_RECORD_LEN - 512,
            };
            return futures::future::ready(Err(err)).boxed();
        }
        if let Some(e) = self.state.refusal() {
            return futures::future::ready(Err(e)).boxed();
        }
        let (tx, rx) = oneshot::channel();
        {
            // Id assignment and enqueueing under one lock: ids follow call order.
            let mut next = lock(&self.next_id);
            let job = Job {
                chan: self.chan.clone(),
                handle: self.state.clone(),
                id: *next,
                record,
                ack: tx,
            };
            if !self.log.send(Cmd::Append(job)) {
                let err = WalError::Closed {
                    pchannel: self.chan.name.clone(),
                    reason: "the log's writer stopped".into(),
                };
                return futures::future::ready(Err(err)).boxed();
            }
            *next += 1;
        }
        let closed = WalError::Closed {
            pchannel: self.chan.name.clone(),
            reason: "writer stopped before acknowledging".into(),
        };
        async move { rx.await.unwrap_or(Err(closed)) }.boxed()
    }

    fn next_id(&self) -> MessageId {
        MessageId(*lock(&self.next_id))
    }

    fn first_id(&self) -> MessageId {
        MessageId(lock(&self.chan.index).first_id)
    }

    fn durable_end(&self) -> MessageId {
        MessageId(self.chan.durable_end.load(Ordering::Acquire))
    }

    fn size_bytes(&self) -> u64 {
        self.chan.size.load(Ordering::Relaxed)
    }

    fn sync_count(&self) -> u64 {
        // Group commits are shared: the storage's own count is the number of fdatasyncs.
        self.chan.syncs.load(Ordering::Relaxed)
    }

    fn read(&self, from: ReadFrom) -> Result<Box<dyn WalReader>, WalError> {
        let first = lock(&self.chan.index).first_id;
        let next = match from {
            ReadFrom::Earliest => first,
            ReadFrom::Latest => self.chan.durable_end.load(Ordering::Acquire),
            ReadFrom::At(id) => id.0,
            ReadFrom::After(id) => id.0.saturating_add(1),
        };
        if next < first {
            return Err(WalError::Truncated {
                pchannel: self.chan.name.clone(),
                requested: MessageId(next),
                first: MessageId(first),
            });
        }
        Ok(Box::new(SharedReader {
            dir: self.log.dir.clone(),
            fs: self.log.fs.clone(),
            chan: self.chan.clone(),
            next,
            file: None,
            map: None,
            ready: VecDeque::new(),
        }))
    }

    fn truncate(&self, below: MessageId) -> BoxFuture<'_, Result<(), WalError>> {
        let (tx, rx) = oneshot::channel();
        if !self.log.send(Cmd::Truncate(self.chan.clone(), below, tx)) {
            let err = WalError::Closed {
                pchannel: self.chan.name.clone(),
                reason: "the log's writer stopped".into(),
            };
            return futures::future::ready(Err(err)).boxed();
        }
        async move { rx.await.unwrap_or(Ok(())) }.boxed()
    }

    fn close(&self) -> BoxFuture<'_, Result<(), WalError>> {
        // Everything this handle queued is answered before the barrier is.
        let (tx, rx) = oneshot::channel();
        let sent = self.log.send(Cmd::Barrier(tx));
        let state = self.state.clone();
        async move {
            if sent {
                let _ = rx.await;
            }
            state.closed.store(true, Ordering::SeqCst);
            Ok(())
        }
        .boxed()
    }
}

impl Drop for SharedWal {
    fn drop(&mut self) {
        self.state.closed.store(true, Ordering::SeqCst);
    }
}
