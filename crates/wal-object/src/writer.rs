//! The writer task of one open pchannel: cuts pending appends into fragments, keeps up to
//! `max_uploads_in_flight` uploads going, and acknowledges appends in id order as the
//! fragments before them become durable. It also seals full segments.

use std::{collections::VecDeque, sync::Arc};

use bytes::Bytes;
use futures::{FutureExt, StreamExt, future::BoxFuture, stream::FuturesUnordered};
use tokio::time::Instant;
use walden_common::MessageId;
use walden_object_store::{Blobs, Created, create};
use walden_wal_api::WalError;

use crate::{
    Ack, Seg, Shared, corrupted,
    format::{AtFragmentKey, FragEntry, FragmentBuilder, Manifest, decode_at_fragment_key},
    recover::{marker_body, put_manifest},
    unavailable,
};

/// A fragment being uploaded.
#[derive(Debug)]
struct InFlight {
    first: u64,
    count: u32,
    size: u32,
    acks: Vec<Ack>,
    done: bool,
}

#[derive(Debug)]
struct Writer {
    shared: Arc<Shared>,
    uploads: FuturesUnordered<BoxFuture<'static, (u64, Result<(), WalError>)>>,
    /// Uploads in cut order; `inflight[0]` has sequence number `front_seq`.
    inflight: VecDeque<InFlight>,
    front_seq: u64,
    /// The segment being filled: its number, first id, next fragment number, fragments.
    seg: u64,
    seg_first: u64,
    next_frag: u64,
    entries: Vec<FragEntry>,
    seg_bytes: u64,
    seg_started: Instant,
    rolling: bool,
}

pub(crate) async fn run(shared: Arc<Shared>) {
    let (seg, seg_first) = {
        let st = shared.lock();
        st.segs
            .back()
            .map_or((0, st.durable_end), |s| (s.no, s.first))
    };
    let mut w = Writer {
        shared,
        uploads: FuturesUnordered::new(),
        inflight: VecDeque::new(),
        front_seq: 0,
        seg,
        seg_first,
        next_frag: 0,
        entries: Vec::new(),
        seg_bytes: 0,
        seg_started: Instant::now(),
        rolling: false,
    };
    w.run().await;
}

impl Writer {
    async fn run(&mut self) {
        loop {
            if self.shared.lock().failed.is_some() {
                self.fail_inflight();
                return;
            }
            self.rolling = self.rolling || self.should_roll();
            if self.rolling && self.inflight.is_empty() {
                if let Err(e) = self.roll().await {
                    self.shared.fail(e);
                }
                continue;
            }
            let mut timer = None;
            while !self.rolling && self.inflight.len() < self.shared.config.max_uploads_in_flight {
                match self.cut() {
                    Cut::Fragment => {}
                    Cut::WaitUntil(t) => {
                        timer = Some(t);
                        break;
                    }
                    Cut::Nothing => break,
                }
            }
            {
                let st = self.shared.lock();
                if st.closing && st.pending.is_empty() && self.inflight.is_empty() {
                    return;
                }
            }
            // An idle pchannel's segment still rolls by age, so truncation can reach it.
            if !self.rolling && self.next_frag > 0 {
                let due = self.seg_started + self.shared.config.segment_max_age;
                timer = Some(timer.map_or(due, |t: Instant| t.min(due)));
            }
            tokio::select! {
                Some((seq, r)) = self.uploads.next(), if !self.uploads.is_empty() => {
                    match r {
                        Ok(()) => self.completed(seq),
                        Err(e) => self.shared.fail(e),
                    }
                }
                () = self.shared.wake.notified() => {}
                () = tokio::time::sleep_until(timer.unwrap_or_else(Instant::now)), if timer.is_some() => {}
            }
        }
    }

    fn should_roll(&self) -> bool {
        let c = &self.shared.config;
        self.next_frag > 0
            && (self.seg_bytes >= c.segment_bytes
                || self.next_frag >= u64::from(c.segment_max_fragments)
                || self.seg_started.elapsed() >= c.segment_max_age)
    }

