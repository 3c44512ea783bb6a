//! The streaming coordinator's cluster half.
//!
//! * [`election`]: one leader among the `walden coord` processes, through etcd.
//! * [`topology`]: every coordinator's cached view of nodes and pchannel records, and the
//!   stream of its changes for clients.
//! * [`policy`]: where pchannels should be (pure).
//! * [`balance`]: the leader's loop that writes assignments, fenced by its leadership.
//! * [`ClusterCoord`]: the role that ties them together with the cluster's timestamp oracle;
//!   [`service`] is its gRPC face.

pub mod balance;
pub mod election;
pub mod policy;
pub mod service;
pub mod topology;

use std::{
    sync::{Arc, RwLock},
    time::Duration,
};

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, Opts, Registry};
use thiserror::Error;
use tokio::sync::watch;
use tracing::warn;
use walden_common::{ErrorCode, HasErrorCode, TimeTick};
use walden_metastore_api::{MetaError, MetaStore};
use walden_proto::v1::{ClusterNodeStatus, ClusterStatusResponse, CoordinatorInfo};
use walden_tso::{LocalTicks, Oracle, TsoError};

pub use balance::{Balancer, BalancerConfig};
pub use topology::Topology;

/// Errors of the cluster coordinator, each with a stable code.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum BalanceError {
    #[error("not the leader{}", leader.as_ref().map(|l| format!("; the leader is {l}")).unwrap_or_else(|| "; no leader elected yet".into()))]
    NotLeader { leader: Option<String> },
    #[error("{0} not found")]
    NotFound(String),
    #[error("invalid request: {0}")]
    InvalidArgument(String),
    #[error("{0}")]
    Busy(String),
    #[error(transparent)]
    Meta(#[from] MetaError),
    #[error(transparent)]
    Tso(#[from] TsoError),
}

impl HasErrorCode for BalanceError {
    fn code(&self) -> ErrorCode {
        match self {
            Self::NotLeader { .. } => ErrorCode::NotLeader,
            Self::NotFound(_) => ErrorCode::ChannelNotFound,
            Self::InvalidArgument(_) => ErrorCode::InvalidArgument,
            Self::Busy(_) => ErrorCode::ResourceExhausted,
            Self::Meta(e) => e.code(),
            Self::Tso(e) => e.code(),
        }
    }
}

/// The coordinator's cluster metrics.
#[derive(Clone, Debug)]
pub struct Metrics {
    pub assignments: IntCounter,
    pub moves: IntCounterVec,
    pub move_seconds: Histogram,
    pub nodes_lost: IntCounter,
    pub leaderships: IntCounter,
}

impl Metrics {
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let m = Self {
            assignments: IntCounter::new(
                "walden_coord_assignments_total",
                "Pchannel assignments written (each under a new term).",
            )?,
            moves: IntCounterVec::new(
                Opts::new(
                    "walden_coord_moves_total",
                    "Pchannels moved off a node: planned (drain, balance, operator) or recovery (its node was gone or failed).",
                ),
                &["kind"],
            )?,
            move_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "walden_coord_move_seconds",
                    "From writing an assignment to its node confirming it serves.",
                )
                .buckets(vec![
                    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                ]),
            )?,
            nodes_lost: IntCounter::new(
                "walden_coord_nodes_lost_total",
                "Streaming nodes whose registration ended (lease expiry or exit).",
            )?,
            leaderships: IntCounter::new(
                "walden_coord_leaderships_total",
                "Times this coordinator became the leader.",
            )?,
        };
        registry.register(Box::new(m.assignments.clone()))?;
        registry.register(Box::new(m.moves.clone()))?;
        registry.register(Box::new(m.move_seconds.clone()))?;
        registry.register(Box::new(m.nodes_lost.clone()))?;
        registry.register(Box::new(m.leaderships.clone()))?;
        Ok(m)
    }
}

/// The coordinator role's settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CoordConfig {
    pub balancer: BalancerConfig,
    /// The leader's lease: a standby takes over this long after the leader dies. Default 10 s.
    pub lease_ttl: Duration,
    /// The timestamp oracle's persisted window. Default 3 s.
    pub tso_window: Duration,
}

impl Default for CoordConfig {
    fn default() -> Self {
        Self {
            balancer: BalancerConfig::default(),
            lease_ttl: Duration::from_secs(10),
            tso_window: Duration::from_secs(3),
        }
    }
}

#[derive(Debug, Clone)]
struct Leading {
    balancer: Arc<Balancer>,
    ticks: LocalTicks,
}

/// One `walden coord` process: a candidate for leadership, and a server of the topology.
#[derive(Debug)]
pub struct ClusterCoord {
    meta: Arc<dyn MetaStore>,
    topo: Arc<Topology>,
    me: CoordinatorInfo,
    leading: RwLock<Option<Leading>>,
    /// The epoch while this process leads, else `None`.
    epoch: watch::Sender<Option<u64>>,
}

