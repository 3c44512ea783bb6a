//! The file operations the local WAL needs, behind a trait so tests can inject faults.
//!
//! [`StdFs`] is the real file system. [`FaultFs`] is an in-memory file system that models what
//! survives a crash: bytes are *durable* only after `sync_data`; [`FaultFs::crash`] keeps the
//! durable bytes of every file plus an arbitrary prefix of the rest (a torn write), as power loss
//! can. It can also fail the n-th write (after writing part of it) or the n-th sync.

use std::{
    collections::{HashMap, HashSet},
    fmt::Debug,
    fs::{self, File, OpenOptions},
    io::{self, Seek, SeekFrom, Write},
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard},
};

use bytes::Bytes;

/// One open file.
pub trait WalFile: Send + Sync + Debug {
    /// Appends all of `buf` at the end of the file.
    fn append(&mut self, buf: &[u8]) -> io::Result<()>;
    /// Writes all of `buf` at `offset`, inside the file or at its end.
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Whether overwriting bytes already in the file is cheaper to make durable than
    /// appending: for a real file, an `fdatasync` that changes no size writes no metadata
    /// (about half the time here). The fault model keeps only a durable prefix, so it says no
    /// and is only ever written at its end.
    fn cheap_overwrite(&self) -> bool {
        false
    }
    /// Makes every byte written so far durable (`fdatasync`).
    fn sync_data(&mut self) -> io::Result<()>;
    /// Reads at `offset`; returns fewer bytes only at the end of the file.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// The current length.
    fn len(&self) -> io::Result<u64>;
    /// Whether the file has no bytes.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
    /// Cuts the file to `len` bytes (durably: the caller syncs).
    fn truncate(&mut self, len: u64) -> io::Result<()>;
    /// The file's bytes as they are now (its current length), read through the page cache
    /// without copying, or `None` where the file system cannot map (the fakes: readers then
    /// use `read_at`). Only for segments: see `StdFile::map` for what a caller promises.
    fn map(&self) -> io::Result<Option<Bytes>> {
        Ok(None)
    }
}

/// An exclusive lock on a path, released on drop.
pub trait LockGuard: Send + Sync + Debug {}

/// The directory operations the WAL needs.
pub trait FileSystem: Send + Sync + Debug + 'static {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// File names (not paths) in `dir`.
    fn list(&self, dir: &Path) -> io::Result<Vec<String>>;
    /// Creates a new, empty file for writing; fails if it exists.
    fn create_new(&self, path: &Path) -> io::Result<Box<dyn WalFile>>;
    /// Opens an existing file for reading and appending.
    fn open(&self, path: &Path) -> io::Result<Box<dyn WalFile>>;
    fn remove(&self, path: &Path) -> io::Result<()>;
    /// Renames `from` to `to`, replacing it (durable once the directory is synced).
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Makes the directory's entries (creations, removals, renames) durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// Replaces `path`'s content atomically and durably: a temp file written and synced,
    /// renamed over `path`, and the directory synced (without that last step a crash can
    /// bring the old content back). Built from the other calls, so the fault file system
    /// checks each step.
    fn write_atomic(&self, path: &Path, data: &[u8]) -> io::Result<()> {
        let tmp = path.with_extension("tmp");
        match self.remove(&tmp) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let mut f = self.create_new(&tmp)?;
        f.append(data)?;
        f.sync_data()?;
        drop(f);
        self.rename(&tmp, path)?;
        self.sync_dir(path.parent().unwrap_or(Path::new(".")))
    }
    /// The whole content of `path`, or `None` if it does not exist.
    fn read_all(&self, path: &Path) -> io::Result<Option<Vec<u8>>>;
    /// Takes an exclusive lock on `path` (creating it), or fails with `WouldBlock` if another
    /// holder has it.
    fn try_lock(&self, path: &Path) -> io::Result<Box<dyn LockGuard>>;
    /// Bytes free to this process on the file system holding `dir`; `None` where unknown.
    fn free_bytes(&self, _dir: &Path) -> io::Result<Option<u64>> {
        Ok(None)
    }
}

