//! A streaming node's membership in a cluster.
//!
//! The node registers under an etcd lease (a fresh id per start), then follows the coordinator's
//! pchannel records by a watch: a record that names this node and is `ASSIGNING` is opened under
//! its term and confirmed `ASSIGNED` (or reported `FAILED`) by compare-and-swap; a pchannel
//! served here whose record names another node or a newer term is closed. The node never raises
//! a term. When its lease is lost (a long pause, a partition), everything it serves is closed,
//! since its pchannels are being moved, and it registers again under a new id.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, Weak},
    time::Duration,
};

use bytes::Bytes;
use prost::Message as _;
use tokio::sync::watch;
use tracing::{info, warn};
use walden_common::{HasErrorCode, Term};
use walden_metastore_api::{
    Compare, EventKind, KeyValue, LeaseId, MetaError, MetaStore, Op, Txn, increment, keys,
};
use walden_proto::v1::{AssignmentState, NodeInfo, PChannelAssignment};

use crate::{
    NodeError,
    channel::{Channel, Health},
    manager::WalManager,
};

/// How a node joins a cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentConfig {
    /// The gRPC address clients reach this node at.
    pub address: String,
    /// The HTTP (metrics, health) address.
    pub http_address: String,
    /// The registration's lease: the node's pchannels move this long after it dies.
    pub lease_ttl: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Registration {
    id: u64,
    lease: LeaseId,
    started_ms: u64,
}

/// The node's side of the cluster.
#[derive(Debug)]
pub struct NodeAgent {
    manager: Arc<WalManager>,
    meta: Arc<dyn MetaStore>,
    config: AgentConfig,
    reg: watch::Sender<Registration>,
    /// Opens in progress: pchannel -> term.
    opening: Mutex<HashMap<String, u64>>,
    draining: std::sync::atomic::AtomicBool,
}

fn now_ms() -> u64 {
    walden_tso::now_ms()
}

impl NodeAgent {
    /// Registers the node and starts following its assignments.
    pub async fn join(
        manager: Arc<WalManager>,
        meta: Arc<dyn MetaStore>,
        config: AgentConfig,
    ) -> Result<Arc<Self>, NodeError> {
        let reg = register(&*meta, &config).await?;
        info!(
            node = reg.id,
            address = config.address,
            "registered with the cluster"
        );
        let agent = Arc::new(Self {
            manager,
            meta,
            config,
            reg: watch::channel(reg).0,
            opening: Mutex::new(HashMap::new()),
            draining: std::sync::atomic::AtomicBool::new(false),
        });
        tokio::spawn(keep_registered(Arc::downgrade(&agent)));
        tokio::spawn(follow(Arc::downgrade(&agent)));
        Ok(agent)
    }

    /// This node's id (a new one after a lost lease).
    pub fn id(&self) -> u64 {
        self.reg.borrow().id
    }

