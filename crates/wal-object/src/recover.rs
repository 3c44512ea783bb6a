//! Opening a pchannel's log: claim an epoch, fence and seal the segment the previous writer was
//! filling, start a new one, and load the sealed segments' manifests. Also truncation.
//!
//! Every step is a create-if-absent that a concurrent opener may win; the loser starts the
//! step over from what it then lists, so two openers end with one owner and one
//! [`WalError::Superseded`] (or a higher epoch for the later one), never two writers.

use std::sync::Arc;

use futures::{StreamExt, TryStreamExt, stream};
use walden_common::Term;
use walden_object_store::{Blobs, Created, ObjectStoreError, create};
use walden_wal_api::WalError;

use crate::{
    Shared, corrupted,
    format::{AtFragmentKey, Claim, FragEntry, Manifest, decode_at_fragment_key},
    keys::Keys,
    unavailable,
};

/// Fragment keys fenced at once when taking a segment over.
const FENCE_WINDOW: u64 = 32;

/// Manifests and fragment headers fetched at once during an open.
const OPEN_PARALLELISM: usize = 16;

/// A segment found at open.
#[derive(Debug)]
pub(crate) struct FoundSeg {
    pub no: u64,
    pub first: u64,
    pub frags: Vec<(u64, u32)>,
    pub bytes: u64,
}

#[derive(Debug)]
pub(crate) struct Recovered {
    pub epoch: u64,
    /// Sealed segments, then the new (empty) active one.
    pub segs: Vec<FoundSeg>,
    pub end: u64,
}

pub(crate) async fn open(
    blobs: &dyn Blobs,
    keys: &Keys,
    pchannel: &str,
    term: Term,
) -> Result<Recovered, WalError> {
    let epoch = claim(blobs, keys, pchannel, term).await?;
    let (markers, end) = take_over(blobs, keys, pchannel, epoch, term).await?;
    // Every sealed segment's manifest, in parallel; the last marker is the new active segment.
    let (active, sealed) = markers.split_last().ok_or_else(|| {
        corrupted(
            pchannel,
            &keys.markers(),
            "no segment marker after the open",
        )
    })?;
    let gets: Vec<_> = sealed
        .iter()
        .map(|&(seg, _)| manifest_of_sealed(blobs, keys, pchannel, seg))
        .collect();
    let manifests: Vec<Manifest> = stream::iter(gets)
        .buffered(OPEN_PARALLELISM)
        .try_collect()
        .await?;
    let mut segs = Vec::with_capacity(markers.len());
    let mut expected: Option<u64> = None;
    for (&(no, first), m) in sealed.iter().zip(&manifests) {
        if m.first_id != first || expected.is_some_and(|e| e != first) {
            return Err(corrupted(
                pchannel,
                &keys.marker(no, first),
                format!(
                    "segment {no} starts at {} but the log before it ends at {expected:?}",
                    m.first_id
                ),
            ));
        }
        expected = Some(m.end_id());
        segs.push(found(no, m));
    }
    if expected.is_some_and(|e| e != active.1) || active.1 != end {
        return Err(corrupted(
            pchannel,
            &keys.marker(active.0, active.1),
            format!(
                "the new segment starts at {} but the log ends at {expected:?}",
                active.1
            ),
        ));
    }
    segs.push(FoundSeg {
        no: active.0,
        first: active.1,
        frags: Vec::new(),
        bytes: 0,
    });
    tracing::info!(%pchannel, epoch, %term, end, segments = segs.len(), "object WAL opened");
    Ok(Recovered { epoch, segs, end })
}

fn found(no: u64, m: &Manifest) -> FoundSeg {
    let mut next = m.first_id;
    let frags = m
        .frags
        .iter()
        .map(|f| {
            let at = next;
            next += u64::from(f.count);
            (at, f.count)
        })
        .collect();
    FoundSeg {
        no,
        first: m.first_id,
        frags,
        bytes: m.bytes(),
    }
}

/// The newest claim, if any.
async fn latest_claim(
    blobs: &dyn Blobs,
    keys: &Keys,
    pchannel: &str,
) -> Result<Option<Claim>, WalError> {
    let listed = blobs
        .list(&keys.epochs())
        .await
        .map_err(|e| unavailable(pchannel, "listing epoch claims", &e))?;
    let Some(key) = listed
        .iter()
        .rev()
        .find(|o| keys.parse_epoch(&o.key).is_some())
    else {
        return Ok(None);
    };
    let b = blobs
        .get(&key.key)
        .await
        .map_err(|e| unavailable(pchannel, "reading the latest epoch claim", &e))?;
    Claim::decode(&b)
        .map(Some)
        .map_err(|d| corrupted(pchannel, &key.key, d))
}

