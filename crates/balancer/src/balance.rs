//! The leader's balancing loop. Every decision is a compare-and-swap on the pchannel's record
//! (and its term key), fenced by the leader key, written *before* any node acts: nodes learn
//! their assignments by watching the records, so there is no message to lose.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use prost::Message as _;
use tracing::{info, warn};
use walden_metastore_api::{Compare, MetaStore, Op, Txn, keys};
use walden_proto::v1::{
    AssignmentHistory, AssignmentState, CollectionInfo, NodeInfo, PChannelAssignment,
};
use walden_tso::now_ms;

use crate::{
    BalanceError, Metrics,
    election::Leadership,
    policy::{self, NodeView, PChannelView, Placement},
    topology::{Record, Topology},
};

/// How the leader places pchannels.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BalancerConfig {
    /// The pchannels the cluster has; records are created for any that lack one.
    pub pchannels: Vec<String>,
    /// Most assignments in flight (ASSIGNING) at once, over all nodes. Default 64.
    pub max_moves_in_flight: usize,
    /// An assignment not confirmed within this is failed and placed again. Default 60 s.
    pub open_timeout: Duration,
    /// A round runs at least this often (and on every change). Default 1 s.
    pub interval: Duration,
    /// Longest backoff before a pchannel that failed to open is placed again. Default 10 s.
    pub max_failure_backoff: Duration,
}

impl Default for BalancerConfig {
    fn default() -> Self {
        Self {
            pchannels: Vec::new(),
            max_moves_in_flight: 64,
            open_timeout: Duration::from_secs(60),
            interval: Duration::from_secs(1),
            max_failure_backoff: Duration::from_secs(10),
        }
    }
}

/// How many earlier (term, node) pairs a record keeps.
const HISTORY: usize = 8;

/// The leader's balancer.
#[derive(Debug)]
pub struct Balancer {
    meta: Arc<dyn MetaStore>,
    topo: Arc<Topology>,
    lead: Leadership,
    config: BalancerConfig,
    metrics: Metrics,
    /// Assignments this leader wrote and has not seen confirmed: pchannel -> (term, when).
    pending: std::sync::Mutex<HashMap<String, (u64, Instant)>>,
    /// Vchannels per pchannel, from the catalog, and when they were counted.
    weights: std::sync::Mutex<(BTreeMap<String, u64>, Option<Instant>)>,
    /// Nodes seen alive in the last round (to count the ones whose lease ended).
    alive: std::sync::Mutex<Vec<u64>>,
}

fn backoff(failures: u32, max: Duration) -> Duration {
    let ms = 100u64.saturating_mul(1 << failures.min(16));
    Duration::from_millis(ms).min(max)
}

impl Balancer {
    pub fn new(
        meta: Arc<dyn MetaStore>,
        topo: Arc<Topology>,
        lead: Leadership,
        config: BalancerConfig,
        metrics: Metrics,
    ) -> Arc<Self> {
        Arc::new(Self {
            meta,
            topo,
            lead,
            config,
            metrics,
            pending: std::sync::Mutex::new(HashMap::new()),
            weights: std::sync::Mutex::new((BTreeMap::new(), None)),
            alive: std::sync::Mutex::new(Vec::new()),
        })
    }

    pub fn leadership(&self) -> &Leadership {
        &self.lead
    }

    /// Balances until the leadership is lost.
    pub async fn run(self: Arc<Self>) {
        let mut lost = self.lead.lost.clone();
        if let Err(e) = self.create_missing_records().await {
            warn!(error = %e, "creating pchannel records failed; retrying in the rounds");
        }
        loop {
            if self.lead.is_lost() {
                return;
            }
            if let Err(e) = self.round().await {
                warn!(error = %e, "balance round failed");
            }
            tokio::select! {
                () = self.topo.changed() => {}
                () = tokio::time::sleep(self.config.interval) => {}
                _ = lost.changed() => {}
            }
        }
    }

    async fn create_missing_records(&self) -> Result<(), BalanceError> {
        for name in &self.config.pchannels {
            if self.topo.record(name).is_some() {
                continue;
            }
            let record = PChannelAssignment {
                pchannel: name.clone(),
                state: AssignmentState::Unassigned as i32,
                updated_ms: now_ms(),
                ..Default::default()
            };
            let key = keys::assignment(name);
            let created = self
                .meta
                .txn(Txn {
                    compare: vec![Compare::absent(&key), self.lead.fence()],
                    success: vec![Op::Put {
                        key,
                        value: Bytes::from(record.encode_to_vec()),
                        lease: None,
                    }],
                    failure: vec![],
                })
                .await?;
            if created.succeeded {
                info!(pchannel = name, "pchannel record created");
            }
        }
        Ok(())
    }

