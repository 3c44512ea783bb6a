//! Nodes following a coordinator in one process (in-memory metastore and WAL): assignments
//! open where they are written, drains and lost leases move pchannels, ticks keep rising.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;
use bytes::Bytes;
use walden_balancer::{BalancerConfig, ClusterCoord, CoordConfig, Metrics};
use walden_common::TimeTick;
use walden_message::{MessageType, MutableMessage};
use walden_metastore_api::{MemoryMetaStore, MetaStore};
use walden_proto::v1::{AssignmentState, CoordinatorInfo};
use walden_streaming_node::{
    NodeConfig,
    agent::{AgentConfig, NodeAgent},
    manager::WalManager,
    metrics::Metrics as NodeMetrics,
};
use walden_tso::{BatchedTicks, TickServer, TsoError};
use walden_wal_api::{WalStorage, memory::MemoryWalStorage};

#[derive(Debug)]
struct Clock(Arc<ClusterCoord>);

#[async_trait]
impl TickServer for Clock {
    async fn allocate(&self, count: u32, above: TimeTick) -> Result<TimeTick, TsoError> {
        self.0
            .allocate_ticks(count, above)
            .await
            .map_err(|e| TsoError::Unavailable(e.to_string()))
    }
}

const PCHANNELS: usize = 4;

async fn coordinator(meta: &Arc<dyn MetaStore>) -> Arc<ClusterCoord> {
    let coord = ClusterCoord::start(
        meta.clone(),
        CoordinatorInfo {
            address: "http://coord".into(),
            ..Default::default()
        },
        CoordConfig {
            balancer: BalancerConfig {
                pchannels: (0..PCHANNELS).map(|i| format!("p{i}")).collect(),
                interval: Duration::from_millis(50),
                ..BalancerConfig::default()
            },
            ..CoordConfig::default()
        },
        Metrics::new(&prometheus::Registry::new()).unwrap(),
    )
    .await
    .unwrap();
    let mut leading = coord.leading();
    while leading.borrow_and_update().is_none() {
        leading.changed().await.unwrap();
    }
    coord
}

async fn node(
    meta: &Arc<dyn MetaStore>,
    storage: &MemoryWalStorage,
    coord: &Arc<ClusterCoord>,
    n: u32,
) -> (Arc<WalManager>, Arc<NodeAgent>) {
    let ticks = Arc::new(BatchedTicks::new(
        Arc::new(Clock(coord.clone())),
        1000,
        Duration::from_millis(100),
    ));
    let manager = WalManager::new(
        Arc::new(storage.clone()) as Arc<dyn WalStorage>,
        meta.clone(),
        ticks,
        NodeConfig {
            time_tick_interval_ms: 20,
            ..NodeConfig::default()
        },
        NodeMetrics::new(),
    )
    .unwrap();
    let agent = NodeAgent::join(
        manager.clone(),
        meta.clone(),
        AgentConfig {
            address: format!("http://node-{n}"),
            http_address: String::new(),
            lease_ttl: Duration::from_secs(2),
        },
    )
    .await
    .unwrap();
    (manager, agent)
}

/// Waits until every pchannel is ASSIGNED and served by the node its record names.
async fn converged(coord: &ClusterCoord, nodes: &[(Arc<WalManager>, Arc<NodeAgent>)]) {
    for _ in 0..400 {
        let records = coord.topology().records();
        let ok = records.len() == PCHANNELS
            && records.iter().all(|r| {
                r.value.state() == AssignmentState::Assigned
                    && nodes.iter().any(|(m, a)| {
                        a.id() == r.value.node_id && m.get(&r.value.pchannel, r.value.term).is_ok()
                    })
            });
        if ok {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("no convergence: {:?}", coord.topology().records());
}

fn insert(i: usize) -> MutableMessage {
    MutableMessage::new(MessageType::Data, "v", Bytes::from(format!("m{i}")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_serve_what_the_coordinator_assigns_and_a_drain_moves_it_with_rising_ticks() {
    let meta: Arc<dyn MetaStore> = Arc::new(MemoryMetaStore::new());
    let storage = MemoryWalStorage::new();
    let coord = coordinator(&meta).await;
    let nodes = vec![
        node(&meta, &storage, &coord, 1).await,
        node(&meta, &storage, &coord, 2).await,
    ];
    converged(&coord, &nodes).await;
    // A node that registers after the first assignments gets its share when the balancer
    // next runs: wait for it rather than race it (a loaded machine once saw 4 and 0).
    for _ in 0..400 {
        if nodes[0].0.channels().len() == 2 && nodes[1].0.channels().len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    converged(&coord, &nodes).await;
    assert_eq!(nodes[0].0.channels().len(), 2, "an even spread");
    let mut last = std::collections::HashMap::new();
    for (m, _) in &nodes {
        for ch in m.channels() {
            let t = ch.append(insert(0)).await.unwrap().tick;
            last.insert(ch.name().to_owned(), t);
        }
    }

    let drained = nodes[0].1.id();
    coord.drain_node(drained).await.unwrap();
    converged(&coord, &nodes[1..]).await;
    assert!(
        nodes[0].0.channels().is_empty(),
        "the drained node closed its pchannels"
    );
    for ch in nodes[1].0.channels() {
        let t = ch.append(insert(1)).await.unwrap().tick;
        assert!(
            t > last[ch.name()],
            "{}: {t} after {}",
            ch.name(),
            last[ch.name()]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_lease_ends_loses_its_pchannels_and_rejoins_under_a_new_id() {
    let meta: Arc<dyn MetaStore> = Arc::new(MemoryMetaStore::new());
    let storage = MemoryWalStorage::new();
    let coord = coordinator(&meta).await;
    let nodes = vec![
        node(&meta, &storage, &coord, 1).await,
        node(&meta, &storage, &coord, 2).await,
    ];
    converged(&coord, &nodes).await;
    let old_id = nodes[0].1.id();
    let zombie: Vec<_> = nodes[0].0.channels();
    // The lease ends as if the node had paused past its TTL.
    let lease = meta
        .get(&walden_metastore_api::keys::node(old_id))
        .await
        .unwrap()
        .unwrap()
        .lease
        .unwrap();
    meta.revoke_lease(lease).await.unwrap();
    // Its pchannels move; the old incarnations are closed here and fenced by the new owners.
    for _ in 0..200 {
        if nodes[0].1.id() != old_id {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_ne!(nodes[0].1.id(), old_id, "registered again under a new id");
    converged(&coord, &nodes).await;
    for ch in zombie {
        let err = ch.append(insert(10)).await.unwrap_err();
        assert!(
            matches!(
                walden_common::HasErrorCode::code(&err),
                walden_common::ErrorCode::ChannelFenced
                    | walden_common::ErrorCode::StorageUnavailable
            ),
            "{err}"
        );
    }
}
