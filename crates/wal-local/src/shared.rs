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

use crate::{
    LocalWalConfig, READ_CHUNK,
    format::{self, RecordAt},
    fs::{FileSystem, LockGuard, StdFs, WalFile},
    lock,
    open::{claim_term, encode_term, io_err, lock_dir, read_term, stale_term},
    prepare::{Preparer, is_prepared_name},
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

fn segment_name(seq: u64) -> String {
    format!("{seq:020}.log")
}

fn parse_segment_name(n: &str) -> Option<u64> {
    n.strip_suffix(".log")
        .filter(|s| s.len() == 20)
        .and_then(|s| s.parse().ok())
}

fn index_name(seq: u64) -> String {
    format!("{seq:020}.idx")
}

const INDEX_MAGIC: &[u8; 8] = b"WALDNIDX";

/// A sealed segment's index: `WALDNIDX | version u32 | seq u64 | n u32`, then per pchannel
/// `name_len u8 | name | first_id u64 | count u32 | count × (offset u64, length u32)`, then a
/// crc32c of everything before it.
fn encode_index(seq: u64, entries: &[(String, u64, Vec<Loc>)]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(INDEX_MAGIC);
    b.extend_from_slice(&VERSION.to_le_bytes());
    b.extend_from_slice(&seq.to_le_bytes());
    b.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for (name, first, locs) in entries {
        b.push(name.len() as u8);
        b.extend_from_slice(name.as_bytes());
        b.extend_from_slice(&first.to_le_bytes());
        b.extend_from_slice(&(locs.len() as u32).to_le_bytes());
        for l in locs {
            b.extend_from_slice(&l.off.to_le_bytes());
            b.extend_from_slice(&l.len.to_le_bytes());
        }
    }
    let crc = crc32c::crc32c(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    b
}

/// Reads what [`encode_index`] wrote; `None` for anything else.
fn decode_index(b: &[u8], seq: u64) -> Option<Vec<(String, u64, Vec<Loc>)>> {
    let (body, crc) = b.split_at_checked(b.len().checked_sub(4)?)?;
    if crc32c::crc32c(body).to_le_bytes() != crc {
        return None;
    }
    let mut r = body;
    let mut take = |n: usize| -> Option<&[u8]> {
        let (head, rest) = r.split_at_checked(n)?;
        r = rest;
        Some(head)
    };
    let u32_of = |s: &[u8]| u32::from_le_bytes(s.try_into().unwrap_or([0; 4]));
    let u64_of = |s: &[u8]| u64::from_le_bytes(s.try_into().unwrap_or([0; 8]));
    if take(8)? != INDEX_MAGIC || u32_of(take(4)?) != VERSION || u64_of(take(8)?) != seq {
        return None;
    }
    let n = u32_of(take(4)?);
    let mut out = Vec::new();
    for _ in 0..n {
        let name_len = take(1)?[0] as usize;
        let name = std::str::from_utf8(take(name_len)?).ok()?.to_owned();
        let first = u64_of(take(8)?);
        let count = u32_of(take(4)?) as usize;
        if count == 0 {
            return None;
        }
        let mut locs = Vec::with_capacity(count.min(1 << 20));
        for _ in 0..count {
            let off = u64_of(take(8)?);
            let len = u32_of(take(4)?);
            locs.push(Loc { seg: seq, off, len });
        }
        out.push((name, first, locs));
    }
    Some(out)
}

pub(crate) fn header(seq: u64) -> Vec<u8> {
    let mut h = Vec::with_capacity(HEADER_LEN);
    h.extend_from_slice(MAGIC);
    h.extend_from_slice(&VERSION.to_le_bytes());
    h.extend_from_slice(&seq.to_le_bytes());
    h
}

/// `id | name_len | name | payload`, framed as a record.
fn encode(id: u64, name: &str, payload: &[u8], buf: &mut Vec<u8>) {
    let body_len = 9 + name.len() + payload.len();
    let start = buf.len();
    buf.extend_from_slice(&(body_len as u32).to_le_bytes());
    buf.extend_from_slice(&[0; 4]);
    buf.extend_from_slice(&id.to_le_bytes());
    buf.push(name.len() as u8);
    buf.extend_from_slice(name.as_bytes());
    buf.extend_from_slice(payload);
    let crc = crc32c::crc32c_append(crc32c::crc32c(&buf[start..start + 4]), &buf[start + 8..]);
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// The (id, name, payload range within `body`) of a record body.
fn parse_body(body: &[u8]) -> Option<(u64, &str, std::ops::Range<usize>)> {
    let id = u64::from_le_bytes(body.get(..8)?.try_into().ok()?);
    let n = *body.get(8)? as usize;
    let name = std::str::from_utf8(body.get(9..9 + n)?).ok()?;
    Some((id, name, 9 + n..body.len()))
}

#[derive(Clone, Copy, Debug)]
struct Loc {
    seg: u64,
    /// Offset of the record (its length field) in the segment.
    off: u64,
    /// Whole record length, framing included.
    len: u32,
}

/// One pchannel's index and counters; outlives handles (a reopen keeps it).
#[derive(Debug)]
struct Chan {
    name: String,
    index: Mutex<Index>,
    durable_end: AtomicU64,
    size: AtomicU64,
    /// Group commits that carried this pchannel's records.
    syncs: AtomicU64,
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
    ) -> Result<Arc<Self>, WalError> {
        let dir = root.join("log");
        fs.create_dir_all(&dir)
            .map_err(io_err(LOG, format!("creating {}", dir.display())))?;
        let lock_guard = lock_dir(&*fs, root, LOG)?;
        let mut seqs: Vec<u64> = fs
            .list(&dir)
            .map_err(io_err(LOG, "listing segments"))?
            .iter()
            .filter_map(|n| parse_segment_name(n))
            .collect();
        seqs.sort_unstable();
        // Index files whose segment is gone (a crash between the two removals) are leftovers,
        // as are segments prepared but never used (they hold no record).
        for name in fs.list(&dir).map_err(io_err(LOG, "listing segments"))? {
            if is_prepared_name(&name) {
                let _ = fs.remove(&dir.join(&name));
            } else if let Some(seq) = name
                .strip_suffix(".idx")
                .and_then(|s| s.parse::<u64>().ok())
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
        let corrupted = |detail: String| WalError::Corrupted {
            pchannel: LOG.into(),
            location: location.clone(),
            detail,
        };
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
            return Err(corrupted("bad segment header".into()));
        }
        let mut seg = Segment::default();
        let mut off = HEADER_LEN;
        // Records of one pchannel tend to come in runs: skip the map lookup for those.
        let mut cur: Option<Arc<Chan>> = None;
        loop {
            match format::record_at(&b[off..]) {
                RecordAt::Valid { start, len } => {
                    let body = &b[off + start..off + start + len];
                    let (id, name, _) = parse_body(body)
                        .ok_or_else(|| corrupted(format!("record at {off} has no valid body")))?;
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
                    } else if id != expected {
                        return Err(corrupted(format!(
                            "{name}: id {id} at {off}, expected {expected}"
                        )));
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
                        return Err(corrupted(format!("record at {off}: {damage:?}")));
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

fn new_segment(
    fs: &dyn FileSystem,
    dir: &Path,
    seq: u64,
) -> Result<(Box<dyn WalFile>, u64), WalError> {
    let mut f = fs
        .create_new(&dir.join(segment_name(seq)))
        .map_err(io_err(LOG, "creating a segment"))?;
    f.append(&header(seq))
        .map_err(io_err(LOG, "writing a segment header"))?;
    f.sync_data()
        .map_err(io_err(LOG, "syncing a segment header"))?;
    fs.sync_dir(dir)
        .map_err(io_err(LOG, "syncing the log directory"))?;
    Ok((f, HEADER_LEN as u64))
}

struct Writer {
    log: Weak<Log>,
    dir: PathBuf,
    fs: Arc<dyn FileSystem>,
    rx: mpsc::Receiver<Cmd>,
    file: Box<dyn WalFile>,
    seq: u64,
    /// Where the next record goes.
    len: u64,
    /// The file's length: zeros written ahead of `len`, so that commits overwrite instead of
    /// growing the file.
    zeroed: u64,
    zeros: Vec<u8>,
    /// Prepares the next segment in the background (where overwriting is cheap).
    prep: Option<Preparer>,
    /// Threads writing sealed segments' index files.
    indexers: Vec<thread::JoinHandle<()>>,
    config: LocalWalConfig,
    failed: Failed,
    _lock: Box<dyn LockGuard>,
}

impl Drop for Writer {
    /// Index files are finished before the directory lock goes (with the fields, after this).
    fn drop(&mut self) {
        for h in self.indexers.drain(..) {
            let _ = h.join();
        }
    }
}

impl Writer {
    fn run(mut self) {
        if self.file.cheap_overwrite() {
            match Preparer::start(self.fs.clone(), self.dir.clone(), self.config.segment_bytes) {
                Ok(mut p) => {
                    p.want(self.seq + 1);
                    self.prep = Some(p);
                }
                Err(e) => warn!(error = %e, "could not start the segment preparer"),
            }
        }
        let mut batch: Vec<Job> = Vec::new();
        let mut buf: Vec<u8> = Vec::with_capacity(self.config.max_batch_bytes);
        while let Ok(cmd) = self.rx.recv() {
            let control = gather(
                &self.rx,
                cmd,
                self.config.max_batch_bytes,
                &mut batch,
                |c| match c {
                    Cmd::Append(j) => {
                        let n = j.record.len();
                        Ok((j, n))
                    }
                    other => Err(other),
                },
            );
            if !batch.is_empty() {
                self.commit(&mut batch, &mut buf);
            }
            match control {
                Some(Cmd::Truncate(chan, below, ack)) => {
                    let _ = ack.send(self.truncate(&chan, below));
                }
                Some(Cmd::Barrier(ack)) => {
                    let _ = ack.send(());
                }
                _ => {}
            }
        }
    }

    fn failure(&self, pchannel: &str) -> WalError {
        self.failed
            .error(pchannel, "an earlier write failed; reopen")
    }

    /// One group commit for every pchannel in the batch.
    fn commit(&mut self, batch: &mut Vec<Job>, buf: &mut Vec<u8>) {
        let Some(log) = self.log.upgrade() else {
            for j in batch.drain(..) {
                let _ = j.ack.send(Err(WalError::Closed {
                    pchannel: j.chan.name.clone(),
                    reason: "the log was closed".into(),
                }));
            }
            return;
        };
        // Fenced or failed appends are answered without writing.
        let mut live = Vec::with_capacity(batch.len());
        for j in batch.drain(..) {
            if let Some(e) = j.handle.refusal() {
                let _ = j.ack.send(Err(e));
            } else if self.failed.is_set() {
                let _ = j.ack.send(Err(self.failure(&j.chan.name)));
            } else {
                live.push(j);
            }
        }
        if live.is_empty() {
            return;
        }
        let mut placed: Vec<Loc> = Vec::with_capacity(live.len());
        buf.clear();
        let first_seq = self.seq;
        let mut result = Ok(());
        for j in &live {
            let need = (8 + 9 + j.chan.name.len() + j.record.len()) as u64;
            let end = self.len + buf.len() as u64 + need;
            // Out of zeroed space with a whole prepared segment waiting: roll early rather than
            // zero-fill inline (a fresh log's first segment, one left by a crash).
            let early =
                end > self.zeroed && self.prep.as_mut().is_some_and(|p| p.is_ready(self.seq + 1));
            if (end > self.config.segment_bytes || early)
                && self.len + (buf.len() as u64) > HEADER_LEN as u64
            {
                result = self.write_out(&log, buf).and_then(|()| self.roll(&log));
                if result.is_err() {
                    break;
                }
            }
            let off = self.len + buf.len() as u64;
            encode(j.id, &j.chan.name, &j.record, buf);
            placed.push(Loc {
                seg: self.seq,
                off,
                len: (self.len + buf.len() as u64 - off) as u32,
            });
        }
        let result = result.and_then(|()| self.write_out(&log, buf));
        if let Err(e) = result {
            warn!(error = %e, "shared WAL write failed; failing the log");
            self.failed.set(&e);
            log.failed.store(true, Ordering::SeqCst);
            for j in live {
                let _ = j.ack.send(Err(self.failure(&j.chan.name)));
            }
            return;
        }
        {
            let mut segs = lock(&log.segments);
            for (j, loc) in live.iter().zip(&placed) {
                let max_ids = &mut segs.entry(loc.seg).or_default().max_ids;
                // Only a pchannel's first record in a segment allocates its name.
                match max_ids.get_mut(&j.chan.name) {
                    Some(max) => *max = j.id,
                    None => {
                        max_ids.insert(j.chan.name.clone(), j.id);
                    }
                }
            }
        }
        let mut carried: Vec<*const Chan> = Vec::new();
        for j in &live {
            let p = Arc::as_ptr(&j.chan);
            if !carried.contains(&p) {
                carried.push(p);
                j.chan.syncs.fetch_add(1, Ordering::Relaxed);
            }
        }
        let mut acks = Vec::with_capacity(live.len());
        for (j, loc) in live.into_iter().zip(placed) {
            {
                let mut ix = lock(&j.chan.index);
                if ix.locs.is_empty() && ix.first_id < j.id {
                    ix.first_id = j.id;
                }
                ix.locs.push_back(loc);
            }
            j.chan.size.fetch_add(u64::from(loc.len), Ordering::Relaxed);
            // Readers may see the record before its writer hears back; never the reverse.
            j.chan.durable_end.store(j.id + 1, Ordering::Release);
            acks.push((j.ack, j.id));
        }
        if self.seq != first_seq {
            // Only now is every record of the sealed segments in its pchannel's index.
            for sealed in first_seq..self.seq {
                self.write_index(&log, sealed);
            }
            self.delete_unused(&log);
        }
        // Answer only once this thread holds no reference to the log: whoever drops the last
        // one after hearing back then stops (joins) the writer and frees the lock at once.
        drop(log);
        for (ack, id) in acks {
            let _ = ack.send(Ok(MessageId(id)));
        }
    }

    fn write_out(&mut self, log: &Log, buf: &mut Vec<u8>) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        self.make_room(buf.len() as u64)?;
        self.file.write_at(buf, self.len)?;
        self.file.sync_data()?;
        self.len += buf.len() as u64;
        log.syncs.fetch_add(1, Ordering::Relaxed);
        buf.clear();
        Ok(())
    }

    /// Where overwriting is cheaper to sync than appending, writes zeros ahead of the write
    /// position, a few MiB at a time: the size changes (and the journal commits) once per
    /// chunk instead of once per group commit. The zeros are made durable by the next
    /// `fdatasync`; recovery reads zeros after the last record as the clean end.
    fn make_room(&mut self, n: u64) -> io::Result<()> {
        if !self.file.cheap_overwrite() {
            self.zeroed = self.len;
            return Ok(());
        }
        while self.len + n > self.zeroed {
            if self.zeros.is_empty() {
                self.zeros = vec![0; PREZERO_BYTES];
            }
            let room = self.config.segment_bytes.saturating_sub(self.zeroed).max(n);
            let chunk = (PREZERO_BYTES as u64).min(room) as usize;
            self.file.write_at(&self.zeros[..chunk], self.zeroed)?;
            self.zeroed += chunk as u64;
        }
        Ok(())
    }

    fn roll(&mut self, log: &Log) -> io::Result<()> {
        let seq = self.seq + 1;
        let path = self.dir.join(segment_name(seq));
        let prepared = match &mut self.prep {
            Some(p) => p.take(seq, &path)?,
            None => None,
        };
        let (f, zeroed) = match prepared {
            Some(f) => {
                let zeroed = f.len()?;
                (f, zeroed)
            }
            None => {
                let mut f = self.fs.create_new(&path)?;
                f.append(&header(seq))?;
                f.sync_data()?;
                (f, HEADER_LEN as u64)
            }
        };
        self.fs.sync_dir(&self.dir)?;
        self.file = f;
        self.seq = seq;
        self.len = HEADER_LEN as u64;
        self.zeroed = zeroed;
        lock(&log.segments).insert(seq, Segment::default());
        if let Some(p) = &mut self.prep {
            p.want(seq + 1);
        }
        Ok(())
    }

    /// Writes sealed segment `seq`'s index file, so the next open need not read the segment.
    /// A failure only costs that open a scan, so a thread of its own writes it while this one
    /// acknowledges the commit that sealed the segment: encoding ~60 000 locations and the
    /// file's write, `fsync`, rename and directory `fsync` held that commit and the next ones
    /// 5–18 ms (`perf trace` under `walden bench append`).
    fn write_index(&mut self, log: &Log, seq: u64) {
        let entries = self.index_entries(log, seq);
        let (fs, path) = (self.fs.clone(), self.dir.join(index_name(seq)));
        self.indexers.retain(|h| !h.is_finished());
        let spawned = thread::Builder::new()
            .name("wal-index".into())
            .spawn(move || {
                let b = encode_index(seq, &entries);
                if let Err(e) = fs.write_atomic(&path, &b) {
                    warn!(segment = seq, error = %e, "could not write a segment index");
                }
            });
        match spawned {
            Ok(h) => self.indexers.push(h),
            Err(e) => warn!(segment = seq, error = %e, "no thread for a segment index"),
        }
    }

    /// Every pchannel's records in sealed segment `seq`.
    fn index_entries(&self, log: &Log, seq: u64) -> Vec<(String, u64, Vec<Loc>)> {
        let chans: Vec<Arc<Chan>> = lock(&log.chans).values().cloned().collect();
        let mut entries = Vec::new();
        for c in chans {
            let ix = lock(&c.index);
            // Locations are in segment order: find this segment's run without walking the
            // older ones.
            let start = ix.locs.partition_point(|l| l.seg < seq);
            let end = ix.locs.partition_point(|l| l.seg <= seq);
            if start < end {
                let locs: Vec<Loc> = ix.locs.range(start..end).copied().collect();
                entries.push((c.name.clone(), ix.first_id + start as u64, locs));
            }
        }
        entries
    }

    /// Raises `chan`'s first id to `below` (persisted first), then deletes sealed segments no
    /// pchannel needs any more.
    fn truncate(&mut self, chan: &Chan, below: MessageId) -> Result<(), WalError> {
        let Some(log) = self.log.upgrade() else {
            return Ok(());
        };
        let p = chan.name.as_str();
        let end = chan.durable_end.load(Ordering::Acquire);
        let below = below.0.min(end);
        {
            let ix = lock(&chan.index);
            if below <= ix.first_id {
                return Ok(());
            }
        }
        let dir = log.root.join(p);
        self.fs
            .write_atomic(&dir.join(FIRST_FILE), &encode_term(Term(below)))
            .map_err(io_err(p, "writing the FIRST file"))?;
        {
            let mut ix = lock(&chan.index);
            let drop_n = ((below - ix.first_id) as usize).min(ix.locs.len());
            for loc in ix.locs.drain(..drop_n) {
                chan.size.fetch_sub(u64::from(loc.len), Ordering::Relaxed);
            }
            ix.first_id = below;
        }
        self.delete_unused(&log);
        Ok(())
    }

    fn delete_unused(&mut self, log: &Log) {
        let firsts: HashMap<String, u64> = lock(&log.chans)
            .iter()
            .map(|(n, c)| (n.clone(), lock(&c.index).first_id))
            .collect();
        let doomed: Vec<u64> = lock(&log.segments)
            .iter()
            .filter(|(seq, s)| {
                **seq < self.seq
                    && s.max_ids
                        .iter()
                        .all(|(n, max)| firsts.get(n).is_some_and(|f| f > max))
            })
            .map(|(seq, _)| *seq)
            .collect();
        for seq in doomed {
            let path = self.dir.join(segment_name(seq));
            if let Err(e) = self.fs.remove(&path) {
                warn!(segment = %path.display(), error = %e, "could not remove a segment");
                continue;
            }
            let _ = self.fs.remove(&self.dir.join(index_name(seq)));
            lock(&log.segments).remove(&seq);
        }
        let _ = self.fs.sync_dir(&self.dir);
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
        Self {
            root: root.into(),
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
        // Ids never restart: the persisted first id holds even when no record is left.
        if let Some(Term(first)) = read_term(&*self.fs, &dir.join(FIRST_FILE), pchannel)? {
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

#[derive(Debug)]
struct SharedReader {
    /// The log's directory and file system: a reader does not keep the log (its writer and
    /// lock) alive.
    dir: PathBuf,
    fs: Arc<dyn FileSystem>,
    chan: Arc<Chan>,
    next: u64,
    file: Option<(u64, Box<dyn WalFile>)>,
    /// The segment being read, mapped (where the file system can): its records are sliced out
    /// without a copy.
    map: Option<(u64, Bytes)>,
    ready: VecDeque<(MessageId, Bytes)>,
}

/// Records taken from the index at a time (one lock of it) when the segment is mapped.
const MAPPED_RUN: usize = 1024;

impl SharedReader {
    /// Takes the next run of this pchannel's records in one segment into `ready`: sliced out of
    /// the mapped segment, or read with one `read_at` where the file system cannot map (then
    /// the run is bounded by how far apart its records sit).
    fn fill(&mut self) -> Result<(), WalError> {
        let p = self.chan.name.clone();
        let end = self.chan.durable_end.load(Ordering::Acquire);
        if self.next >= end {
            return Ok(());
        }
        let mapped = self.map.as_ref().map(|(seg, _)| *seg);
        let locs: Vec<Loc> = {
            let ix = lock(&self.chan.index);
            if self.next < ix.first_id {
                return Err(WalError::Truncated {
                    pchannel: p,
                    requested: MessageId(self.next),
                    first: MessageId(ix.first_id),
                });
            }
            let from = (self.next - ix.first_id) as usize;
            let avail = (end - self.next) as usize;
            let to = (from + avail).min(ix.locs.len()).min(from + MAPPED_RUN);
            let mut run = Vec::new();
            for loc in ix.locs.range(from.min(to)..to) {
                if let Some(first) = run.first() {
                    let first: &Loc = first;
                    if loc.seg != first.seg
                        || (mapped != Some(loc.seg)
                            && loc.off + u64::from(loc.len) - first.off > READ_CHUNK as u64)
                    {
                        break;
                    }
                }
                run.push(*loc);
            }
            run
        };
        let (Some(first), Some(last)) = (locs.first().copied(), locs.last().copied()) else {
            return Ok(());
        };
        let span_end = last.off + u64::from(last.len);
        let (chunk, base) = match self.mapped(first.seg, span_end)? {
            Some(map) => (map, 0),
            None => (self.read_span(first.seg, first.off, span_end)?, first.off),
        };
        for (k, loc) in locs.iter().enumerate() {
            let at = (loc.off - base) as usize;
            let id = self.next + k as u64;
            let corrupted = |detail: &str| WalError::Corrupted {
                pchannel: p.clone(),
                location: format!("{} at {}", segment_name(loc.seg), loc.off),
                detail: detail.to_owned(),
            };
            let bytes = chunk
                .get(at..at + loc.len as usize)
                .ok_or_else(|| corrupted("record cut short"))?;
            let RecordAt::Valid { start, len } = format::record_at(bytes) else {
                return Err(corrupted("damaged record"));
            };
            let body = &bytes[start..start + len];
            let (rid, name, payload) =
                parse_body(body).ok_or_else(|| corrupted("damaged record body"))?;
            if rid != id || name != p {
                return Err(corrupted("index points at another record"));
            }
            let s = at + start;
            self.ready.push_back((
                MessageId(id),
                chunk.slice(s + payload.start..s + payload.end),
            ));
        }
        self.next += locs.len() as u64;
        Ok(())
    }

    /// Segment `seg` mapped, at least up to `end`; `None` where the file system cannot map.
    fn mapped(&mut self, seg: u64, end: u64) -> Result<Option<Bytes>, WalError> {
        if let Some((s, map)) = &self.map
            && *s == seg
            && map.len() as u64 >= end
        {
            return Ok(Some(map.clone()));
        }
        // A new segment, or the active one grown past the mapping (a fresh log zero-fills
        // ahead a few MiB at a time).
        self.map = None;
        let f = self.open(seg)?;
        let map = f
            .map()
            .map_err(io_err(&self.chan.name, "mapping the shared log"))?;
        self.map = map.clone().map(|m| (seg, m));
        Ok(map)
    }

    /// The segment's file, kept open while it is read.
    fn open(&mut self, seg: u64) -> Result<&dyn WalFile, WalError> {
        let file = match self.file.take() {
            Some((s, f)) if s == seg => f,
            _ => {
                let path = self.dir.join(segment_name(seg));
                self.fs.open(&path).map_err(io_err(
                    &self.chan.name,
                    format!("opening {}", path.display()),
                ))?
            }
        };
        Ok(&*self.file.insert((seg, file)).1)
    }

    /// Bytes `from..to` of segment `seg`, read with one `read_at`. Only file systems that
    /// cannot map (the test fakes) come here, so the buffer is not kept for reuse.
    fn read_span(&mut self, seg: u64, from: u64, to: u64) -> Result<Bytes, WalError> {
        let mut buf = vec![0; (to - from) as usize];
        let read = self
            .open(seg)?
            .read_at(&mut buf, from)
            .map_err(io_err(&self.chan.name, "reading the shared log"))?;
        buf.truncate(read);
        Ok(Bytes::from(buf))
    }
}

impl WalReader for SharedReader {
    fn next(&mut self) -> BoxFuture<'_, Result<Option<(MessageId, Bytes)>, WalError>> {
        async move {
            if self.ready.is_empty() {
                // Page-cache reads, like the per-pchannel reader's.
                self.fill()?;
            }
            Ok(self.ready.pop_front())
        }
        .boxed()
    }
}
