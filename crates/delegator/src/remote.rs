//! Flushed segments held by query nodes (docs/design.md §14.6).
//!
//! When the leader coordinator has placed a collection's flushed segments on query nodes, its
//! delegators hold only growing rows and route the sealed part of each read to the nodes:
//!
//! * **Sync.** Every [`SYNC_INTERVAL`] a delegator asks each query node what it holds. A
//!   segment becomes usable on a node ("synced") once the delegator has sent it every delete it
//!   knows whose key the segment's key filter may hold. A node that restarted (a new
//!   incarnation) or failed a call is synced again from nothing.
//! * **Forwarding.** Deletes read from the WAL are forwarded, in tick order, to each synced node
//!   whose segments may hold the key, before the served tick moves past them. Sync and
//!   forwarding take the shard's forwarding lock, so no delete falls between the two.
//! * **Routing.** Each segment is searched on one synced copy, chosen in turn across replicas;
//!   a failed node's segments are asked again of another copy. A segment with no synced copy
//!   within `query.max_wait_ms` fails the read with UNAVAILABLE (retryable): never a partial
//!   answer reported as whole.

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use prost::Message as _;
use tracing::{debug, warn};
use walden_metastore_api::keys;
use walden_proto::v1::{
    DeleteIds, ForwardDeletesRequest, QueryNodeInfo, QueryNodeStateRequest, QueryRequest,
    SearchRequest, SegmentQueryRequest, SegmentSearchRequest, query_node_client::QueryNodeClient,
};
use walden_query::{Hits, KeyFilter};
use walden_segment_format::Pk;

use crate::{Ctx, DelegatorError, Shard};

/// How often delegators ask query nodes what they hold.
pub(crate) const SYNC_INTERVAL: Duration = Duration::from_millis(200);
/// How long one call to a query node may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

type Client = QueryNodeClient<walden_connect::Authed>;

/// The query nodes registered, and a connection to each.
#[derive(Debug, Default)]
pub(crate) struct QueryNodes {
    nodes: Mutex<HashMap<u64, (String, Client)>>,
}

impl QueryNodes {
    pub fn list(&self) -> Vec<(u64, Client)> {
        self.nodes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(id, (_, c))| (*id, c.clone()))
            .collect()
    }

    fn client(&self, id: u64) -> Option<Client> {
        self.nodes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .map(|(_, c)| c.clone())
    }

    /// Makes the connections match the registrations.
    pub async fn refresh(&self, ctx: &Ctx) -> Result<(), DelegatorError> {
        let mut seen = HashMap::new();
        for kv in ctx.meta.range(keys::QUERY_NODE_PREFIX).await? {
            if let Ok(n) = QueryNodeInfo::decode(kv.value.as_ref()) {
                seen.insert(n.id, n.address);
            }
        }
        let mut nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        nodes.retain(|id, (addr, _)| seen.get(id) == Some(addr));
        for (id, addr) in seen {
            if nodes.contains_key(&id) {
                continue;
            }
            match walden_connect::lazy(&addr, &ctx.connect, Some(CALL_TIMEOUT)) {
                Ok(ch) => {
                    let client = QueryNodeClient::new(ch)
                        .max_decoding_message_size(64 << 20)
                        .max_encoding_message_size(64 << 20);
                    nodes.insert(id, (addr, client));
                }
                Err(e) => warn!(id, addr, error = %e, "query node address unusable"),
            }
        }
        Ok(())
    }
}

/// What one node holds of a shard, synced.
#[derive(Debug, Default)]
struct Synced {
    incarnation: u64,
    /// Segment id → rows in its graph.
    segments: HashMap<u64, u64>,
}

