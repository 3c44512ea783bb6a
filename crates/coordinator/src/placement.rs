//! Where flushed segments live (docs/design.md §14.6): the leader coordinator places every
//! flushed segment of a loaded collection on `replicas` distinct query nodes, keeps a copy where
//! it is while its node lives, and balances rows across nodes. The result is one
//! `SegmentPlacement` per collection (`walden/placement/{collection_id}`), which query nodes
//! load from and delegators route by. With no query node alive there is no placement, and each
//! delegator holds its flushed segments itself.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use prost::Message as _;
use tracing::{info, warn};
use walden_metastore_api::{MetaError, MetaStore, keys};
use walden_proto::v1::{
    CollectionInfo, CollectionState, PlacedSegment, QueryNodeInfo, SegmentPlacement, SegmentState,
    VChannelManifest,
};

/// A flushed segment to place.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ToPlace {
    pub vchannel: String,
    pub segment_id: u64,
    pub rows: u64,
}

/// Places `segments` of one collection on `replicas` distinct nodes of `nodes` each
/// (fewer when there are fewer nodes). A segment keeps the live nodes `previous` gave it; the
/// missing copies go to the nodes with the fewest rows in `load` (which this updates, so that
/// collections placed one after the other balance together). Then copies move from the most to
/// the least loaded node while that lowers the most loaded node's rows.
pub fn place(
    segments: &[ToPlace],
    previous: &HashMap<u64, Vec<u64>>,
    nodes: &[u64],
    replicas: usize,
    load: &mut BTreeMap<u64, u64>,
) -> Vec<PlacedSegment> {
    let copies = replicas.clamp(1, nodes.len().max(1));
    for n in nodes {
        load.entry(*n).or_insert(0);
    }
    let alive: HashSet<u64> = nodes.iter().copied().collect();
    let mut out: Vec<PlacedSegment> = Vec::with_capacity(segments.len());
    // Kept copies first, so the fill below sees the real load.
    for s in segments {
        let mut kept: Vec<u64> = previous
            .get(&s.segment_id)
            .map(|p| p.iter().copied().filter(|n| alive.contains(n)).collect())
            .unwrap_or_default();
        kept.dedup();
        kept.truncate(copies);
        for n in &kept {
            *load.entry(*n).or_insert(0) += s.rows;
        }
        out.push(PlacedSegment {
            vchannel: s.vchannel.clone(),
            segment_id: s.segment_id,
            rows: s.rows,
            nodes: kept,
        });
    }
    if nodes.is_empty() {
        return out;
    }
    // Largest segments first: a greedy fill balances better.
    let mut order: Vec<usize> = (0..out.len()).collect();
    order.sort_by_key(|i| std::cmp::Reverse(out[*i].rows));
    for i in &order {
        while out[*i].nodes.len() < copies {
            let Some(n) = least_loaded(load, &out[*i].nodes) else {
                break;
            };
            *load.entry(n).or_insert(0) += out[*i].rows;
            out[*i].nodes.push(n);
        }
    }
    // Balance: move one copy at a time from the most loaded node while that helps.
    for _ in 0..out.len() {
        let Some((&max_node, &max)) = load
            .iter()
            .filter(|(n, _)| alive.contains(n))
            .max_by_key(|(_, l)| **l)
        else {
            break;
        };
        let mut best: Option<(usize, u64, u64)> = None;
        for (i, s) in out.iter().enumerate() {
            if !s.nodes.contains(&max_node) {
                continue;
            }
            let Some(to) = least_loaded(load, &s.nodes) else {
                continue;
            };
            let after = load[&to] + s.rows;
            // Only a move that leaves both nodes below the old maximum helps.
            if after < max && best.is_none_or(|(_, _, b)| after < b) {
                best = Some((i, to, after));
            }
        }
        let Some((i, to, _)) = best else { break };
        let s = &mut out[i];
        *load.entry(max_node).or_insert(0) -= s.rows;
        *load.entry(to).or_insert(0) += s.rows;
        for n in &mut s.nodes {
            if *n == max_node {
                *n = to;
            }
        }
    }
    out
}

