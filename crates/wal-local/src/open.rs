//! Opening a pchannel: lock, term check, recovery of the active segment, and the writer start.

use std::{
    io,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, atomic::AtomicU64, mpsc},
    thread,
};

use tracing::{info, warn};
use walden_common::Term;
use walden_wal_api::WalError;

use crate::{
    Inner, LOCK_FILE, LocalWalConfig, Queue, TERM_FILE,
    format::{self, RecordAt, SegmentHeader},
    fs::{FileSystem, LockGuard},
    lock,
    writer::{Failed, Writer, WriterShared},
};

pub(crate) fn io_err(
    pchannel: &str,
    context: impl Into<String>,
) -> impl FnOnce(io::Error) -> WalError {
    let pchannel = pchannel.to_owned();
    let context = context.into();
    move |e| WalError::io(&pchannel, context, e)
}

/// Takes the exclusive lock of a WAL directory (`LOCK`): one writing process at a time.
pub(crate) fn lock_dir(
    fs: &dyn FileSystem,
    dir: &Path,
    who: &str,
) -> Result<Box<dyn LockGuard>, WalError> {
    let path = dir.join(LOCK_FILE);
    fs.try_lock(&path).map_err(|e| {
        if e.kind() == io::ErrorKind::WouldBlock {
            WalError::Locked {
                pchannel: who.to_owned(),
                path: path.display().to_string(),
            }
        } else {
            WalError::io(who, "locking the WAL directory", e)
        }
    })
}

/// Records `term` in `dir/TERM`, refusing a term older than the one there (`Fenced`).
pub(crate) fn claim_term(
    fs: &dyn FileSystem,
    dir: &Path,
    pchannel: &str,
    term: Term,
) -> Result<(), WalError> {
    let path = dir.join(TERM_FILE);
    if let Some(stored) = read_term(fs, &path, pchannel)?
        && term < stored
    {
        return Err(WalError::Fenced {
            pchannel: pchannel.to_owned(),
            term,
            current: stored,
        });
    }
    fs.write_atomic(&path, &encode_term(term))
        .map_err(io_err(pchannel, "writing the TERM file"))
}

/// The refusal of an open whose term is older than a handle already open in this process.
pub(crate) fn stale_term(pchannel: &str, term: Term, current: Term) -> Option<WalError> {
    (term < current).then(|| WalError::Fenced {
        pchannel: pchannel.to_owned(),
        term,
        current,
    })
}

pub(crate) fn open_blocking(
    fs: Arc<dyn FileSystem>,
    dir: PathBuf,
    pchannel: String,
    term: Term,
    config: LocalWalConfig,
) -> Result<Arc<Inner>, WalError> {
    let p = pchannel.as_str();
    fs.create_dir_all(&dir)
        .map_err(io_err(p, format!("creating {}", dir.display())))?;
    let guard = lock_dir(&*fs, &dir, p)?;
    claim_term(&*fs, &dir, p, term)?;

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
        fenced_by: AtomicU64::new(0),
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
        failed: Failed::default(),
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

pub(crate) fn encode_term(term: Term) -> Vec<u8> {
    let mut b = term.0.to_le_bytes().to_vec();
    let crc = crc32c::crc32c(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    b
}

pub(crate) fn read_term(
    fs: &dyn FileSystem,
    path: &Path,
    p: &str,
) -> Result<Option<Term>, WalError> {
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

pub(crate) fn check_header(b: &[u8], path: &Path, p: &str, first: u64) -> Result<usize, WalError> {
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