/// A shard's copies of its flushed segments on query nodes.
#[derive(Debug, Default)]
pub(crate) struct Replicas {
    synced: Mutex<HashMap<u64, Synced>>,
    filters: Mutex<HashMap<u64, Arc<KeyFilter>>>,
    /// Held while deletes are forwarded or a segment is synced.
    pub forward: tokio::sync::Mutex<()>,
    turn: AtomicUsize,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn call_failed(node: u64, e: &tonic::Status) -> DelegatorError {
    DelegatorError::Unavailable(format!("query node {node}: {}", e.message()))
}

fn delete_ids(deletes: &[(Pk, u64)]) -> (DeleteIds, Vec<u64>) {
    let mut ids = DeleteIds::default();
    let mut ticks = Vec::with_capacity(deletes.len());
    for (k, t) in deletes {
        match k {
            Pk::Int(i) => ids.int_ids.push(*i),
            Pk::Str(s) => ids.str_ids.push(s.clone()),
        }
        ticks.push(*t);
    }
    (ids, ticks)
}

impl Replicas {
    /// Segments with a synced copy somewhere, with the most rows in a graph of any copy.
    pub fn usable(&self) -> HashMap<u64, u64> {
        let mut out: HashMap<u64, u64> = HashMap::new();
        for s in lock(&self.synced).values() {
            for (id, indexed) in &s.segments {
                let e = out.entry(*id).or_insert(0);
                *e = (*e).max(*indexed);
            }
        }
        out
    }

    fn forget(&self, node: u64) {
        lock(&self.synced).remove(&node);
    }

    /// One synced copy per segment of `ids` (taking turns across copies, skipping `avoid`),
    /// grouped by node; `Err(id)` names a segment with no copy.
    fn plan(&self, ids: &[u64], avoid: &HashSet<u64>) -> Result<Vec<(u64, u64, Vec<u64>)>, u64> {
        let synced = lock(&self.synced);
        let turn = self.turn.fetch_add(1, Ordering::Relaxed);
        let mut groups: HashMap<u64, Vec<u64>> = HashMap::new();
        for id in ids {
            let mut copies: Vec<u64> = synced
                .iter()
                .filter(|(n, s)| !avoid.contains(n) && s.segments.contains_key(id))
                .map(|(n, _)| *n)
                .collect();
            if copies.is_empty() {
                return Err(*id);
            }
            copies.sort_unstable();
            groups
                .entry(copies[turn % copies.len()])
                .or_default()
                .push(*id);
        }
        Ok(groups
            .into_iter()
            .map(|(n, ids)| (n, synced[&n].incarnation, ids))
            .collect())
    }

    /// Sends the deletes read since the last call to every synced node whose segments may
    /// hold their keys. Called by the delegator's reading loop before the served tick moves.
    pub async fn forward(&self, shard: &Shard, ctx: &Ctx, deletes: &[(Pk, u64)]) {
        let _turn = self.forward.lock().await;
        let targets: Vec<(u64, u64, Vec<Arc<KeyFilter>>)> = {
            let filters = lock(&self.filters);
            lock(&self.synced)
                .iter()
                .map(|(n, s)| {
                    let f = s
                        .segments
                        .keys()
                        .filter_map(|id| filters.get(id).cloned())
                        .collect();
                    (*n, s.incarnation, f)
                })
                .collect()
        };
        for (node, incarnation, filters) in targets {
            let mine: Vec<(Pk, u64)> = deletes
                .iter()
                .filter(|(k, _)| filters.iter().any(|f| f.may_contain(k)))
                .cloned()
                .collect();
            if mine.is_empty() {
                continue;
            }
            let ok = match ctx.query_nodes.client(node) {
                Some(mut c) => {
                    let (ids, ticks) = delete_ids(&mine);
                    let req = ForwardDeletesRequest {
                        collection_id: shard.collection_id,
                        vchannel: shard.vchannel.clone(),
                        segment_ids: Vec::new(),
                        incarnation,
                        ids: Some(ids),
                        ticks,
                    };
                    match c.forward_deletes(req).await {
                        Ok(_) => true,
                        Err(e) => {
                            warn!(node, vchannel = shard.vchannel, error = %e.message(), "forwarding deletes failed; the node is synced again");
                            false
                        }
                    }
                }
                None => false,
            };
            if !ok {
                self.forget(node);
            }
        }
    }

