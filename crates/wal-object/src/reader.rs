//! Catch-up reads: fragments fetched in order with up to `read_ahead` in flight.

use std::{collections::VecDeque, sync::Arc};

use bytes::Bytes;
use futures::{FutureExt, StreamExt, future::BoxFuture, stream::FuturesOrdered};
use walden_common::MessageId;
use walden_object_store::ObjectStoreError;
use walden_wal_api::{ReadFrom, WalError, WalReader};

use crate::{FragLoc, Shared, corrupted, format::decode_fragment, unavailable};

type Fetch = BoxFuture<'static, Result<(FragLoc, Bytes), WalError>>;

pub(crate) struct ObjectReader {
    shared: Arc<Shared>,
    /// The next id to return.
    pos: u64,
    /// Ids below this are fetched or being fetched.
    planned: u64,
    ready: VecDeque<(u64, Bytes)>,
    fetches: FuturesOrdered<Fetch>,
}

impl std::fmt::Debug for ObjectReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectReader")
            .field("pchannel", &self.shared.pchannel)
            .field("pos", &self.pos)
            .finish()
    }
}

impl ObjectReader {
    pub(crate) fn open(shared: Arc<Shared>, from: ReadFrom) -> Result<Self, WalError> {
        let pos = {
            let st = shared.lock();
            let pos = match from {
                ReadFrom::Earliest => st.first_id(),
                ReadFrom::Latest => st.durable_end,
                ReadFrom::At(id) => id.0,
                ReadFrom::After(id) => id.0 + 1,
            };
            if pos < st.first_id() {
                return Err(truncated(&shared, pos, st.first_id()));
            }
            pos
        };
        Ok(Self {
            shared,
            pos,
            planned: pos,
            ready: VecDeque::new(),
            fetches: FuturesOrdered::new(),
        })
    }

    /// The fragment holding `id`, if `id` is durable.
    fn locate(&self, id: u64) -> Result<Option<FragLoc>, WalError> {
        let st = self.shared.lock();
        if id < st.first_id() {
            return Err(truncated(&self.shared, id, st.first_id()));
        }
        if id >= st.durable_end {
            return Ok(None);
        }
        let i = st.segs.partition_point(|s| s.end() <= id);
        let Some(seg) = st.segs.get(i) else {
            return Ok(None);
        };
        let f = seg
            .frags
            .partition_point(|(first, c)| first + u64::from(*c) <= id);
        Ok(seg.frags.get(f).map(|&(first, count)| FragLoc {
            seg: seg.no,
            frag: f as u64,
            first,
            count,
        }))
    }
}

fn truncated(shared: &Shared, requested: u64, first: u64) -> WalError {
    WalError::Truncated {
        pchannel: shared.pchannel.clone(),
        requested: MessageId(requested),
        first: MessageId(first),
    }
}

fn fetch(shared: Arc<Shared>, loc: FragLoc) -> Fetch {
    async move {
        let key = shared.keys.fragment(loc.seg, loc.frag);
        match shared.blobs.get(&key).await {
            Ok(b) => Ok((loc, b)),
            Err(ObjectStoreError::NotFound { .. }) => {
                let first = shared.lock().first_id();
                Err(if loc.first < first {
                    truncated(&shared, loc.first, first)
                } else {
                    corrupted(&shared.pchannel, &key, "a fragment of the log is missing")
                })
            }
            Err(e) => Err(unavailable(&shared.pchannel, "reading a fragment", &e)),
        }
    }
    .boxed()
}

impl WalReader for ObjectReader {
    fn next(&mut self) -> BoxFuture<'_, Result<Option<(MessageId, Bytes)>, WalError>> {
        async move {
            loop {
                if let Some((id, b)) = self.ready.pop_front() {
                    self.pos = id + 1;
                    return Ok(Some((MessageId(id), b)));
                }
                while self.fetches.len() < self.shared.config.read_ahead.max(1) {
                    let Some(loc) = self.locate(self.planned)? else {
                        break;
                    };
                    self.fetches.push_back(fetch(self.shared.clone(), loc));
                    self.planned = loc.first + u64::from(loc.count);
                }
                let Some(r) = self.fetches.next().await else {
                    return Ok(None);
                };
                let (loc, bytes) = r?;
                let key = || self.shared.keys.fragment(loc.seg, loc.frag);
                let (h, records) = decode_fragment(&bytes)
                    .map_err(|d| corrupted(&self.shared.pchannel, &key(), d))?;
                if h.first_id != loc.first || h.count != loc.count {
                    return Err(corrupted(
                        &self.shared.pchannel,
                        &key(),
                        format!(
                            "holds ids {}+{}, the index says {}+{}",
                            h.first_id, h.count, loc.first, loc.count
                        ),
                    ));
                }
                for (i, r) in records.into_iter().enumerate() {
                    let id = loc.first + i as u64;
                    if id >= self.pos {
                        self.ready.push_back((id, r));
                    }
                }
            }
        }
        .boxed()
    }
}