    /// Vchannels per pchannel (refreshed every few seconds: collections change rarely).
    async fn weights(&self) -> BTreeMap<String, u64> {
        {
            let w = self.weights.lock().unwrap_or_else(|e| e.into_inner());
            if w.1.is_some_and(|t| t.elapsed() < Duration::from_secs(5)) {
                return w.0.clone();
            }
        }
        let mut counts = BTreeMap::new();
        if let Ok(kvs) = self.meta.range(keys::COLLECTION_PREFIX).await {
            for kv in kvs {
                if let Ok(info) = CollectionInfo::decode(kv.value.as_ref()) {
                    for v in info.vchannels {
                        *counts.entry(v.pchannel).or_insert(0) += 1;
                    }
                }
            }
        }
        *self.weights.lock().unwrap_or_else(|e| e.into_inner()) =
            (counts.clone(), Some(Instant::now()));
        counts
    }

    /// One round: time out stuck assignments, then place what the policy says.
    pub async fn round(&self) -> Result<usize, BalanceError> {
        if self.lead.is_lost() {
            return Ok(0);
        }
        if self.topo.records().len() < self.config.pchannels.len() {
            // Placed in the next round, once the topology has read them back.
            self.create_missing_records().await?;
            return Ok(0);
        }
        let now = now_ms();
        let nodes = self.topo.nodes();
        let alive: Vec<u64> = nodes.iter().map(|n| n.info.id).collect();
        self.note_lost_nodes(&alive);
        let weights = self.weights().await;
        let mut views = Vec::new();
        let mut in_flight = 0;
        for r in self.topo.records() {
            let v = &r.value;
            let on_live = alive.contains(&v.node_id);
            let state = v.state();
            self.note_confirmed(v);
            let mut needs_node = !on_live;
            let mut movable = false;
            match state {
                AssignmentState::Assigned => movable = on_live,
                AssignmentState::Assigning if on_live => {
                    if now.saturating_sub(v.updated_ms)
                        > self.config.open_timeout.as_millis() as u64
                    {
                        let detail = format!(
                            "node {} did not open it within {:?}",
                            v.node_id, self.config.open_timeout
                        );
                        self.mark_failed(&r, &detail).await?;
                        continue;
                    }
                    in_flight += 1;
                }
                AssignmentState::Failed => {
                    let wait = backoff(v.failures, self.config.max_failure_backoff);
                    if now.saturating_sub(v.updated_ms) < wait.as_millis() as u64 {
                        continue; // neither placed nor counted until its backoff is over
                    }
                    needs_node = true;
                }
                _ => needs_node = true,
            }
            views.push(PChannelView {
                name: v.pchannel.clone(),
                node: (on_live && !needs_node).then_some(v.node_id),
                needs_node,
                movable,
                weight: 1 + weights.get(&v.pchannel).copied().unwrap_or(0),
            });
        }
        let node_views: Vec<NodeView> = nodes
            .iter()
            .map(|n| NodeView {
                id: n.info.id,
                draining: n.info.draining,
            })
            .collect();
        let budget = self.config.max_moves_in_flight.saturating_sub(in_flight);
        let placements = policy::plan(&node_views, &views, budget);
        let n = placements.len();
        // Concurrently: one slow etcd round trip does not hold the others back.
        let writes = placements.into_iter().map(|p| self.assign(p));
        for r in futures::future::join_all(writes).await {
            if let Err(e) = r {
                warn!(error = %e, "writing an assignment failed");
            }
        }
        Ok(n)
    }

    fn note_lost_nodes(&self, alive: &[u64]) {
        let mut prev = self.alive.lock().unwrap_or_else(|e| e.into_inner());
        for id in prev.iter() {
            if !alive.contains(id) {
                self.metrics.nodes_lost.inc();
                warn!(node = id, "streaming node gone (lease ended or it left)");
            }
        }
        *prev = alive.to_vec();
    }

    /// Records how long an assignment this leader wrote took to be confirmed.
    fn note_confirmed(&self, v: &PChannelAssignment) {
        if v.state() != AssignmentState::Assigned {
            return;
        }
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((term, since)) = pending.get(&v.pchannel)
            && *term == v.term
        {
            self.metrics
                .move_seconds
                .observe(since.elapsed().as_secs_f64());
            pending.remove(&v.pchannel);
        }
    }

    async fn mark_failed(&self, r: &Record, detail: &str) -> Result<(), BalanceError> {
        let mut v = r.value.clone();
        v.state = AssignmentState::Failed as i32;
        v.detail = detail.to_owned();
        v.failures += 1;
        v.updated_ms = now_ms();
        warn!(
            pchannel = v.pchannel,
            term = v.term,
            detail,
            "assignment failed"
        );
        self.write(r, v, false).await.map(|_| ())
    }

