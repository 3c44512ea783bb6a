//! Readers of one pchannel of the shared log: records sliced out of mapped segments.

use super::*;

#[derive(Debug)]
pub(super) struct SharedReader {
    /// The log's directory and file system: a reader does not keep the log (its writer and
    /// lock) alive.
    pub(super) dir: PathBuf,
    pub(super) fs: Arc<dyn FileSystem>,
    pub(super) chan: Arc<Chan>,
    pub(super) next: u64,
    pub(super) file: Option<(u64, Box<dyn WalFile>)>,
    /// The segment being read, mapped (where the file system can): its records are sliced out
    /// without a copy.
    pub(super) map: Option<(u64, Bytes)>,
    pub(super) ready: VecDeque<(MessageId, Bytes)>,
}

/// Records taken from the index at a time (one lock of it) when the segment is mapped.
pub(super) const MAPPED_RUN: usize = 1024;

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
            match record_in(&chunk, at, loc, id, &p) {
                Ok(payload) => self.ready.push_back((MessageId(id), payload)),
                Err(why) => {
                    // What comes before the damage is delivered first; the damaged record
                    // fails the call after, with its exact range.
                    self.next = id;
                    if k > 0 {
                        return Ok(());
                    }
                    self.chan.mark_damaged(id..id + 1);
                    if let Some(r) = lock(&self.chan.skipped).containing(id) {
                        // An operator chose to pass over these (SKIPPED says who and why).
                        self.next = r.end;
                        return Ok(());
                    }
                    return Err(self.chan.damage_error(
                        id,
                        format!("{} at {}: {why}", segment_name(loc.seg), loc.off),
                    ));
                }
            }
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

/// Record `id`'s payload from `chunk` at `at`, or why it cannot be read.
fn record_in(
    chunk: &Bytes,
    at: usize,
    loc: &Loc,
    id: u64,
    pchannel: &str,
) -> Result<Bytes, &'static str> {
    if loc.len == 0 {
        return Err("lost to damage found at open");
    }
    let bytes = chunk
        .get(at..at + loc.len as usize)
        .ok_or("record cut short")?;
    let RecordAt::Valid { start, len } = format::record_at(bytes) else {
        return Err("damaged record");
    };
    let body = &bytes[start..start + len];
    let (rid, name, payload) = parse_body(body).ok_or("damaged record body")?;
    if rid != id || name != pchannel {
        return Err("index points at another record");
    }
    let s = at + start;
    Ok(chunk.slice(s + payload.start..s + payload.end))
}

impl WalReader for SharedReader {
    fn next(&mut self) -> BoxFuture<'_, Result<Option<(MessageId, Bytes)>, WalError>> {
        async move {
            // Page-cache reads, like the per-pchannel reader's. A fill may deliver nothing
            // and move on (a skipped range): fill again then.
            while self.ready.is_empty() {
                let before = self.next;
                self.fill()?;
                if self.next == before {
                    break;
                }
            }
            Ok(self.ready.pop_front())
        }
        .boxed()
    }
}
