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
    CollectionInfo, CollectionState, NodeInfo, PChannelAssignment, PlacedSegment, QueryNodeInfo,
    ReadReplica, ReadReplicas, SegmentPlacement, SegmentState, VChannelManifest,
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

/// Chooses `extra` streaming nodes per vchannel of `vchannels` (`(vchannel, pchannel)`), none
/// of them its pchannel's owner: a read replica stays on its node while that node lives, and
/// new ones go to the nodes with the fewest replicas in `load` (which this updates).
pub fn place_replicas(
    vchannels: &[(String, String)],
    owners: &HashMap<String, u64>,
    nodes: &[u64],
    previous: &HashMap<String, Vec<u64>>,
    extra: usize,
    load: &mut BTreeMap<u64, u64>,
) -> Vec<(String, String, Vec<u64>)> {
    for n in nodes {
        load.entry(*n).or_insert(0);
    }
    let mut out = Vec::with_capacity(vchannels.len());
    for (v, p) in vchannels {
        let owner = owners.get(p).copied();
        let mut chosen: Vec<u64> = previous
            .get(v)
            .map(|prev| {
                prev.iter()
                    .copied()
                    .filter(|n| nodes.contains(n) && Some(*n) != owner)
                    .collect()
            })
            .unwrap_or_default();
        chosen.truncate(extra);
        for n in &chosen {
            *load.entry(*n).or_insert(0) += 1;
        }
        while chosen.len() < extra {
            let mut exclude = chosen.clone();
            exclude.extend(owner);
            let Some(n) = least_loaded(load, &exclude) else {
                break;
            };
            *load.entry(n).or_insert(0) += 1;
            chosen.push(n);
        }
        out.push((v.clone(), p.clone(), chosen));
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
    let mut collections: Vec<CollectionInfo> = meta
        .range(keys::COLLECTION_PREFIX)
        .await?
        .iter()
        .filter_map(|kv| CollectionInfo::decode(kv.value.as_ref()).ok())
        .filter(|c| c.state() == CollectionState::Created && !c.released)
        .collect();
    collections.sort_by_key(|c| c.collection_id);
    let mut changes = replicas_round(meta, &collections).await?;
    let mut load = BTreeMap::new();
    let mut wanted: HashMap<String, SegmentPlacement> = HashMap::new();
    if !nodes.is_empty() {
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

/// Places the read replicas of `collections` (those loaded with more than one replica) on live
/// streaming nodes other than each pchannel's owner; writes the records that changed and deletes
/// the others. Returns how many it wrote or deleted.
async fn replicas_round(
    meta: &dyn MetaStore,
    collections: &[CollectionInfo],
) -> Result<usize, MetaError> {
    let mut nodes: HashMap<u64, String> = HashMap::new();
    for kv in meta.range(keys::NODE_PREFIX).await? {
        if let Ok(n) = NodeInfo::decode(kv.value.as_ref())
            && !n.draining
        {
            nodes.insert(n.id, n.address);
        }
    }
    let mut owners: HashMap<String, u64> = HashMap::new();
    for kv in meta.range(keys::ASSIGNMENT_PREFIX).await? {
        if let Ok(a) = PChannelAssignment::decode(kv.value.as_ref()) {
            owners.insert(a.pchannel, a.node_id);
        }
    }
    let mut existing: HashMap<String, Bytes> = HashMap::new();
    for kv in meta.range(keys::REPLICAS_PREFIX).await? {
        existing.insert(kv.key, kv.value);
    }
    let mut ids: Vec<u64> = nodes.keys().copied().collect();
    ids.sort_unstable();
    let mut load = BTreeMap::new();
    let mut wanted: HashMap<String, Bytes> = HashMap::new();
    for c in collections.iter().filter(|c| c.replicas > 1) {
        let key = keys::replicas(c.collection_id);
        let previous: HashMap<String, Vec<u64>> = existing
            .get(&key)
            .and_then(|v| ReadReplicas::decode(v.as_ref()).ok())
            .map(|r| {
                r.vchannels
                    .into_iter()
                    .map(|v| (v.vchannel, v.nodes))
                    .collect()
            })
            .unwrap_or_default();
        let vchannels: Vec<(String, String)> = c
            .vchannels
            .iter()
            .map(|v| (v.name.clone(), v.pchannel.clone()))
            .collect();
        let placed = place_replicas(
            &vchannels,
            &owners,
            &ids,
            &previous,
            c.replicas as usize - 1,
            &mut load,
        );
        let record = ReadReplicas {
            collection_id: c.collection_id,
            collection: c.name.clone(),
            vchannels: placed
                .into_iter()
                .map(|(vchannel, pchannel, nodes_of)| ReadReplica {
                    addresses: nodes_of.iter().map(|n| nodes[n].clone()).collect(),
                    vchannel,
                    pchannel,
                    nodes: nodes_of,
                })
                .collect(),
        };
        wanted.insert(key, Bytes::from(record.encode_to_vec()));
    }
    let mut changes = 0;
    for (key, value) in &wanted {
        if existing.get(key) == Some(value) {
            continue;
        }
        meta.put(key, value.clone(), None).await?;
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
                meta.watch(keys::ASSIGNMENT_PREFIX).await?,
            ))
        };
        let (mut nodes, mut manifests, mut catalog, mut owners) = match watches.await {
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
                e = owners.recv() => e.is_none(),
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
                || owners.try_recv().is_ok()
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
    fn read_replicas_avoid_the_owner_stay_put_and_spread() {
        let vchannels: Vec<(String, String)> = (0..4)
            .map(|i| (format!("v{i}"), format!("p{}", i % 2)))
            .collect();
        let owners: HashMap<String, u64> = [("p0".into(), 1), ("p1".into(), 2)].into();
        let first = place_replicas(
            &vchannels,
            &owners,
            &[1, 2, 3],
            &HashMap::new(),
            1,
            &mut BTreeMap::new(),
        );
        for (v, p, nodes) in &first {
            assert_eq!(nodes.len(), 1, "{v}");
            assert_ne!(Some(&nodes[0]), owners.get(p), "{v} never on its owner");
        }
        let previous: HashMap<String, Vec<u64>> = first
            .iter()
            .map(|(v, _, n)| (v.clone(), n.clone()))
            .collect();
        let again = place_replicas(
            &vchannels,
            &owners,
            &[1, 2, 3],
            &previous,
            1,
            &mut BTreeMap::new(),
        );
        assert_eq!(again, first, "nothing moves while the nodes live");
        // Node 3 lost: its replicas go to the other non-owner.
        let after = place_replicas(
            &vchannels,
            &owners,
            &[1, 2],
            &previous,
            1,
            &mut BTreeMap::new(),
        );
        for (_, p, nodes) in &after {
            assert_eq!(nodes, &vec![if p == "p0" { 2 } else { 1 }]);
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
