//! The leader's balancer over the in-memory metastore: placement, confirmation, node loss,
//! fencing of a deposed leader.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use prost::Message as _;
use walden_balancer::{
    Balancer, BalancerConfig, Metrics, Topology,
    election::{self, Leadership},
};
use walden_metastore_api::{
    Compare, KeyValue, MemoryMetaStore, MetaResult, MetaStore, Op, Txn, TxnResponse, WatchReceiver,
    keys,
};
use walden_proto::v1::{AssignmentState, CoordinatorInfo, NodeInfo, PChannelAssignment};

fn names(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("p{i}")).collect()
}

async fn register(meta: &dyn MetaStore, id: u64) -> i64 {
    let lease = meta.grant_lease(Duration::from_secs(60)).await.unwrap();
    let info = NodeInfo {
        id,
        address: format!("http://node-{id}"),
        ..Default::default()
    };
    meta.put(
        &keys::node(id),
        Bytes::from(info.encode_to_vec()),
        Some(lease),
    )
    .await
    .unwrap();
    lease
}

async fn records(meta: &dyn MetaStore) -> Vec<PChannelAssignment> {
    meta.range(keys::ASSIGNMENT_PREFIX)
        .await
        .unwrap()
        .into_iter()
        .map(|kv| PChannelAssignment::decode(kv.value.as_ref()).unwrap())
        .collect()
}

/// What a node does once it has opened a pchannel: confirm, under the term it was given.
async fn confirm_all(meta: &dyn MetaStore) {
    for kv in meta.range(keys::ASSIGNMENT_PREFIX).await.unwrap() {
        let mut v = PChannelAssignment::decode(kv.value.as_ref()).unwrap();
        if v.state() == AssignmentState::Assigning {
            v.state = AssignmentState::Assigned as i32;
            let ok = meta
                .txn(Txn {
                    compare: vec![Compare::mod_revision(&kv.key, kv.mod_revision)],
                    success: vec![Op::Put {
                        key: kv.key.clone(),
                        value: Bytes::from(v.encode_to_vec()),
                        lease: None,
                    }],
                    failure: vec![],
                })
                .await
                .unwrap();
            assert!(ok.succeeded);
        }
    }
}

