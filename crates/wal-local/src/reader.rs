//! Readers: sequential reads of durable records, segment by segment, with checksums.

use std::{
    io,
    sync::{Arc, atomic::Ordering},
};

use bytes::Bytes;
use futures::{FutureExt, future::BoxFuture};
use walden_common::MessageId;
use walden_wal_api::{WalError, WalReader};

use crate::{
    Inner, READ_CHUNK,
    format::{self, RecordAt},
    fs::WalFile,
    lock,
    open::check_header,
};

#[derive(Debug)]
pub(crate) struct OpenSegment {
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
pub(crate) struct LocalReader {
    inner: Arc<Inner>,
    next: u64,
    seg: Option<OpenSegment>,
    /// Reused across chunks: fresh memory is slow to touch.
    buf: Vec<u8>,
}

impl LocalReader {
    pub(crate) fn new(inner: Arc<Inner>, next: u64) -> Self {
        Self {
            inner,
            next,
            seg: None,
            buf: Vec::new(),
        }
    }

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