impl ClusterCoord {
    /// Loads the topology and starts campaigning.
    pub async fn start(
        meta: Arc<dyn MetaStore>,
        me: CoordinatorInfo,
        config: CoordConfig,
        metrics: Metrics,
    ) -> Result<Arc<Self>, BalanceError> {
        let topo = Topology::start(meta.clone()).await?;
        let coord = Arc::new(Self {
            meta,
            topo,
            me,
            leading: RwLock::new(None),
            epoch: watch::channel(None).0,
        });
        tokio::spawn(lead_when_elected(Arc::downgrade(&coord), config, metrics));
        Ok(coord)
    }

    pub fn topology(&self) -> &Arc<Topology> {
        &self.topo
    }

    /// `Some(epoch)` while this process leads.
    pub fn leading(&self) -> watch::Receiver<Option<u64>> {
        self.epoch.subscribe()
    }

    fn leader_state(&self) -> Option<Leading> {
        self.leading
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    async fn not_leader(&self) -> BalanceError {
        let leader = election::current_leader(&*self.meta)
            .await
            .ok()
            .flatten()
            .map(|l| l.address);
        BalanceError::NotLeader { leader }
    }

    /// `count` consecutive ticks above `above` (the cluster's clock; leader only).
    pub async fn allocate_ticks(
        &self,
        count: u32,
        above: TimeTick,
    ) -> Result<TimeTick, BalanceError> {
        if count == 0 || count > 1 << 20 {
            return Err(BalanceError::InvalidArgument(format!(
                "a tick batch holds 1 to {} ticks, not {count}",
                1 << 20
            )));
        }
        let Some(l) = self.leader_state() else {
            return Err(self.not_leader().await);
        };
        Ok(walden_tso::TickServer::allocate(&**l.ticks.oracle(), count, above).await?)
    }

    pub async fn move_pchannel(&self, pchannel: &str, to: u64) -> Result<String, BalanceError> {
        match self.leader_state() {
            Some(l) => l.balancer.move_pchannel(pchannel, to).await,
            None => Err(self.not_leader().await),
        }
    }

    pub async fn drain_node(&self, id: u64) -> Result<String, BalanceError> {
        match self.leader_state() {
            Some(l) => l.balancer.drain_node(id).await,
            None => Err(self.not_leader().await),
        }
    }

    /// The comparison every write of this leadership must carry (`None` unless leading): wrap
    /// the store in [`walden_metastore_api::Fenced`] with it.
    pub fn fence(&self) -> Option<walden_metastore_api::Compare> {
        self.leader_state().map(|l| l.balancer.leadership().fence())
    }

    /// Gives up leadership (on shutdown): the lease goes, so a standby leads at once instead
    /// of after the TTL.
    pub async fn resign(&self) {
        if let Some(l) = self.leader_state() {
            let _ = self.meta.revoke_lease(l.balancer.leadership().lease).await;
        }
    }

    /// Leader, nodes and pchannels as this coordinator sees them.
    pub async fn status(&self) -> ClusterStatusResponse {
        let leader = election::current_leader(&*self.meta).await.ok().flatten();
        let records = self.topo.records();
        let nodes = self
            .topo
            .nodes()
            .into_iter()
            .map(|n| ClusterNodeStatus {
                pchannels: records
                    .iter()
                    .filter(|r| r.value.node_id == n.info.id)
                    .map(|r| r.value.pchannel.clone())
                    .collect(),
                node: Some(n.info),
            })
            .collect();
        ClusterStatusResponse {
            answered_by_leader: self.leader_state().is_some(),
            leader,
            nodes,
            pchannels: records.into_iter().map(|r| r.value).collect(),
            answered_by: self.me.address.clone(),
        }
    }
}

async fn lead_when_elected(
    coord: std::sync::Weak<ClusterCoord>,
    config: CoordConfig,
    metrics: Metrics,
) {
    loop {
        let Some(c) = coord.upgrade() else { return };
        let (meta, me) = (c.meta.clone(), c.me.clone());
        drop(c);
        let lead = match election::campaign(meta.clone(), me, config.lease_ttl).await {
            Ok(l) => l,
            Err(e) => {
                warn!(error = %e, "campaign failed; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        // The oracle opens above every bound an earlier leader persisted.
        let oracle = loop {
            if lead.is_lost() {
                break None;
            }
            match Oracle::open(meta.clone(), config.tso_window).await {
                Ok(o) => break Some(Arc::new(o)),
                Err(e) => {
                    warn!(error = %e, "opening the timestamp oracle failed; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        };
        let Some(oracle) = oracle else { continue };
        let Some(c) = coord.upgrade() else { return };
        metrics.leaderships.inc();
        let balancer = Balancer::new(
            meta.clone(),
            c.topo.clone(),
            lead.clone(),
            config.balancer.clone(),
            metrics.clone(),
        );
        *c.leading.write().unwrap_or_else(|e| e.into_inner()) = Some(Leading {
            balancer: balancer.clone(),
            ticks: LocalTicks::new(oracle),
        });
        c.epoch.send_replace(Some(lead.info.epoch));
        drop(c);
        balancer.run().await;
        let Some(c) = coord.upgrade() else { return };
        *c.leading.write().unwrap_or_else(|e| e.into_inner()) = None;
        c.epoch.send_replace(None);
        warn!(epoch = lead.info.epoch, "leadership lost");
    }
}