async fn settle(topo: &Topology, meta: &dyn MetaStore) {
    // The topology follows etcd through a watch: wait until it has every record's revision.
    for _ in 0..100 {
        let want: Vec<i64> = meta
            .range(keys::ASSIGNMENT_PREFIX)
            .await
            .unwrap()
            .iter()
            .map(|kv| kv.mod_revision)
            .collect();
        let have: Vec<i64> = topo.records().iter().map(|r| r.mod_revision).collect();
        let nodes_want = meta.range(keys::NODE_PREFIX).await.unwrap().len();
        if want == have && topo.nodes().len() == nodes_want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("topology did not catch up");
}

async fn lead(meta: &Arc<dyn MetaStore>) -> Leadership {
    election::campaign(
        meta.clone(),
        CoordinatorInfo {
            address: "http://coord".into(),
            ..Default::default()
        },
        Duration::from_secs(60),
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn pchannels_spread_over_nodes_and_a_lost_nodes_move_under_a_higher_term() {
    let meta: Arc<dyn MetaStore> = Arc::new(MemoryMetaStore::new());
    let lease1 = register(&*meta, 1).await;
    register(&*meta, 2).await;
    let topo = Topology::start(meta.clone()).await.unwrap();
    let registry = prometheus::Registry::new();
    let b = Balancer::new(
        meta.clone(),
        topo.clone(),
        lead(&meta).await,
        BalancerConfig {
            pchannels: names(6),
            ..BalancerConfig::default()
        },
        Metrics::new(&registry).unwrap(),
    );
    // The first round creates the records, the next (on seeing them) places them.
    b.round().await.unwrap();
    settle(&topo, &*meta).await;
    assert_eq!(b.round().await.unwrap(), 6);
    settle(&topo, &*meta).await;
    let rs = records(&*meta).await;
    assert_eq!(rs.len(), 6);
    assert!(
        rs.iter()
            .all(|r| r.state() == AssignmentState::Assigning && r.term == 1)
    );
    let on1 = rs.iter().filter(|r| r.node_id == 1).count();
    assert_eq!(on1, 3, "even spread");
    // Term keys are raised with the records: the fence of the owners' checkpoints.
    for r in &rs {
        let t = meta
            .get(&keys::pchannel_term(&r.pchannel))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(t.value, Bytes::from("1"));
    }
    confirm_all(&*meta).await;
    settle(&topo, &*meta).await;
    assert_eq!(
        b.round().await.unwrap(),
        0,
        "a balanced, confirmed layout stays put"
    );

    // Node 1's lease ends: its pchannels go to node 2 under term 2.
    meta.revoke_lease(lease1).await.unwrap();
    settle(&topo, &*meta).await;
    assert_eq!(b.round().await.unwrap(), 3);
    settle(&topo, &*meta).await;
    for r in records(&*meta).await {
        assert_eq!(r.node_id, 2, "{r:?}");
        if r.term == 2 {
            assert_eq!(r.history.last().unwrap().node_id, 1);
        }
    }
}

#[tokio::test]
async fn a_deposed_leader_cannot_write_an_assignment() {
    let meta: Arc<dyn MetaStore> = Arc::new(MemoryMetaStore::new());
    register(&*meta, 1).await;
    let topo = Topology::start(meta.clone()).await.unwrap();
    let old = lead(&meta).await;
    // The old leader's key goes (its lease ended); a new leader is elected.
    meta.revoke_lease(old.lease).await.unwrap();
    let new = lead(&meta).await;
    assert!(new.info.epoch > old.info.epoch);
    let registry = prometheus::Registry::new();
    let stale = Balancer::new(
        meta.clone(),
        topo.clone(),
        old,
        BalancerConfig {
            pchannels: names(2),
            ..BalancerConfig::default()
        },
        Metrics::new(&registry).unwrap(),
    );
    let _ = stale.round().await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let _ = stale.round().await;
    assert!(
        records(&*meta).await.is_empty(),
        "nothing written by the deposed leader"
    );
}

/// The in-memory metastore whose keep-alives hang once `hang` is set, as on an etcd that lost
/// its quorum (the call neither answers nor fails).
#[derive(Debug)]
struct Hanging {
    inner: MemoryMetaStore,
    hang: std::sync::atomic::AtomicBool,
}

#[async_trait::async_trait]
impl MetaStore for Hanging {
    async fn get(&self, key: &str) -> MetaResult<Option<KeyValue>> {
        self.inner.get(key).await
    }
    async fn range(&self, prefix: &str) -> MetaResult<Vec<KeyValue>> {
        self.inner.range(prefix).await
    }
    async fn put(&self, key: &str, value: Bytes, lease: Option<i64>) -> MetaResult<i64> {
        self.inner.put(key, value, lease).await
    }
    async fn delete(&self, key: &str) -> MetaResult<bool> {
        self.inner.delete(key).await
    }
    async fn txn(&self, txn: Txn) -> MetaResult<TxnResponse> {
        self.inner.txn(txn).await
    }
    async fn watch(&self, prefix: &str) -> MetaResult<WatchReceiver> {
        self.inner.watch(prefix).await
    }
    async fn grant_lease(&self, ttl: Duration) -> MetaResult<i64> {
        self.inner.grant_lease(ttl).await
    }
    async fn keep_alive(&self, lease: i64) -> MetaResult<()> {
        if self.hang.load(std::sync::atomic::Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        self.inner.keep_alive(lease).await
    }
    async fn revoke_lease(&self, lease: i64) -> MetaResult<()> {
        self.inner.revoke_lease(lease).await
    }
}

#[tokio::test]
async fn a_leader_whose_keep_alives_hang_steps_down_within_its_lease() {
    let store = Arc::new(Hanging {
        inner: MemoryMetaStore::new(),
        hang: false.into(),
    });
    let ttl = Duration::from_millis(600);
    let meta: Arc<dyn MetaStore> = store.clone();
    let me = CoordinatorInfo {
        address: "http://coord-a".into(),
        ..Default::default()
    };
    let mut won = election::campaign(meta, me, ttl).await.unwrap();
    // A keep-alive or two succeed, then every one hangs.
    tokio::time::sleep(ttl / 2).await;
    assert!(!won.is_lost());
    store.hang.store(true, std::sync::atomic::Ordering::SeqCst);
    let hung = tokio::time::Instant::now();
    let stepped = tokio::time::timeout(ttl * 4, won.lost.wait_for(|lost| *lost)).await;
    assert!(
        stepped.is_ok(),
        "still leading {:?} after its keep-alives began to hang (TTL {ttl:?})",
        hung.elapsed()
    );
    assert!(
        hung.elapsed() <= ttl + Duration::from_millis(300),
        "{:?}",
        hung.elapsed()
    );
}