/// Claims an epoch above every earlier one and at least `term`; refuses a term below the
/// latest claim's.
async fn claim(
    blobs: &dyn Blobs,
    keys: &Keys,
    pchannel: &str,
    term: Term,
) -> Result<u64, WalError> {
    let nonce: u64 = rand::random();
    loop {
        let latest = latest_claim(blobs, keys, pchannel).await?;
        if let Some(c) = latest
            && term.0 < c.term
        {
            return Err(WalError::Fenced {
                pchannel: pchannel.to_owned(),
                term,
                current: Term(c.term),
            });
        }
        let epoch = latest.map_or(1, |c| c.epoch + 1).max(term.0);
        let mine = Claim {
            epoch,
            term: term.0,
            nonce,
        };
        let key = keys.epoch(epoch);
        match create(blobs, &key, mine.encode()).await {
            Ok(Created::Mine) => return Ok(epoch),
            Ok(Created::Taken(_)) => {} // another opener's: go round
            Err(e) => return Err(unavailable(pchannel, "claiming an epoch", &e)),
        }
    }
}

/// Seals the segment the previous writer was filling (after fencing it) and creates a new
/// one. Returns every marker `(segment, first id)`, ending with the new segment's, and the
/// log's end.
async fn take_over(
    blobs: &dyn Blobs,
    keys: &Keys,
    pchannel: &str,
    epoch: u64,
    term: Term,
) -> Result<(Vec<(u64, u64)>, u64), WalError> {
    loop {
        let mut markers = list_markers(blobs, keys, pchannel).await?;
        let (next_seg, end) = match markers.last() {
            None => (0, 0),
            Some(&(seg, first)) => {
                let m = match get_manifest(blobs, keys, pchannel, seg).await? {
                    Some(m) => m,
                    None => fence_and_seal(blobs, keys, pchannel, seg, first, epoch, term).await?,
                };
                (seg + 1, m.end_id())
            }
        };
        let key = keys.marker(next_seg, end);
        let created = match create(blobs, &key, marker_body(epoch)).await {
            Ok(Created::Mine) => true,
            Ok(Created::Taken(_)) => false,
            Err(e) => return Err(unavailable(pchannel, "creating a segment marker", &e)),
        };
        if !still_mine(blobs, keys, pchannel, epoch).await? {
            return Err(superseded(blobs, keys, pchannel, epoch).await);
        }
        if created {
            markers.push((next_seg, end));
            return Ok((markers, end));
        }
        // An older writer (rolling to a new segment) created it first and may be filling it:
        // go round, and fence and seal that one too.
    }
}

/// Whether no claim above `epoch` exists.
async fn still_mine(
    blobs: &dyn Blobs,
    keys: &Keys,
    pchannel: &str,
    epoch: u64,
) -> Result<bool, WalError> {
    Ok(latest_claim(blobs, keys, pchannel)
        .await?
        .is_none_or(|c| c.epoch <= epoch))
}

async fn superseded(blobs: &dyn Blobs, keys: &Keys, pchannel: &str, epoch: u64) -> WalError {
    let by_epoch = latest_claim(blobs, keys, pchannel)
        .await
        .ok()
        .flatten()
        .map_or(epoch + 1, |c| c.epoch);
    WalError::Superseded {
        pchannel: pchannel.to_owned(),
        epoch,
        by_epoch,
    }
}

pub(crate) async fn list_markers(
    blobs: &dyn Blobs,
    keys: &Keys,
    pchannel: &str,
) -> Result<Vec<(u64, u64)>, WalError> {
    let listed = blobs
        .list(&keys.markers())
        .await
        .map_err(|e| unavailable(pchannel, "listing segment markers", &e))?;
    let mut markers: Vec<(u64, u64)> = listed
        .iter()
        .filter_map(|o| keys.parse_marker(&o.key))
        .collect();
    markers.sort_unstable();
    Ok(markers)
}

