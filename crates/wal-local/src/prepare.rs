//! Segments made ready ahead of need, off the writer's path.
//!
//! A commit that overwrites space already written and synced costs one `fdatasync` of the data;
//! one that grows the file also commits metadata. Zero-filling ahead inline (a few MiB at a
//! time) made the sizes change rarely but put a 4 MiB `write` and an `fdatasync` of 4 MiB in
//! front of some commits: measured with `perf trace` under `walden bench append`, 5–10 ms each,
//! every ~100 ms, which was the append p99 and ~15% of the throughput.
//!
//! So a thread of its own writes the next segment in full (header, then zeros up to the segment
//! size, synced a chunk at a time so a WAL `fdatasync` never queues behind much of it) under a
//! temporary name; the writer renames it into place when it rolls. A leftover temporary file
//! (a crash mid-preparation) holds no record and is deleted at open.

use std::{
    io,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread,
};

use tracing::warn;

use crate::{
    fs::{FileSystem, WalFile},
    shared::header,
    space::Space,
};

/// Zeros written (and synced) at a time: bounds how long a WAL sync can wait behind one.
const CHUNK: usize = 256 << 10;
/// After each chunk, the thread rests this many times as long as the chunk took, so it keeps
/// the disk busy at most a third of the time.
const REST: u32 = 2;

pub(crate) fn prepared_name(seq: u64) -> String {
    format!("{seq:020}.prep")
}

pub(crate) fn is_prepared_name(n: &str) -> bool {
    n.ends_with(".prep")
}

type Prepared = (u64, io::Result<Box<dyn WalFile>>);

/// The writer's handle on the preparing thread. Dropping it stops the thread (after at most one
/// chunk) and waits for it, so no file is written after the log is gone.
pub(crate) struct Preparer {
    dir: PathBuf,
    fs: Arc<dyn FileSystem>,
    requests: Option<mpsc::Sender<u64>>,
    done: mpsc::Receiver<Prepared>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
    /// The segment the writer needs next.
    target: Option<u64>,
    /// A preparation is under way (one at a time).
    busy: bool,
    ready: Option<(u64, Box<dyn WalFile>)>,
    /// The last segment whose preparation failed.
    failed: Option<u64>,
}

impl Preparer {
    /// Starts the thread; `bytes` is a segment's full size.
    pub(crate) fn start(
        fs: Arc<dyn FileSystem>,
        dir: PathBuf,
        bytes: u64,
        space: Arc<Space>,
    ) -> io::Result<Self> {
        let (requests, rx) = mpsc::channel::<u64>();
        let (tx, done) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (fs, dir, stop) = (fs.clone(), dir.clone(), stop.clone());
            thread::Builder::new()
                .name("wal-prepare".into())
                .spawn(move || {
                    while let Ok(seq) = rx.recv() {
                        // A whole segment ahead of need only from space above the reserve.
                        let r = if space.room_for(bytes) {
                            prepare(&*fs, &dir, seq, bytes, &header(seq), &stop)
                        } else {
                            Err(io::Error::new(
                                io::ErrorKind::StorageFull,
                                "no room for a whole segment above wal_local.min_free_bytes",
                            ))
                        };
                        if tx.send((seq, r)).is_err() {
                            break;
                        }
                    }
                })?
        };
        Ok(Self {
            dir,
            fs,
            requests: Some(requests),
            done,
            stop,
            thread: Some(thread),
            target: None,
            busy: false,
            ready: None,
            failed: None,
        })
    }

    /// Segment `seq` is the next one the writer will need: prepare it (and drop any other).
    pub(crate) fn want(&mut self, seq: u64) {
        self.target = Some(seq);
        self.poll();
    }

    /// Whether segment `seq` is ready now (never waits).
    pub(crate) fn is_ready(&mut self, seq: u64) -> bool {
        self.poll();
        self.ready.as_ref().is_some_and(|(s, _)| *s == seq)
    }

    /// Segment `seq`, if ready, renamed to `path` (the caller syncs the directory).
    pub(crate) fn take(&mut self, seq: u64, path: &Path) -> io::Result<Option<Box<dyn WalFile>>> {
        if !self.is_ready(seq) {
            return Ok(None);
        }
        self.fs.rename(&self.dir.join(prepared_name(seq)), path)?;
        Ok(self.ready.take().map(|(_, file)| file))
    }

    /// Collects finished preparations, drops one the writer no longer needs (it went past it,
    /// creating the segment itself), and asks for the target if nothing is under way. A target
    /// that failed is not asked for again: the next roll asks for the next one.
    fn poll(&mut self) {
        while let Ok((seq, r)) = self.done.try_recv() {
            self.busy = false;
            match r {
                Ok(f) => {
                    if let Some((old, _)) = self.ready.replace((seq, f)) {
                        self.discard(old);
                    }
                }
                Err(e) => {
                    if e.kind() != io::ErrorKind::Interrupted {
                        warn!(segment = seq, error = %e, "could not prepare a segment; zero-filling inline");
                    }
                    self.discard(seq);
                    self.failed = Some(seq);
                }
            }
        }
        let Some(target) = self.target else {
            return;
        };
        if let Some((s, _)) = &self.ready
            && *s != target
        {
            let s = *s;
            self.ready = None;
            self.discard(s);
        }
        if !self.busy
            && self.ready.is_none()
            && self.failed != Some(target)
            && let Some(r) = &self.requests
            && r.send(target).is_ok()
        {
            self.busy = true;
        }
    }

    fn discard(&self, seq: u64) {
        let _ = self.fs.remove(&self.dir.join(prepared_name(seq)));
    }
}

impl Drop for Preparer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.requests.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // Whatever was prepared and not used is of no use to the next open.
        self.target = None;
        self.poll();
        if let Some((seq, _)) = self.ready.take() {
            self.discard(seq);
        }
    }
}

/// Writes `header` and zeros up to `bytes` into a fresh temporary file for segment `seq`.
fn prepare(
    fs: &dyn FileSystem,
    dir: &Path,
    seq: u64,
    bytes: u64,
    header: &[u8],
    stop: &AtomicBool,
) -> io::Result<Box<dyn WalFile>> {
    let path = dir.join(prepared_name(seq));
    match fs.remove(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut f = fs.create_new(&path)?;
    f.write_at(header, 0)?;
    let zeros = vec![0u8; CHUNK];
    let mut at = header.len() as u64;
    while at < bytes {
        if stop.load(Ordering::Relaxed) {
            return Err(io::Error::new(io::ErrorKind::Interrupted, "the log closed"));
        }
        let n = (bytes - at).min(CHUNK as u64) as usize;
        let t = std::time::Instant::now();
        f.write_at(&zeros[..n], at)?;
        f.sync_data()?;
        at += n as u64;
        thread::sleep(t.elapsed() * REST);
    }
    f.sync_data()?;
    Ok(f)
}