/// The real file system.
#[derive(Debug, Default, Clone, Copy)]
pub struct StdFs;

#[derive(Debug)]
struct StdFile(File);

impl WalFile for StdFile {
    fn append(&mut self, buf: &[u8]) -> io::Result<()> {
        self.0.write_all(buf)
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.0.write_all_at(buf, offset)
    }
    fn cheap_overwrite(&self) -> bool {
        true
    }
    fn sync_data(&mut self) -> io::Result<()> {
        self.0.sync_data()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            match self.0.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }
    fn truncate(&mut self, len: u64) -> io::Result<()> {
        self.0.set_len(len)?;
        self.0.seek(SeekFrom::Start(len)).map(drop)
    }
    /// A catch-up reader of one pchannel in the shared log wants a sixteenth of the bytes of
    /// every run it would `read_at` (the others' records sit in between): mapped, it copies
    /// only its own records' payloads, once, into the frames it sends.
    #[allow(unsafe_code)]
    fn map(&self) -> io::Result<Option<Bytes>> {
        if self.len()? == 0 {
            return Ok(Some(Bytes::new()));
        }
        // SAFETY: a mapping is undefined behaviour if its bytes change underneath it, and a
        // SIGBUS if the file shrinks under a page read. The WAL maps only its own segment
        // files, which no other process writes (the directory lock), and only reads bytes of
        // records below a pchannel's durable end: those are never written again, and a segment
        // is cut only at open and only past its last valid record (a torn tail nobody was
        // shown). Writes go past the durable end, into bytes no reader looks at; removing a
        // segment leaves existing mappings valid.
        let map = unsafe { memmap2::Mmap::map(&self.0)? };
        Ok(Some(Bytes::from_owner(map)))
    }
}

#[derive(Debug)]
struct StdLock(#[allow(dead_code)] File);
impl LockGuard for StdLock {}

impl FileSystem for StdFs {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        fs::create_dir_all(dir)
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut out = Vec::new();
        for entry in fs::read_dir(dir)? {
            if let Some(name) = entry?.file_name().to_str() {
                out.push(name.to_owned());
            }
        }
        Ok(out)
    }
    fn create_new(&self, path: &Path) -> io::Result<Box<dyn WalFile>> {
        // Not O_APPEND: Linux ignores pwrite's offset on such files. Appends write at the
        // cursor, kept at the end (here, after `open`, and after `truncate`).
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)?;
        Ok(Box::new(StdFile(f)))
    }
    fn open(&self, path: &Path) -> io::Result<Box<dyn WalFile>> {
        let mut f = OpenOptions::new().read(true).write(true).open(path)?;
        f.seek(SeekFrom::End(0))?;
        Ok(Box::new(StdFile(f)))
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }
    fn read_all(&self, path: &Path) -> io::Result<Option<Vec<u8>>> {
        match fs::read(path) {
            Ok(d) => Ok(Some(d)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }
    fn try_lock(&self, path: &Path) -> io::Result<Box<dyn LockGuard>> {
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)?;
        match f.try_lock() {
            Ok(()) => Ok(Box::new(StdLock(f))),
            Err(fs::TryLockError::WouldBlock) => Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                "held by another process",
            )),
            Err(fs::TryLockError::Error(e)) => Err(e),
        }
    }
    fn free_bytes(&self, dir: &Path) -> io::Result<Option<u64>> {
        let st = rustix::fs::statvfs(dir).map_err(io::Error::from)?;
        Ok(Some(st.f_bavail.saturating_mul(st.f_frsize)))
    }
}

// ------------------------------------------------------------------------------------------------

#[derive(Debug, Default)]
struct MemFile {
    data: Vec<u8>,
    /// Bytes that have been synced.
    durable: usize,
}

/// Which faults to inject; counters are over the whole file system.
#[derive(Debug, Default, Clone)]
pub struct FaultPlan {
    /// The n-th `append` (0-based) writes only `torn_keep` of its bytes and then fails.
    pub torn_write_at: Option<usize>,
    /// How many bytes the torn write keeps.
    pub torn_keep: usize,
    /// The n-th `sync_data` (0-based) fails without making anything durable.
    pub fail_sync_at: Option<usize>,
}

