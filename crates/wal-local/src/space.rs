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

/// The data dir's ballast: space held back (allocated with `fallocate`, not written) so that
/// a start on a file system filled by something else can still recover.
#[derive(Debug)]
pub struct Reserve {
    path: PathBuf,
    bytes: u64,
    min_free: u64,
}

/// Name of the ballast file.
pub const RESERVE_FILE: &str = "RESERVE";

fn free_on(dir: &Path) -> Option<u64> {
    crate::fs::StdFs.free_bytes(dir).ok().flatten()
}

impl Reserve {
    /// The ballast of `dir`, half of a reserve of `min_free_bytes`.
    pub fn new(dir: &Path, min_free_bytes: u64) -> Self {
        Self {
            path: dir.join(RESERVE_FILE),
            bytes: min_free_bytes / 2,
            min_free: min_free_bytes,
        }
    }

    /// At start, before anything is written: with less than the reserve free, deletes the
    /// ballast (and says so). Returns whether it did.
    pub fn release_if_short(&self) -> bool {
        let Some(free) = self.path.parent().and_then(free_on) else {
            return false;
        };
        if free >= self.min_free {
            return false;
        }
        let released = std::fs::remove_file(&self.path).is_ok();
        warn!(
            free,
            min_free_bytes = self.min_free,
            released_reserve = released,
            "the disk is nearly full: writes are refused (RESOURCE_EXHAUSTED) until space is freed"
        );
        released
    }

    /// Allocates the ballast if it is missing and the disk can spare it beyond the reserve.
    pub fn ensure(&self) {
        if self.bytes == 0 || self.path.exists() {
            return;
        }
        let Some(dir) = self.path.parent() else {
            return;
        };
        if free_on(dir).is_some_and(|f| f < self.bytes.saturating_add(self.min_free)) {
            return;
        }
        let tmp = self.path.with_extension("tmp");
        let r = (|| -> std::io::Result<()> {
            let f = std::fs::File::create(&tmp)?;
            rustix::fs::fallocate(&f, rustix::fs::FallocateFlags::empty(), 0, self.bytes)
                .map_err(std::io::Error::from)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &self.path)?;
            std::fs::File::open(dir)?.sync_all()
        })();
        match r {
            Ok(()) => {
                info!(path = %self.path.display(), bytes = self.bytes, "disk reserve allocated")
            }
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                warn!(path = %self.path.display(), error = %e, "could not allocate the disk reserve");
            }
        }
    }
}