    /// Asks to be drained and waits until no pchannel is assigned here and the new owners
    /// serve what moved (at most `within`), then leaves the cluster. Returns how many pchannels were still here at the end.
    pub async fn drain(&self, within: Duration) -> usize {
        self.draining
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let reg = *self.reg.borrow();
        let info = node_info(&self.config, &reg, true);
        if let Err(e) = self
            .meta
            .put(
                &keys::node(reg.id),
                Bytes::from(info.encode_to_vec()),
                Some(reg.lease),
            )
            .await
        {
            warn!(error = %e, "could not mark the node draining; leaving anyway");
        }
        info!(node = reg.id, "draining: waiting for the pchannels to move");
        let deadline = tokio::time::Instant::now() + within;
        let left = loop {
            let mine = self.assigned_here().await;
            if mine == 0 || tokio::time::Instant::now() >= deadline {
                break mine;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let _ = self.meta.revoke_lease(reg.lease).await;
        left
    }

    async fn assigned_here(&self) -> usize {
        let id = self.id();
        match self.meta.range(keys::ASSIGNMENT_PREFIX).await {
            // Here, or moved from here and not yet confirmed by the new owner.
            Ok(kvs) => kvs
                .iter()
                .filter_map(|kv| PChannelAssignment::decode(kv.value.as_ref()).ok())
                .filter(|r| {
                    r.node_id == id
                        || (r.state() != AssignmentState::Assigned
                            && r.history.last().is_some_and(|h| h.node_id == id))
                })
                .count()
                .max(self.manager.channels().len()),
            Err(_) => self.manager.channels().len(),
        }
    }

    /// Acts on one record.
    fn reconcile(self: &Arc<Self>, kv: &KeyValue) {
        let Ok(r) = PChannelAssignment::decode(kv.value.as_ref()) else {
            return;
        };
        let me = self.id();
        let served = self.manager.get(&r.pchannel, 0).ok().map(|c| c.term().0);
        if r.node_id == me && r.state() == AssignmentState::Assigning {
            let mut opening = self.opening.lock().unwrap_or_else(|e| e.into_inner());
            if opening.get(&r.pchannel) == Some(&r.term) {
                return;
            }
            opening.insert(r.pchannel.clone(), r.term);
            drop(opening);
            let agent = self.clone();
            tokio::spawn(async move { agent.open(r.pchannel, r.term).await });
        } else if r.node_id != me
            && let Some(term) = served
            && term < r.term
        {
            // Moved away: stop serving (the new owner fences the storage regardless).
            let manager = self.manager.clone();
            tokio::spawn(async move {
                manager.remove(&r.pchannel, Some(Term(term))).await;
            });
        }
    }

    async fn open(self: Arc<Self>, pchannel: String, term: u64) {
        let result = self.manager.assign(&pchannel, Term(term)).await;
        self.opening
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&pchannel);
        match result {
            Ok(ch) => {
                if !self.report(&pchannel, term, None).await {
                    // Moved elsewhere while it was opening: the new owner fences the storage
                    // anyway, but nothing is served here that is not assigned here.
                    self.manager.remove(&pchannel, Some(Term(term))).await;
                    return;
                }
                // A channel that fails later (storage, fenced) is reported, so it moves.
                let health = ch.health();
                drop(ch);
                let agent = Arc::downgrade(&self);
                tokio::spawn(async move {
                    let why = match Channel::until_unhealthy(health).await {
                        Some(Health::Failed(why) | Health::Fenced(why)) => why,
                        _ => return,
                    };
                    if let Some(a) = agent.upgrade() {
                        warn!(pchannel, term, reason = %why, "pchannel failed; reporting it");
                        a.manager.remove(&pchannel, Some(Term(term))).await;
                        a.report(&pchannel, term, Some(why)).await;
                    }
                });
            }
            Err(e) => {
                warn!(pchannel, term, error = %e, code = %e.code(), "assigned pchannel did not open");
                self.report(&pchannel, term, Some(e.to_string())).await;
            }
        }
    }

    /// Confirms (`failure` None) or fails an assignment, if the record still gives `pchannel`
    /// to this node under `term`; returns whether it does.
    async fn report(&self, pchannel: &str, term: u64, failure: Option<String>) -> bool {
        let key = keys::assignment(pchannel);
        for _ in 0..20 {
            let kv = match self.meta.get(&key).await {
                Ok(Some(kv)) => kv,
                Ok(None) => return false,
                Err(e) => {
                    warn!(pchannel, error = %e, "reading the assignment failed; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            let Ok(mut r) = PChannelAssignment::decode(kv.value.as_ref()) else {
                return false;
            };
            if r.term != term || r.node_id != self.id() {
                return false; // superseded meanwhile: nothing to confirm
            }
            match &failure {
                None if r.state() == AssignmentState::Assigned => return true,
                None => {
                    r.state = AssignmentState::Assigned as i32;
                    r.failures = 0;
                    r.detail.clear();
                }
                Some(why) => {
                    r.state = AssignmentState::Failed as i32;
                    r.failures += 1;
                    r.detail = walden_common::truncate_message(why.clone(), 1024);
                }
            }
            r.updated_ms = now_ms();
            let resp = self
                .meta
                .txn(Txn {
                    compare: vec![Compare::mod_revision(&key, kv.mod_revision)],
                    success: vec![Op::Put {
                        key: key.clone(),
                        value: Bytes::from(r.encode_to_vec()),
                        lease: None,
                    }],
                    failure: vec![],
                })
                .await;
            match resp {
                Ok(t) if t.succeeded => return true,
                Ok(_) => {} // changed meanwhile: look again
                Err(e) => {
                    warn!(pchannel, error = %e, "reporting the assignment failed; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        // etcd unreachable all along: keep serving; the coordinator times the assignment out
        // and the next record says what to do.
        true
    }
}

fn node_info(config: &AgentConfig, reg: &Registration, draining: bool) -> NodeInfo {
    NodeInfo {
        id: reg.id,
        address: config.address.clone(),
        http_address: config.http_address.clone(),
        draining,
        started_ms: reg.started_ms,
    }
}

async fn register(meta: &dyn MetaStore, config: &AgentConfig) -> Result<Registration, MetaError> {
    let reg = Registration {
        id: increment(meta, keys::NODE_NEXT_ID).await?,
        lease: meta.grant_lease(config.lease_ttl).await?,
        started_ms: now_ms(),
    };
    let info = node_info(config, &reg, false);
    meta.put(
        &keys::node(reg.id),
        Bytes::from(info.encode_to_vec()),
        Some(reg.lease),
    )
    .await?;
    Ok(reg)
}

/// Keeps the lease alive at a third of its TTL. A lost lease means the coordinator is moving
/// every pchannel away: close them all and register again as a new node.
async fn keep_registered(agent: Weak<NodeAgent>) {
    // When the last renewal was sent: etcd counts the lease from about then.
    let mut last_ok = tokio::time::Instant::now();
    let mut failing = false;
    loop {
        let Some(a) = agent.upgrade() else { return };
        let ttl = a.config.lease_ttl;
        // Stop serving a tenth of the lease before it can end: the coordinator may hand the
        // pchannels over once it ends, and a node that cannot renew must not acknowledge
        // anything past that (docs/design.md §11, a partitioned node).
        let fence = ttl - ttl / 10;
        let reg = *a.reg.borrow();
        drop(a);
        // After a failed renewal, try again often, so that a partition that heals in time
        // costs nothing and one that does not is noticed before the fence.
        let pause = if failing {
            Duration::from_millis(100).min(ttl / 3)
        } else {
            ttl / 3
        };
        tokio::time::sleep(pause).await;
        let Some(a) = agent.upgrade() else { return };
        if a.draining.load(std::sync::atomic::Ordering::SeqCst) {
            // Keep the lease until the drain revokes it.
            let _ = a.meta.keep_alive(reg.lease).await;
            continue;
        }
        let sent = tokio::time::Instant::now();
        let left = fence
            .saturating_sub(last_ok.elapsed())
            .max(Duration::from_millis(1));
        let lost = match tokio::time::timeout(left, a.meta.keep_alive(reg.lease)).await {
            Ok(Ok(())) => {
                last_ok = sent;
                failing = false;
                false
            }
            Ok(Err(MetaError::LeaseNotFound(_))) => true,
            Ok(Err(e)) => {
                if !failing {
                    warn!(error = %e, "node keep-alive failed");
                }
                failing = true;
                last_ok.elapsed() >= fence
            }
            Err(_) => {
                warn!("node keep-alive got no answer before the lease could end");
                true
            }
        };
        if !lost {
            continue;
        }
        warn!(
            node = reg.id,
            "registration lease lost: closing every pchannel and registering again"
        );
        for ch in a.manager.channels() {
            a.manager.remove(ch.name(), None).await;
        }
        loop {
            match register(&*a.meta, &a.config).await {
                Ok(r) => {
                    info!(node = r.id, "registered again");
                    a.reg.send_replace(r);
                    last_ok = tokio::time::Instant::now();
                    failing = false;
                    break;
                }
                Err(e) => {
                    warn!(error = %e, "registering again failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }
}

/// Follows the assignment records: all of them at start and after a watch ends, then every
/// change; and again whenever the node's id changes.
async fn follow(agent: Weak<NodeAgent>) {
    loop {
        let Some(a) = agent.upgrade() else { return };
        let meta = a.meta.clone();
        let mut reg = a.reg.subscribe();
        drop(a);
        let mut w = match meta.watch(keys::ASSIGNMENT_PREFIX).await {
            Ok(w) => w,
            Err(e) => {
                warn!(error = %e, "watching assignments failed; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        match meta.range(keys::ASSIGNMENT_PREFIX).await {
            Ok(kvs) => {
                let Some(a) = agent.upgrade() else { return };
                for kv in &kvs {
                    a.reconcile(kv);
                }
            }
            Err(e) => {
                warn!(error = %e, "reading assignments failed; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        }
        loop {
            tokio::select! {
                e = w.recv() => match e {
                    Some(e) if e.kind == EventKind::Put => {
                        let Some(a) = agent.upgrade() else { return };
                        a.reconcile(&e.kv);
                    }
                    Some(_) => {}
                    None => break, // history compacted: read everything again
                },
                r = reg.changed() => {
                    if r.is_err() {
                        return;
                    }
                    break; // a new id: read everything again
                }
            }
        }
    }
}