#[derive(Debug, Default)]
struct FaultState {
    files: HashMap<PathBuf, Arc<Mutex<MemFile>>>,
    locks: HashSet<PathBuf>,
    plan: FaultPlan,
    appends: usize,
    syncs: usize,
    /// Bumped by every crash: files opened before it belong to a dead process.
    epoch: u64,
    /// What `free_bytes` answers (None: unknown).
    free: Option<u64>,
    /// The names as of each directory's last `sync_dir`: what a crash leaves. Creations,
    /// renames and removals change `files` at once and reach this only when their directory
    /// is synced.
    durable_names: HashMap<PathBuf, Arc<Mutex<MemFile>>>,
}

/// In-memory file system with fault injection and crash simulation. Clones share state.
#[derive(Debug, Clone, Default)]
pub struct FaultFs {
    state: Arc<Mutex<FaultState>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl FaultFs {
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the free space the file system reports (None: unknown).
    pub fn set_free_bytes(&self, free: Option<u64>) {
        lock(&self.state).free = free;
    }

    /// Replaces the fault plan and resets its counters.
    pub fn set_plan(&self, plan: FaultPlan) {
        let mut s = lock(&self.state);
        s.plan = plan;
        s.appends = 0;
        s.syncs = 0;
    }

    /// Simulates power loss: every file keeps its durable bytes plus `keep(path, unsynced_len)`
    /// of the bytes written after its last sync. Locks are released (the process is gone).
    pub fn crash(&self, mut keep: impl FnMut(&Path, usize) -> usize) {
        let mut s = lock(&self.state);
        s.epoch += 1;
        s.locks.clear();
        s.plan = FaultPlan::default();
        // Directory entries not synced are lost (or come back, for removals).
        s.files = s.durable_names.clone();
        for (path, f) in &s.files {
            let mut f = lock(f);
            let unsynced = f.data.len() - f.durable;
            let kept = keep(path, unsynced).min(unsynced);
            let len = f.durable + kept;
            f.data.truncate(len);
            f.durable = len;
        }
    }

    /// Flips one byte of a file (for corruption tests).
    pub fn corrupt(&self, path: &Path, offset: usize) {
        let s = lock(&self.state);
        if let Some(f) = s.files.get(path) {
            let mut f = lock(f);
            if let Some(b) = f.data.get_mut(offset) {
                *b ^= 0xff;
            }
        }
    }

    /// The paths of every file, sorted.
    pub fn files(&self) -> Vec<PathBuf> {
        let mut v: Vec<_> = lock(&self.state).files.keys().cloned().collect();
        v.sort();
        v
    }

    /// A file's current length.
    pub fn file_len(&self, path: &Path) -> Option<usize> {
        lock(&self.state)
            .files
            .get(path)
            .map(|f| lock(f).data.len())
    }
}

#[derive(Debug)]
struct FaultFile {
    fs: FaultFs,
    file: Arc<Mutex<MemFile>>,
    epoch: u64,
    /// A `write_atomic` temp file: its writes and syncs are not counted by the fault plan
    /// (whose positions are about the WAL's own appends and syncs).
    tmp: bool,
}

impl FaultFile {
    fn check_alive(&self) -> io::Result<()> {
        if lock(&self.fs.state).epoch != self.epoch {
            return Err(io::Error::other("the process crashed"));
        }
        Ok(())
    }
}

impl WalFile for FaultFile {
    fn append(&mut self, buf: &[u8]) -> io::Result<()> {
        self.check_alive()?;
        let torn = if self.tmp {
            None
        } else {
            let mut s = lock(&self.fs.state);
            let n = s.appends;
            s.appends += 1;
            (s.plan.torn_write_at == Some(n)).then_some(s.plan.torn_keep)
        };
        let mut f = lock(&self.file);
        match torn {
            Some(keep) => {
                f.data.extend_from_slice(&buf[..keep.min(buf.len())]);
                Err(io::Error::other("injected torn write"))
            }
            None => {
                f.data.extend_from_slice(buf);
                Ok(())
            }
        }
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        let end = lock(&self.file).data.len() as u64;
        if offset != end {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "the fault model is only written at its end",
            ));
        }
        self.append(buf)
    }
    fn sync_data(&mut self) -> io::Result<()> {
        self.check_alive()?;
        let fail = !self.tmp && {
            let mut s = lock(&self.fs.state);
            let n = s.syncs;
            s.syncs += 1;
            s.plan.fail_sync_at == Some(n)
        };
        if fail {
            return Err(io::Error::other("injected fsync failure"));
        }
        let mut f = lock(&self.file);
        f.durable = f.data.len();
        Ok(())
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let f = lock(&self.file);
        let start = (offset as usize).min(f.data.len());
        let n = buf.len().min(f.data.len() - start);
        buf[..n].copy_from_slice(&f.data[start..start + n]);
        Ok(n)
    }
    fn len(&self) -> io::Result<u64> {
        Ok(lock(&self.file).data.len() as u64)
    }
    fn truncate(&mut self, len: u64) -> io::Result<()> {
        let mut f = lock(&self.file);
        f.data.truncate(len as usize);
        f.durable = f.durable.min(len as usize);
        Ok(())
    }
}