/// The node with the fewest rows that is not in `exclude`.
fn least_loaded(load: &BTreeMap<u64, u64>, exclude: &[u64]) -> Option<u64> {
    load.iter()
        .filter(|(n, _)| !exclude.contains(n))
        .min_by_key(|(n, l)| (**l, **n))
        .map(|(n, _)| *n)
}

/// Computes every placement from the metastore and writes those that changed; deletes those
/// of collections no longer loaded (or all, when no query node is alive). `meta` is the
/// leader's fenced store. Returns how many records were written or deleted.
pub async fn round(meta: &dyn MetaStore) -> Result<usize, MetaError> {
    let mut nodes: Vec<u64> = Vec::new();
    for kv in meta.range(keys::QUERY_NODE_PREFIX).await? {
        if let Ok(n) = QueryNodeInfo::decode(kv.value.as_ref()) {
            nodes.push(n.id);
        }
    }
    nodes.sort_unstable();
    let mut existing: HashMap<String, (SegmentPlacement, Bytes)> = HashMap::new();
    for kv in meta.range(keys::PLACEMENT_PREFIX).await? {
        if let Ok(p) = SegmentPlacement::decode(kv.value.as_ref()) {
            existing.insert(kv.key, (p, kv.value));
        }
    }
    let mut load = BTreeMap::new();
    let mut wanted: HashMap<String, SegmentPlacement> = HashMap::new();
    if !nodes.is_empty() {
        let mut collections: Vec<CollectionInfo> = meta
            .range(keys::COLLECTION_PREFIX)
            .await?
            .iter()
            .filter_map(|kv| CollectionInfo::decode(kv.value.as_ref()).ok())
            .filter(|c| c.state() == CollectionState::Created && !c.released)
            .collect();
        collections.sort_by_key(|c| c.collection_id);
        for c in collections {
            let mut segments = Vec::new();
            for kv in meta.range(&keys::manifest_prefix(c.collection_id)).await? {
                let Ok(m) = VChannelManifest::decode(kv.value.as_ref()) else {
                    continue;
                };
                let vchannel = kv.key.rsplit('/').next().unwrap_or_default().to_owned();
                segments.extend(
                    m.segments
                        .iter()
                        .filter(|s| {
                            s.rows > 0
                                && matches!(
                                    s.state(),
                                    SegmentState::Flushed | SegmentState::Compacted
                                )
                        })
                        .map(|s| ToPlace {
                            vchannel: vchannel.clone(),
                            segment_id: s.segment_id,
                            rows: s.rows,
                        }),
                );
            }
            let key = keys::placement(c.collection_id);
            let previous: HashMap<u64, Vec<u64>> = existing
                .get(&key)
                .map(|(p, _)| {
                    p.segments
                        .iter()
                        .map(|s| (s.segment_id, s.nodes.clone()))
                        .collect()
                })
                .unwrap_or_default();
            let replicas = c.replicas.max(1) as usize;
            let placed = place(&segments, &previous, &nodes, replicas, &mut load);
            wanted.insert(
                key,
                SegmentPlacement {
                    collection_id: c.collection_id,
                    collection: c.name.clone(),
                    replicas: replicas as u32,
                    segments: placed,
                },
            );
        }
    }
    let mut changes = 0;
    for (key, p) in &wanted {
        let value = Bytes::from(p.encode_to_vec());
        if existing.get(key).is_some_and(|(_, v)| *v == value) {
            continue;
        }
        meta.put(key, value, None).await?;
        changes += 1;
    }
    for key in existing.keys().filter(|k| !wanted.contains_key(*k)) {
        meta.delete(key).await?;
        changes += 1;
    }
    Ok(changes)
}

