//! Free space on the WAL's file system, and what the WAL does about it.
//!
//! Appends are refused ([`WalError::NoSpace`], RESOURCE_EXHAUSTED) while fewer than
//! `wal_local.min_free_bytes` are free, before they get a place: nothing is half written, no
//! handle fails, and no reopen (new term) follows. They are taken again as soon as space is
//! freed. Pre-allocation (prepared segments, zeros written ahead) only uses space above that
//! reserve, and falls back to growing the file as records come. So the server's own writes
//! always leave the reserve for what recovery and the metastore need at the next start.
//!
//! A file system filled by something else can still reach zero. For that the data dir keeps a
//! ballast, [`Reserve`] (`RESERVE`, half of `min_free_bytes`): a start that finds less than
//! the reserve free deletes it first, so recovery can write its few bytes and reads are served.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tracing::{info, warn};
use walden_wal_api::WalError;

use crate::fs::FileSystem;

/// How long a measurement of free space is reused (appends check it; a `statvfs` each would
/// cost more than the append).
const FRESH: Duration = Duration::from_millis(100);

/// Free space of one directory's file system, measured at most every [`FRESH`].
#[derive(Debug)]
pub(crate) struct Space {
    fs: Arc<dyn FileSystem>,
    dir: PathBuf,
    min_free: u64,
    last: Mutex<Option<(Instant, Option<u64>)>>,
}

impl Space {
    pub(crate) fn new(fs: Arc<dyn FileSystem>, dir: PathBuf, min_free: u64) -> Self {
        Self {
            fs,
            dir,
            min_free,
            last: Mutex::new(None),
        }
    }

    /// Bytes free to this process, or `None` where the file system cannot say.
    pub(crate) fn free(&self) -> Option<u64> {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((at, free)) = *last
            && at.elapsed() < FRESH
        {
            return free;
        }
        let free = self.fs.free_bytes(&self.dir).ok().flatten();
        *last = Some((Instant::now(), free));
        free
    }

    /// Forgets the last measurement (after the writer itself used space).
    pub(crate) fn invalidate(&self) {
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// `Err(NoSpace)` while less than the reserve is free.
    pub(crate) fn check(&self, pchannel: &str) -> Result<(), WalError> {
        match self.free() {
            Some(free) if free < self.min_free => Err(WalError::NoSpace {
                pchannel: pchannel.to_owned(),
                detail: format!(
                    "disk full: {free} bytes free on the file system of {}, below \
                     wal_local.min_free_bytes ({}); writes resume once space is freed",
                    self.dir.display(),
                    self.min_free
                ),
            }),
            _ => Ok(()),
        }
    }

    /// Whether `bytes` more can be taken ahead of need and still leave the reserve.
    pub(crate) fn room_for(&self, bytes: u64) -> bool {
        self.free()
            .is_none_or(|free| free >= bytes.saturating_add(self.min_free))
    }
}

/// The data dir's ballast: space held back so that a start on a file system filled by
/// something else can still recover.
#[derive(Debug)]
pub struct Reserve {
    fs: Arc<dyn FileSystem>,
    path: PathBuf,
    bytes: u64,
}

/// Name of the ballast file.
pub const RESERVE_FILE: &str = "RESERVE";

impl Reserve {
    /// The ballast of `dir`, sized for a reserve of `min_free_bytes`.
    pub fn new(fs: Arc<dyn FileSystem>, dir: &Path, min_free_bytes: u64) -> Self {
        Self {
            fs,
            path: dir.join(RESERVE_FILE),
            bytes: min_free_bytes / 2,
        }
    }

    /// At start, before anything is written: with less than the reserve free, deletes the
    /// ballast (and says so). Returns whether it did.
    pub fn release_if_short(&self, min_free_bytes: u64) -> bool {
        let free = self
            .path
            .parent()
            .and_then(|d| self.fs.free_bytes(d).ok().flatten());
        if free.is_none_or(|f| f >= min_free_bytes) {
            return false;
        }
        match self.fs.remove(&self.path) {
            Ok(()) => {
                warn!(
                    path = %self.path.display(),
                    free = free.unwrap_or(0),
                    released = self.bytes,
                    "the disk is full: released the reserve so that recovery can run; \
                     writes are refused until space is freed"
                );
                true
            }
            Err(_) => false,
        }
    }

    /// Writes the ballast if it is missing and the disk can spare it beyond the reserve.
    pub fn ensure(&self, min_free_bytes: u64) {
        if self.bytes == 0 || self.fs.open(&self.path).is_ok() {
            return;
        }
        let Some(dir) = self.path.parent() else { return };
        let free = self.fs.free_bytes(dir).ok().flatten();
        if free.is_some_and(|f| f < self.bytes.saturating_add(min_free_bytes)) {
            return;
        }
        let r = (|| -> std::io::Result<()> {
            let tmp = self.path.with_extension("tmp");
            let _ = self.fs.remove(&tmp);
            let mut f = self.fs.create_new(&tmp)?;
            let chunk = vec![0u8; 1 << 20];
            let mut at = 0;
            while at < self.bytes {
                let n = (self.bytes - at).min(chunk.len() as u64) as usize;
                f.write_at(&chunk[..n], at)?;
                at += n as u64;
            }
            f.sync_data()?;
            self.fs.rename(&tmp, &self.path)?;
            self.fs.sync_dir(dir)
        })();
        match r {
            Ok(()) => info!(path = %self.path.display(), bytes = self.bytes, "disk reserve written"),
            Err(e) => {
                let _ = self.fs.remove(&self.path.with_extension("tmp"));
                warn!(path = %self.path.display(), error = %e, "could not write the disk reserve");
            }
        }
    }
}