    /// Asks every query node what it holds of `shard` and syncs the new copies.
    pub async fn sync(&self, shard: &Shard, ctx: &Ctx) {
        for (node, mut client) in ctx.query_nodes.list() {
            let have: Vec<u64> = lock(&self.filters).keys().copied().collect();
            let state = match client
                .state(QueryNodeStateRequest {
                    have_filters: have,
                    collection_id: shard.collection_id,
                    vchannel: shard.vchannel.clone(),
                })
                .await
            {
                Ok(r) => r.into_inner(),
                Err(e) => {
                    if lock(&self.synced).remove(&node).is_some() {
                        warn!(node, error = %e.message(), "query node unreachable");
                    }
                    continue;
                }
            };
            let held: Vec<_> = state
                .segments
                .into_iter()
                .filter(|s| s.collection_id == shard.collection_id && s.vchannel == shard.vchannel)
                .collect();
            for s in &held {
                if !s.key_filter.is_empty() {
                    match KeyFilter::from_bytes(&s.key_filter) {
                        Ok(f) => {
                            lock(&self.filters).insert(s.segment_id, Arc::new(f));
                        }
                        Err(e) => warn!(node, segment = s.segment_id, error = %e, "bad key filter"),
                    }
                }
            }
            let _turn = self.forward.lock().await;
            let new: Vec<(u64, u64)> = {
                let mut synced = lock(&self.synced);
                let entry = synced.entry(node).or_default();
                if entry.incarnation != state.incarnation {
                    *entry = Synced {
                        incarnation: state.incarnation,
                        segments: HashMap::new(),
                    };
                }
                let ids: HashSet<u64> = held.iter().map(|s| s.segment_id).collect();
                entry.segments.retain(|id, _| ids.contains(id));
                for s in &held {
                    if let Some(i) = entry.segments.get_mut(&s.segment_id) {
                        *i = s.indexed_rows;
                    }
                }
                held.iter()
                    .filter(|s| !entry.segments.contains_key(&s.segment_id))
                    .map(|s| (s.segment_id, s.indexed_rows))
                    .collect()
            };
            if new.is_empty() {
                continue;
            }
            // Every delete known that the new segments may hold.
            let deletes: Vec<(Pk, u64)> = {
                let filters = lock(&self.filters);
                let fs: Vec<Arc<KeyFilter>> = new
                    .iter()
                    .filter_map(|(id, _)| filters.get(id).cloned())
                    .collect();
                let st = shard.read();
                st.deletes
                    .iter()
                    .filter(|(k, _)| fs.len() < new.len() || fs.iter().any(|f| f.may_contain(k)))
                    .map(|(k, t)| (k.clone(), *t))
                    .collect()
            };
            let (ids, ticks) = delete_ids(&deletes);
            let req = ForwardDeletesRequest {
                collection_id: shard.collection_id,
                vchannel: shard.vchannel.clone(),
                segment_ids: new.iter().map(|(id, _)| *id).collect(),
                incarnation: state.incarnation,
                ids: Some(ids),
                ticks,
            };
            match client.forward_deletes(req).await {
                Ok(_) => {
                    debug!(
                        node,
                        vchannel = shard.vchannel,
                        segments = new.len(),
                        deletes = deletes.len(),
                        "segments synced"
                    );
                    let mut synced = lock(&self.synced);
                    if let Some(e) = synced.get_mut(&node)
                        && e.incarnation == state.incarnation
                    {
                        e.segments.extend(new);
                    }
                }
                Err(e) => {
                    warn!(node, error = %e.message(), "syncing segments failed");
                    self.forget(node);
                }
            }
        }
    }

