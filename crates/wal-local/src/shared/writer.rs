//! The shared log's writer thread: group commits, segment rolls, index files, truncation.

use super::*;

pub(super) fn new_segment(
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

pub(super) struct Writer {
    pub(super) log: Weak<Log>,
    pub(super) dir: PathBuf,
    pub(super) fs: Arc<dyn FileSystem>,
    pub(super) rx: mpsc::Receiver<Cmd>,
    pub(super) file: Box<dyn WalFile>,
    pub(super) seq: u64,
    /// Where the next record goes.
    pub(super) len: u64,
    /// The file's length: zeros written ahead of `len`, so that commits overwrite instead of
    /// growing the file.
    pub(super) zeroed: u64,
    pub(super) zeros: Vec<u8>,
    /// Prepares the next segment in the background (where overwriting is cheap).
    pub(super) prep: Option<Preparer>,
    /// Threads writing sealed segments' index files.
    pub(super) indexers: Vec<thread::JoinHandle<()>>,
    pub(super) config: LocalWalConfig,
    pub(super) failed: Failed,
    pub(super) space: Arc<Space>,
    pub(super) _lock: Box<dyn LockGuard>,
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
    pub(super) fn run(mut self) {
        if self.file.cheap_overwrite() {
            match Preparer::start(
                self.fs.clone(),
                self.dir.clone(),
                self.config.segment_bytes,
                self.space.clone(),
            ) {
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
            // Zeros ahead only from space above the reserve; below it the records grow the
            // file as they come.
            if !self.space.room_for(chunk as u64) {
                self.zeroed = self.zeroed.max(self.len + n);
                return Ok(());
            }
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
            // The index is 24 bytes per record: give back what a burst left, so memory
            // follows what is retained rather than the largest backlog ever held.
            let kept = ix.locs.len();
            if ix.locs.capacity() > 4 * kept + 4096 {
                ix.locs.shrink_to(2 * kept);
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
        if doomed.is_empty() {
            return;
        }
        for seq in doomed {
            let path = self.dir.join(segment_name(seq));
            if let Err(e) = self.fs.remove(&path) {
                warn!(segment = %path.display(), error = %e, "could not remove a segment");
                continue;
            }
            let _ = self.fs.remove(&self.dir.join(index_name(seq)));
            lock(&log.segments).remove(&seq);
        }
        // A removal lost in a crash only brings back a segment below every first id.
        let _ = self.fs.sync_dir(&self.dir);
    }
}