    async fn assign(&self, p: Placement) -> Result<(), BalanceError> {
        let r = self
            .topo
            .record(&p.pchannel)
            .ok_or_else(|| BalanceError::NotFound(format!("pchannel {}", p.pchannel)))?;
        let node = self
            .topo
            .node(p.node)
            .ok_or_else(|| BalanceError::NotFound(format!("node {}", p.node)))?;
        self.assign_to(&r, &node.info, p.planned).await
    }

    async fn assign_to(
        &self,
        r: &Record,
        node: &NodeInfo,
        planned: bool,
    ) -> Result<(), BalanceError> {
        let mut v = r.value.clone();
        if v.term > 0 {
            v.history.push(AssignmentHistory {
                term: v.term,
                node_id: v.node_id,
            });
            let excess = v.history.len().saturating_sub(HISTORY);
            v.history.drain(..excess);
        }
        v.term += 1;
        v.node_id = node.id;
        v.node_address = node.address.clone();
        v.state = AssignmentState::Assigning as i32;
        v.detail.clear();
        v.updated_ms = now_ms();
        let (name, term, from) = (v.pchannel.clone(), v.term, r.value.node_id);
        if self.write(r, v, true).await? {
            self.pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(name.clone(), (term, Instant::now()));
            self.metrics.assignments.inc();
            if planned {
                self.metrics.moves.with_label_values(&["planned"]).inc();
            } else if from != 0 {
                self.metrics.moves.with_label_values(&["recovery"]).inc();
            }
            info!(
                pchannel = name,
                term,
                node = node.id,
                from,
                planned,
                "pchannel assigned"
            );
        }
        Ok(())
    }

    /// Replaces the record if unchanged since `r` and this leader still leads; with `term`, also
    /// raises the pchannel's term key (the fence of its checkpoints). Returns whether it won.
    async fn write(
        &self,
        r: &Record,
        v: PChannelAssignment,
        term: bool,
    ) -> Result<bool, BalanceError> {
        let key = keys::assignment(&v.pchannel);
        let mut success = vec![Op::Put {
            key: key.clone(),
            value: Bytes::from(v.encode_to_vec()),
            lease: None,
        }];
        if term {
            success.push(Op::Put {
                key: keys::pchannel_term(&v.pchannel),
                value: Bytes::from(v.term.to_string()),
                lease: None,
            });
        }
        let resp = self
            .meta
            .txn(Txn {
                compare: vec![
                    Compare::mod_revision(&key, r.mod_revision),
                    self.lead.fence(),
                ],
                success,
                failure: vec![],
            })
            .await?;
        Ok(resp.succeeded)
    }

    /// An operator's move: `pchannel` to node `to`, under a new term.
    pub async fn move_pchannel(&self, pchannel: &str, to: u64) -> Result<String, BalanceError> {
        let r = self.topo.record(pchannel).ok_or_else(|| {
            BalanceError::NotFound(format!("pchannel {}", walden_common::quote_short(pchannel)))
        })?;
        let node = self
            .topo
            .node(to)
            .ok_or_else(|| BalanceError::NotFound(format!("node {to} (not registered)")))?;
        if node.info.draining {
            return Err(BalanceError::InvalidArgument(format!(
                "node {to} is draining"
            )));
        }
        let v = &r.value;
        if v.state() == AssignmentState::Assigning {
            return Err(BalanceError::Busy(format!(
                "{pchannel} is moving already (term {})",
                v.term
            )));
        }
        if v.node_id == to && v.state() == AssignmentState::Assigned {
            return Ok(format!(
                "{pchannel} is on node {to} already (term {})",
                v.term
            ));
        }
        self.assign_to(&r, &node.info, true).await?;
        Ok(format!(
            "{pchannel} moving to node {to} (term {})",
            v.term + 1
        ))
    }

    /// An operator's drain: marks node `id` draining, so its pchannels move away.
    pub async fn drain_node(&self, id: u64) -> Result<String, BalanceError> {
        drain(&*self.meta, &self.topo, id).await
    }
}

/// Marks a node's registration draining (keeping its lease), by compare-and-swap.
pub async fn drain(meta: &dyn MetaStore, topo: &Topology, id: u64) -> Result<String, BalanceError> {
    let node = topo
        .node(id)
        .ok_or_else(|| BalanceError::NotFound(format!("node {id} (not registered)")))?;
    if node.info.draining {
        return Ok(format!("node {id} is draining already"));
    }
    let mut info = node.info.clone();
    info.draining = true;
    let key = keys::node(id);
    let resp = meta
        .txn(Txn {
            compare: vec![Compare::mod_revision(&key, node.mod_revision)],
            success: vec![Op::Put {
                key,
                value: Bytes::from(info.encode_to_vec()),
                lease: node.lease,
            }],
            failure: vec![],
        })
        .await?;
    if !resp.succeeded {
        return Err(BalanceError::Busy(format!(
            "node {id} changed meanwhile; retry"
        )));
    }
    Ok(format!("node {id} draining"))
}