    /// Waits until every segment of `ids` has a synced copy (at most `within`).
    pub async fn ready(&self, ids: &[u64], within: Duration) -> bool {
        let deadline = Instant::now() + within;
        loop {
            if self.plan(ids, &HashSet::new()).is_ok() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Runs `call` for every segment of `ids` on one synced copy each, asking another copy when
    /// a node fails. Either every segment answered, or an error.
    async fn each<T, F, Fut>(
        &self,
        ctx: &Ctx,
        ids: &[u64],
        call: F,
    ) -> Result<Vec<T>, DelegatorError>
    where
        F: Fn(Client, u64, Vec<u64>) -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        let wait = Duration::from_millis(ctx.config.max_wait_ms);
        if !self.ready(ids, wait).await {
            let missing = self.plan(ids, &HashSet::new()).err().unwrap_or_default();
            return Err(DelegatorError::Unavailable(format!(
                "no query node holds a synced copy of segment {missing}"
            )));
        }
        let mut out = Vec::new();
        let mut left: Vec<u64> = ids.to_vec();
        let mut avoid = HashSet::new();
        let mut last = None;
        for _ in 0..4 {
            if left.is_empty() {
                return Ok(out);
            }
            let Ok(plan) = self.plan(&left, &avoid) else {
                break;
            };
            let calls = plan.into_iter().map(|(node, incarnation, seg_ids)| {
                let client = ctx.query_nodes.client(node);
                let fut = client.map(|c| call(c, incarnation, seg_ids.clone()));
                async move {
                    let r = match fut {
                        Some(f) => f.await,
                        None => Err(tonic::Status::unavailable("not registered")),
                    };
                    (node, seg_ids, r)
                }
            });
            left.clear();
            for (node, seg_ids, r) in futures::future::join_all(calls).await {
                match r {
                    Ok(v) => out.push(v),
                    Err(e) => {
                        if e.code() == tonic::Code::InvalidArgument {
                            return Err(DelegatorError::InvalidArgument(e.message().to_owned()));
                        }
                        warn!(node, error = %e.message(), "query node failed a read; asking another copy");
                        self.forget(node);
                        avoid.insert(node);
                        left.extend(seg_ids);
                        last = Some(call_failed(node, &e));
                    }
                }
            }
        }
        if left.is_empty() {
            return Ok(out);
        }
        Err(last.unwrap_or_else(|| {
            DelegatorError::Unavailable("no query node could serve the read".into())
        }))
    }

    /// The sealed part of a search, one `Hits` per query vector per node asked.
    pub async fn search(
        &self,
        shard: &Shard,
        ctx: &Ctx,
        ids: &[u64],
        req: &SearchRequest,
    ) -> Result<Vec<Vec<Hits>>, DelegatorError> {
        let answers = self
            .each(ctx, ids, |mut c, incarnation, segment_ids| {
                let r = SegmentSearchRequest {
                    collection_id: shard.collection_id,
                    vchannel: shard.vchannel.clone(),
                    segment_ids,
                    incarnation,
                    search: Some(req.clone()),
                };
                async move { c.search_segments(r).await }
            })
            .await?;
        let mut out = Vec::with_capacity(answers.len());
        for a in answers {
            let mut per_query = Vec::new();
            for h in a.into_inner().results {
                per_query.push(walden_querynode::wire::hits_from_proto(h)?);
            }
            out.push(per_query);
        }
        Ok(out)
    }

    /// The sealed part of a query: one answer per node asked.
    pub async fn query(
        &self,
        shard: &Shard,
        ctx: &Ctx,
        ids: &[u64],
        req: &QueryRequest,
    ) -> Result<Vec<walden_proto::v1::QueryResponse>, DelegatorError> {
        let answers = self
            .each(ctx, ids, |mut c, incarnation, segment_ids| {
                let r = SegmentQueryRequest {
                    collection_id: shard.collection_id,
                    vchannel: shard.vchannel.clone(),
                    segment_ids,
                    incarnation,
                    query: Some(req.clone()),
                };
                async move { c.query_segments(r).await }
            })
            .await?;
        Ok(answers
            .into_iter()
            .map(tonic::Response::into_inner)
            .collect())
    }
}
