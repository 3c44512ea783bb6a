//! The writer thread: group commit.

use std::{
    io,
    path::PathBuf,
    sync::{Arc, Weak, atomic::Ordering, mpsc},
};

use bytes::Bytes;
use tracing::warn;
use walden_common::{MessageId, Term};
use walden_wal_api::WalError;

use crate::{
    Ack, Cmd, Inner, LocalWalConfig,
    format::{self, SegmentHeader},
    fs::{FileSystem, LockGuard, WalFile},
    lock,
    open::io_err,
};

/// What the writer needs of [`Inner`] without keeping it alive (so dropping every handle stops
/// the writer).
#[derive(Debug)]
pub(crate) struct WriterShared {
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

/// Group commit, for both layouts: `first` and every append queued after it, up to `max_bytes`.
/// Stops at the first other command and returns it, for the caller to handle after the batch.
pub(crate) fn gather<C, J>(
    rx: &mpsc::Receiver<C>,
    first: C,
    max_bytes: usize,
    batch: &mut Vec<J>,
    as_append: impl Fn(C) -> Result<(J, usize), C>,
) -> Option<C> {
    let mut bytes = 0;
    let mut next = Some(first);
    while let Some(cmd) = next.take() {
        match as_append(cmd) {
            Ok((job, n)) => {
                bytes += n;
                batch.push(job);
            }
            Err(control) => return Some(control),
        }
        if bytes >= max_bytes {
            break;
        }
        next = rx.try_recv().ok();
    }
    None
}

/// The I/O failure a writer keeps failing appends with until its log reopens, as a value that
/// can be turned into an error for every caller (`io::Error` is not `Clone`). Both layouts'
/// writers use it.
#[derive(Debug, Default)]
pub(crate) struct Failed(Option<(io::ErrorKind, String)>);

impl Failed {
    pub(crate) fn set(&mut self, e: &io::Error) {
        self.0 = Some((e.kind(), e.to_string()));
    }

    pub(crate) fn is_set(&self) -> bool {
        self.0.is_some()
    }

    pub(crate) fn error(&self, pchannel: &str, context: &str) -> WalError {
        let (kind, msg) = self
            .0
            .clone()
            .unwrap_or((io::ErrorKind::Other, "unknown".into()));
        WalError::io(pchannel, context, io::Error::new(kind, msg))
    }
}

#[derive(Debug)]
pub(crate) struct Writer {
    pub(crate) inner: Weak<Inner>,
    pub(crate) shared: WriterShared,
    pub(crate) rx: mpsc::Receiver<Cmd>,
    pub(crate) file: Box<dyn WalFile>,
    pub(crate) active_first: u64,
    pub(crate) active_len: u64,
    pub(crate) next_id: u64,
    /// Set after an I/O failure: every later append fails (fsync errors cannot be retried).
    pub(crate) failed: Failed,
    pub(crate) config: LocalWalConfig,
    pub(crate) _lock: Box<dyn LockGuard>,
}

impl Writer {
    pub(crate) fn run(mut self) {
        let mut batch: Vec<(Bytes, Ack<MessageId>)> = Vec::new();
        let mut buf: Vec<u8> = Vec::with_capacity(self.config.max_batch_bytes);
        while let Ok(cmd) = self.rx.recv() {
            let control = gather(
                &self.rx,
                cmd,
                self.config.max_batch_bytes,
                &mut batch,
                |c| match c {
                    Cmd::Append(r, ack) => {
                        let n = r.len();
                        Ok(((r, ack), n))
                    }
                    other => Err(other),
                },
            );
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
        self.failed.error(&self.shared.pchannel, context)
    }

    fn write_batch(&mut self, batch: &mut Vec<(Bytes, Ack<MessageId>)>, buf: &mut Vec<u8>) {
        let inner = self.inner.upgrade();
        let fenced = inner.as_ref().is_none_or(|i| i.is_fenced());
        if fenced || self.failed.is_set() {
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
            self.failed.set(&e);
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