async fn get_manifest(
    blobs: &dyn Blobs,
    keys: &Keys,
    pchannel: &str,
    seg: u64,
) -> Result<Option<Manifest>, WalError> {
    let key = keys.manifest(seg);
    match blobs.get(&key).await {
        Ok(b) => Manifest::decode(&b)
            .map(Some)
            .map_err(|d| corrupted(pchannel, &key, d)),
        Err(ObjectStoreError::NotFound { .. }) => Ok(None),
        Err(e) => Err(unavailable(pchannel, "reading a manifest", &e)),
    }
}

/// Writes a fence at the first missing fragment key of segment `seg` (fragments after a gap
/// were never acknowledged: an append is acknowledged only once every earlier fragment is
/// durable), then writes the segment's manifest.
async fn fence_and_seal(
    blobs: &dyn Blobs,
    keys: &Keys,
    pchannel: &str,
    seg: u64,
    first: u64,
    epoch: u64,
    term: Term,
) -> Result<Manifest, WalError> {
    let listed = blobs
        .list(&keys.segment(seg))
        .await
        .map_err(|e| unavailable(pchannel, "listing the active segment", &e))?;
    let mut present: Vec<u64> = listed
        .iter()
        .filter_map(|o| keys.parse_fragment(seg, &o.key))
        .collect();
    present.sort_unstable();
    // The first fragment number missing from the listing.
    let mut n = present
        .iter()
        .zip(0..)
        .find(|(f, i)| **f != *i)
        .map_or(present.len() as u64, |(_, i)| i);
    // Fragments past the gap were cut while the gap's upload was in flight, unless one says
    // the gap was already durable: then a fragment was lost.
    for &j in present.iter().filter(|j| **j > n) {
        if let Some((_, _, _, durable_before)) =
            fragment_header(blobs, keys, pchannel, seg, j).await?
            && u64::from(durable_before) > n
        {
            return Err(corrupted(
                pchannel,
                &keys.fragment(seg, n),
                format!(
                    "missing, but fragment {j} was written after {durable_before} fragments of                      segment {seg} were durable"
                ),
            ));
        }
    }
    let fence = crate::format::Fence {
        epoch,
        term: term.0,
    }
    .encode();
    // A writer still uploading fills the next keys as fast as one fence could chase them, so
    // fences go to a window of keys at once: the segment ends at the first key the fence won.
    // Fragments the old writer lands past that key are never acknowledged (one below them
    // failed) and never read (the manifest ends before them).
    loop {
        let creates: Vec<_> = (n..n + FENCE_WINDOW)
            .map(|k| {
                let key = keys.fragment(seg, k);
                let fence = fence.clone();
                async move { (create(blobs, &key, fence).await, key) }
            })
            .collect();
        let mut end = None;
        for (k, (r, key)) in (n..).zip(futures::future::join_all(creates).await) {
            match r {
                Ok(Created::Mine) => {}
                Ok(Created::Taken(b)) => match decode_at_fragment_key(&b) {
                    // The previous writer's upload landed first: it belongs to the segment.
                    Ok(AtFragmentKey::Fragment(_)) => continue,
                    Ok(AtFragmentKey::Fence(f)) if f.epoch > epoch => {
                        return Err(WalError::Superseded {
                            pchannel: pchannel.to_owned(),
                            epoch,
                            by_epoch: f.epoch,
                        });
                    }
                    // An older opener's fence: the segment ends there too.
                    Ok(AtFragmentKey::Fence(_)) => {}
                    Err(d) => return Err(corrupted(pchannel, &key, d)),
                },
                Err(e) => return Err(unavailable(pchannel, "writing a fence", &e)),
            }
            end = Some(k);
            break;
        }
        match end {
            Some(k) => {
                n = k;
                break;
            }
            None => n += FENCE_WINDOW,
        }
    }
    // Every fragment below the fence, its header read to learn its ids. The segment ends at
    // the first fence (an earlier opener's, which crashed before sealing).
    let gets: Vec<_> = (0..n)
        .map(|f| fragment_header(blobs, keys, pchannel, seg, f))
        .collect();
    let headers: Vec<Option<(u32, u32, u64, u32)>> = stream::iter(gets)
        .buffered(OPEN_PARALLELISM)
        .try_collect()
        .await?;
    let mut next = first;
    let mut frags = Vec::with_capacity(headers.len());
    for (i, (count, size, at, _)) in headers.into_iter().map_while(|h| h).enumerate() {
        if at != next {
            return Err(corrupted(
                pchannel,
                &keys.fragment(seg, i as u64),
                format!("starts at id {at}, expected {next}"),
            ));
        }
        next += u64::from(count);
        frags.push(FragEntry { count, size });
    }
    let manifest = Manifest {
        first_id: first,
        frags,
    };
    put_manifest(blobs, keys, pchannel, seg, &manifest).await?;
    Ok(manifest)
}