/// Runs placement rounds on every change of query nodes, manifests or the catalog (and every
/// `interval`), until aborted. `meta` is the leader's fenced store.
pub async fn run(meta: Arc<dyn MetaStore>, interval: Duration) {
    loop {
        let watches = async {
            Ok::<_, MetaError>((
                meta.watch(keys::QUERY_NODE_PREFIX).await?,
                meta.watch(keys::MANIFESTS).await?,
                meta.watch(keys::COLLECTION_PREFIX).await?,
            ))
        };
        let (mut nodes, mut manifests, mut catalog) = match watches.await {
            Ok(w) => w,
            Err(e) => {
                warn!(error = %e, "placement: watching failed; retrying");
                tokio::time::sleep(interval).await;
                continue;
            }
        };
        loop {
            match round(&*meta).await {
                Ok(0) => {}
                Ok(n) => info!(changed = n, "segment placement updated"),
                Err(e) => warn!(error = %e, "placement round failed"),
            }
            let ended = tokio::select! {
                e = nodes.recv() => e.is_none(),
                e = manifests.recv() => e.is_none(),
                e = catalog.recv() => e.is_none(),
                () = tokio::time::sleep(interval) => false,
            };
            if ended {
                break;
            }
            // Coalesce a burst of changes into one round.
            tokio::time::sleep(Duration::from_millis(50)).await;
            while nodes.try_recv().is_ok()
                || manifests.try_recv().is_ok()
                || catalog.try_recv().is_ok()
            {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segs(n: u64, rows: u64) -> Vec<ToPlace> {
        (0..n)
            .map(|i| ToPlace {
                vchannel: format!("v{}", i % 2),
                segment_id: i + 1,
                rows,
            })
            .collect()
    }

    fn loads(p: &[PlacedSegment]) -> BTreeMap<u64, u64> {
        let mut l = BTreeMap::new();
        for s in p {
            for n in &s.nodes {
                *l.entry(*n).or_insert(0) += s.rows;
            }
        }
        l
    }

    #[test]
    fn every_segment_gets_distinct_nodes_per_replica_and_rows_balance() {
        let p = place(
            &segs(8, 100),
            &HashMap::new(),
            &[1, 2, 3],
            2,
            &mut BTreeMap::new(),
        );
        for s in &p {
            assert_eq!(s.nodes.len(), 2);
            assert_ne!(s.nodes[0], s.nodes[1]);
        }
        let l = loads(&p);
        let (min, max) = (l.values().min().unwrap(), l.values().max().unwrap());
        assert!(max - min <= 100, "{l:?}");
        // More replicas than nodes: one copy per node.
        let p = place(&segs(2, 1), &HashMap::new(), &[7], 3, &mut BTreeMap::new());
        assert!(p.iter().all(|s| s.nodes == vec![7]));
    }

    #[test]
    fn copies_stay_on_live_nodes_and_a_lost_nodes_copies_move_to_the_others() {
        let first = place(
            &segs(6, 100),
            &HashMap::new(),
            &[1, 2],
            2,
            &mut BTreeMap::new(),
        );
        let previous: HashMap<u64, Vec<u64>> = first
            .iter()
            .map(|s| (s.segment_id, s.nodes.clone()))
            .collect();
        // Same nodes: nothing moves.
        let again = place(&segs(6, 100), &previous, &[1, 2], 2, &mut BTreeMap::new());
        assert_eq!(again, first);
        // Node 2 lost, node 3 joins: node 1 keeps its copies, node 3 takes node 2's.
        let after = place(&segs(6, 100), &previous, &[1, 3], 2, &mut BTreeMap::new());
        for s in &after {
            assert!(s.nodes.contains(&1) && s.nodes.contains(&3), "{s:?}");
        }
    }

    #[test]
    fn a_new_node_takes_a_share_of_the_rows() {
        let first = place(
            &segs(8, 100),
            &HashMap::new(),
            &[1, 2],
            1,
            &mut BTreeMap::new(),
        );
        let previous: HashMap<u64, Vec<u64>> = first
            .iter()
            .map(|s| (s.segment_id, s.nodes.clone()))
            .collect();
        let after = place(
            &segs(8, 100),
            &previous,
            &[1, 2, 3],
            1,
            &mut BTreeMap::new(),
        );
        let l = loads(&after);
        assert!(l.get(&3).copied().unwrap_or(0) >= 200, "{l:?}");
        let moved = after
            .iter()
            .zip(&first)
            .filter(|(a, b)| a.nodes != b.nodes)
            .count();
        assert!(moved <= 3, "only what balancing needs moves: {moved}");
    }
}