    /// Takes pending appends into one fragment and starts its upload, if it is time.
    fn cut(&mut self) -> Cut {
        let c = &self.shared.config;
        let (first, records) = {
            let mut st = self.shared.lock();
            let Some(since) = st.pending_since else {
                return Cut::Nothing;
            };
            if st.pending.is_empty() {
                return Cut::Nothing;
            }
            let due = since + c.flush_interval;
            if st.pending_bytes < c.fragment_bytes && !st.closing && Instant::now() < due {
                return Cut::WaitUntil(due);
            }
            let first = st.next_id - st.pending.len() as u64;
            let mut bytes = 0;
            let mut n = 0;
            for (r, _) in &st.pending {
                if n > 0 && bytes + r.len() > c.fragment_bytes {
                    break;
                }
                bytes += r.len();
                n += 1;
            }
            let records: Vec<(Bytes, Ack)> = st.pending.drain(..n).collect();
            st.pending_bytes -= bytes;
            st.pending_since = (!st.pending.is_empty()).then(Instant::now);
            (first, records)
        };
        let mut b = FragmentBuilder::new(records.iter().map(|(r, _)| r.len() + 8).sum());
        let mut acks = Vec::with_capacity(records.len());
        for (r, ack) in records {
            b.push(&r);
            acks.push(ack);
        }
        let count = b.count();
        // Every fragment of the segment that is acknowledged; the uploads in flight are all of
        // this segment (a roll waits for them).
        let data = b.finish(self.shared.epoch, first, self.entries.len() as u32);
        let seq = self.front_seq + self.inflight.len() as u64;
        let key = self.shared.keys.fragment(self.seg, self.next_frag);
        if self.next_frag == 0 {
            // A segment's age counts from its first fragment.
            self.seg_started = Instant::now();
        }
        self.next_frag += 1;
        self.seg_bytes += data.len() as u64;
        self.inflight.push_back(InFlight {
            first,
            count,
            size: data.len() as u32,
            acks,
            done: false,
        });
        let shared = self.shared.clone();
        self.uploads.push(
            async move {
                let r = upload(&*shared.blobs, &key, data, &shared.pchannel, shared.epoch).await;
                (seq, r)
            }
            .boxed(),
        );
        Cut::Fragment
    }

    /// Upload `seq` is durable: acknowledge every fragment from the front that now is.
    fn completed(&mut self, seq: u64) {
        let i = (seq - self.front_seq) as usize;
        self.inflight[i].done = true;
        let mut acks = Vec::new();
        {
            let mut st = self.shared.lock();
            while self.inflight.front().is_some_and(|f| f.done) {
                let Some(f) = self.inflight.pop_front() else {
                    break;
                };
                self.front_seq += 1;
                self.shared
                    .uploads
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                st.durable_end = f.first + u64::from(f.count);
                if let Some(s) = st.segs.back_mut() {
                    s.frags.push((f.first, f.count));
                    s.bytes += u64::from(f.size);
                }
                self.entries.push(FragEntry {
                    count: f.count,
                    size: f.size,
                });
                acks.push((f.first, f.acks));
            }
        }
        for (first, fa) in acks {
            for (i, ack) in fa.into_iter().enumerate() {
                let _ = ack.send(Ok(MessageId(first + i as u64)));
            }
        }
    }

    fn fail_inflight(&mut self) {
        self.uploads.clear();
        for f in self.inflight.drain(..) {
            for ack in f.acks {
                let _ = ack.send(Err(self.shared.error(&self.shared.lock())));
            }
        }
    }

    /// Seals the full segment (every upload of it is done) and starts the next.
    async fn roll(&mut self) -> Result<(), WalError> {
        let s = &self.shared;
        let manifest = Manifest {
            first_id: self.seg_first,
            frags: std::mem::take(&mut self.entries),
        };
        let end = manifest.end_id();
        put_manifest(&*s.blobs, &s.keys, &s.pchannel, self.seg, &manifest).await?;
        let next = self.seg + 1;
        match create(&*s.blobs, &s.keys.marker(next, end), marker_body(s.epoch)).await {
            Ok(Created::Mine) => {}
            // A newer writer sealed this segment after fencing it, and went on.
            Ok(Created::Taken(_)) => {
                return Err(WalError::Superseded {
                    pchannel: s.pchannel.clone(),
                    epoch: s.epoch,
                    by_epoch: s.epoch + 1,
                });
            }
            Err(e) => return Err(unavailable(&s.pchannel, "creating a segment marker", &e)),
        }
        s.lock().segs.push_back(Seg {
            no: next,
            first: end,
            frags: Vec::new(),
            bytes: 0,
        });
        tracing::debug!(pchannel = %s.pchannel, segment = next, first = end, "object WAL segment rolled");
        self.seg = next;
        self.seg_first = end;
        self.next_frag = 0;
        self.seg_bytes = 0;
        self.seg_started = Instant::now();
        self.rolling = false;
        Ok(())
    }
}

enum Cut {
    Fragment,
    WaitUntil(Instant),
    Nothing,
}

/// Creates one fragment; [`create`] resolves an unknown outcome by reading the key back,
/// never by writing the records again under another key.
async fn upload(
    blobs: &dyn Blobs,
    key: &str,
    data: Bytes,
    pchannel: &str,
    epoch: u64,
) -> Result<(), WalError> {
    match create(blobs, key, data).await {
        Ok(Created::Mine) => Ok(()),
        Ok(Created::Taken(b)) => Err(match decode_at_fragment_key(&b) {
            Ok(AtFragmentKey::Fence(f)) => WalError::Superseded {
                pchannel: pchannel.to_owned(),
                epoch,
                by_epoch: f.epoch,
            },
            Ok(AtFragmentKey::Fragment(h)) => WalError::Superseded {
                pchannel: pchannel.to_owned(),
                epoch,
                by_epoch: h.epoch,
            },
            Err(d) => corrupted(pchannel, key, d),
        }),
        Err(e) => Err(unavailable(pchannel, "uploading a fragment", &e)),
    }
}