#[derive(Debug)]
struct FaultLock {
    fs: FaultFs,
    path: PathBuf,
}
impl LockGuard for FaultLock {}
impl Drop for FaultLock {
    fn drop(&mut self) {
        lock(&self.fs.state).locks.remove(&self.path);
    }
}

impl FileSystem for FaultFs {
    fn create_dir_all(&self, _dir: &Path) -> io::Result<()> {
        Ok(())
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let s = lock(&self.state);
        Ok(s.files
            .keys()
            .filter(|p| p.parent() == Some(dir))
            .filter_map(|p| p.file_name()?.to_str().map(str::to_owned))
            .collect())
    }
    fn create_new(&self, path: &Path) -> io::Result<Box<dyn WalFile>> {
        let mut s = lock(&self.state);
        if s.files.contains_key(path) {
            return Err(io::Error::new(io::ErrorKind::AlreadyExists, "exists"));
        }
        let file = Arc::new(Mutex::new(MemFile::default()));
        s.files.insert(path.to_owned(), file.clone());
        Ok(Box::new(FaultFile {
            fs: self.clone(),
            file,
            epoch: s.epoch,
            tmp: path.extension().is_some_and(|e| e == "tmp"),
        }))
    }
    fn open(&self, path: &Path) -> io::Result<Box<dyn WalFile>> {
        let s = lock(&self.state);
        let file = s
            .files
            .get(path)
            .cloned()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no such file"))?;
        Ok(Box::new(FaultFile {
            fs: self.clone(),
            file,
            epoch: s.epoch,
            tmp: false,
        }))
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        lock(&self.state)
            .files
            .remove(path)
            .map(|_| ())
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no such file"))
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut s = lock(&self.state);
        let f = s
            .files
            .remove(from)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no such file"))?;
        s.files.insert(to.to_owned(), f);
        Ok(())
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut s = lock(&self.state);
        let s = &mut *s;
        s.durable_names.retain(|p, _| p.parent() != Some(dir));
        for (p, f) in &s.files {
            if p.parent() == Some(dir) {
                s.durable_names.insert(p.clone(), f.clone());
            }
        }
        Ok(())
    }
    fn read_all(&self, path: &Path) -> io::Result<Option<Vec<u8>>> {
        Ok(lock(&self.state)
            .files
            .get(path)
            .map(|f| lock(f).data.clone()))
    }
    fn try_lock(&self, path: &Path) -> io::Result<Box<dyn LockGuard>> {
        let mut s = lock(&self.state);
        if !s.locks.insert(path.to_owned()) {
            return Err(io::Error::new(io::ErrorKind::WouldBlock, "locked"));
        }
        Ok(Box::new(FaultLock {
            fs: self.clone(),
            path: path.to_owned(),
        }))
    }
    fn free_bytes(&self, _dir: &Path) -> io::Result<Option<u64>> {
        Ok(lock(&self.state).free)
    }
}