/// Creates a segment's manifest; one already there must say the same.
pub(crate) async fn put_manifest(
    blobs: &dyn Blobs,
    keys: &Keys,
    pchannel: &str,
    seg: u64,
    manifest: &Manifest,
) -> Result<(), WalError> {
    let key = keys.manifest(seg);
    match create(blobs, &key, manifest.encode()).await {
        Ok(Created::Mine) => Ok(()),
        // Another writer sealed it: it must have found the same fragments.
        Ok(Created::Taken(b)) => match Manifest::decode(&b) {
            Ok(m) if m == *manifest => Ok(()),
            _ => Err(corrupted(
                pchannel,
                &key,
                "sealed twice with different contents",
            )),
        },
        Err(e) => Err(unavailable(pchannel, "writing a manifest", &e)),
    }
}

/// Deletes whole sealed segments that end at or below `below`: the marker first (the segment
/// is then gone for every reader and opener), then its objects.
pub(crate) async fn truncate(shared: Arc<Shared>, below: u64) -> Result<(), WalError> {
    let p = &shared.pchannel;
    let doomed: Vec<(u64, u64)> = {
        let st = shared.lock();
        let n = st.segs.len().saturating_sub(1); // never the active one
        st.segs
            .iter()
            .take(n)
            .take_while(|s| s.end() <= below)
            .map(|s| (s.no, s.first))
            .collect()
    };
    if doomed.is_empty() {
        return Ok(());
    }
    // A writer that was taken over must not delete what its successor serves.
    if !still_mine(&*shared.blobs, &shared.keys, p, shared.epoch).await? {
        return Err(superseded(&*shared.blobs, &shared.keys, p, shared.epoch).await);
    }
    for (seg, first) in doomed {
        shared
            .blobs
            .delete(&shared.keys.marker(seg, first))
            .await
            .map_err(|e| unavailable(p, "deleting a segment marker", &e))?;
        {
            let mut st = shared.lock();
            if st.segs.front().is_some_and(|s| s.no == seg) {
                st.segs.pop_front();
            }
        }
        let objects = shared
            .blobs
            .list(&shared.keys.segment(seg))
            .await
            .map_err(|e| unavailable(p, "listing a truncated segment", &e))?;
        for o in objects {
            shared
                .blobs
                .delete(&o.key)
                .await
                .map_err(|e| unavailable(p, "deleting a truncated segment", &e))?;
        }
    }
    Ok(())
}

/// A fragment's `(count, size, first id, durable_before)`, or `None` where a fence stands.
async fn fragment_header(
    blobs: &dyn Blobs,
    keys: &Keys,
    pchannel: &str,
    seg: u64,
    f: u64,
) -> Result<Option<(u32, u32, u64, u32)>, WalError> {
    let key = keys.fragment(seg, f);
    let b = blobs.get(&key).await.map_err(|e| match e {
        ObjectStoreError::NotFound { .. } => {
            corrupted(pchannel, &key, "a fragment below the fence is missing")
        }
        e => unavailable(pchannel, "reading a fragment header", &e),
    })?;
    match decode_at_fragment_key(&b) {
        Ok(AtFragmentKey::Fragment(h)) => Ok(Some((
            h.count,
            b.len() as u32,
            h.first_id,
            h.durable_before,
        ))),
        Ok(AtFragmentKey::Fence(_)) => Ok(None),
        Err(d) => Err(corrupted(pchannel, &key, d)),
    }
}

async fn manifest_of_sealed(
    blobs: &dyn Blobs,
    keys: &Keys,
    pchannel: &str,
    seg: u64,
) -> Result<Manifest, WalError> {
    get_manifest(blobs, keys, pchannel, seg)
        .await?
        .ok_or_else(|| {
            corrupted(
                pchannel,
                &keys.manifest(seg),
                "a sealed segment has no manifest",
            )
        })
}

/// A marker's body: the epoch of the writer that created it, so that a create resolved by
/// reading back tells this writer's marker from another's.
pub(crate) fn marker_body(epoch: u64) -> bytes::Bytes {
    bytes::Bytes::copy_from_slice(&epoch.to_le_bytes())
}
