//! What every coordinator (leader or standby) knows of the cluster: the nodes and the pchannel
//! records, read from etcd and kept current by watches. Subscribers get each change as a delta
//! whose version is the etcd revision that made it.

use std::{
    collections::BTreeMap,
    sync::{Arc, RwLock},
    time::Duration,
};

use prost::Message as _;
use tokio::sync::broadcast;
use tracing::{debug, warn};
use walden_metastore_api::{EventKind, KeyValue, MetaStore, Revision, WatchEvent, keys};
use walden_proto::v1::{AssignmentUpdate, NodeInfo, PChannelAssignment};

/// A pchannel record and the revision it was read at (for compare-and-swap).
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    pub value: PChannelAssignment,
    pub mod_revision: Revision,
}

/// A node's registration and its lease.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub info: NodeInfo,
    pub mod_revision: Revision,
    pub lease: Option<i64>,
}

#[derive(Debug, Default)]
struct State {
    records: BTreeMap<String, Record>,
    nodes: BTreeMap<u64, Node>,
    version: Revision,
}

/// The cached cluster view.
#[derive(Debug)]
pub struct Topology {
    state: RwLock<State>,
    updates: broadcast::Sender<AssignmentUpdate>,
    /// Wakes the balancer on any change.
    changed: tokio::sync::Notify,
}

impl Topology {
    /// Loads the records and nodes and keeps them current until the returned handle is dropped.
    pub async fn start(
        meta: Arc<dyn MetaStore>,
    ) -> Result<Arc<Self>, walden_metastore_api::MetaError> {
        let topo = Arc::new(Self {
            state: RwLock::new(State::default()),
            updates: broadcast::channel(1024).0,
            changed: tokio::sync::Notify::new(),
        });
        let (records, nodes) = topo.subscribe_and_load(&*meta).await?;
        tokio::spawn(follow(Arc::downgrade(&topo), meta, records, nodes));
        Ok(topo)
    }

    async fn subscribe_and_load(
        &self,
        meta: &dyn MetaStore,
    ) -> Result<
        (
            walden_metastore_api::WatchReceiver,
            walden_metastore_api::WatchReceiver,
        ),
        walden_metastore_api::MetaError,
    > {
        // Watch first, then read: a change between the two is seen twice, never missed, and
        // applying it twice is harmless (it carries its revision).
        let records = meta.watch(keys::ASSIGNMENT_PREFIX).await?;
        let nodes = meta.watch(keys::NODE_PREFIX).await?;
        let rs = meta.range(keys::ASSIGNMENT_PREFIX).await?;
        let ns = meta.range(keys::NODE_PREFIX).await?;
        let mut st = self.write();
        st.records.clear();
        st.nodes.clear();
        for kv in rs {
            apply_record(&mut st, EventKind::Put, &kv);
        }
        for kv in ns {
            apply_node(&mut st, EventKind::Put, &kv);
        }
        let _ = self.updates.send(snapshot_of(&st));
        drop(st);
        self.changed.notify_one();
        Ok((records, nodes))
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The full view, as the first message of a client's stream.
    pub fn snapshot(&self) -> AssignmentUpdate {
        snapshot_of(&self.read())
    }

    /// Changes from now on (a full snapshot again after the view was reloaded).
    pub fn subscribe(&self) -> broadcast::Receiver<AssignmentUpdate> {
        self.updates.subscribe()
    }

    pub fn records(&self) -> Vec<Record> {
        self.read().records.values().cloned().collect()
    }

    pub fn record(&self, pchannel: &str) -> Option<Record> {
        self.read().records.get(pchannel).cloned()
    }

    pub fn nodes(&self) -> Vec<Node> {
        self.read().nodes.values().cloned().collect()
    }

    pub fn node(&self, id: u64) -> Option<Node> {
        self.read().nodes.get(&id).cloned()
    }

    /// Resolves when anything changed since the last call (one waiter: the balancer).
    pub async fn changed(&self) {
        self.changed.notified().await;
    }
}

fn snapshot_of(st: &State) -> AssignmentUpdate {
    AssignmentUpdate {
        version: st.version as u64,
        full: true,
        assignments: st.records.values().map(|r| r.value.clone()).collect(),
        removed: Vec::new(),
    }
}

/// Applies one record change; returns the delta for clients (None if stale or undecodable).
fn apply_record(st: &mut State, kind: EventKind, kv: &KeyValue) -> Option<AssignmentUpdate> {
    let name = keys::assignment_pchannel(&kv.key)?.to_owned();
    st.version = st.version.max(kv.mod_revision);
    match kind {
        EventKind::Put => {
            let value = match PChannelAssignment::decode(kv.value.as_ref()) {
                Ok(v) => v,
                Err(e) => {
                    warn!(key = kv.key, error = %e, "undecodable assignment record; ignored");
                    return None;
                }
            };
            if st
                .records
                .get(&name)
                .is_some_and(|r| r.mod_revision >= kv.mod_revision)
            {
                return None;
            }
            st.records.insert(
                name,
                Record {
                    value: value.clone(),
                    mod_revision: kv.mod_revision,
                },
            );
            Some(AssignmentUpdate {
                version: kv.mod_revision as u64,
                full: false,
                assignments: vec![value],
                removed: Vec::new(),
            })
        }
        EventKind::Delete => {
            st.records.remove(&name)?;
            Some(AssignmentUpdate {
                version: kv.mod_revision as u64,
                full: false,
                assignments: Vec::new(),
                removed: vec![name],
            })
        }
    }
}

fn apply_node(st: &mut State, kind: EventKind, kv: &KeyValue) {
    let Some(id) = keys::node_id(&kv.key) else {
        return;
    };
    match kind {
        EventKind::Put => match NodeInfo::decode(kv.value.as_ref()) {
            Ok(info) => {
                st.nodes.insert(
                    id,
                    Node {
                        info,
                        mod_revision: kv.mod_revision,
                        lease: kv.lease,
                    },
                );
            }
            Err(e) => warn!(key = kv.key, error = %e, "undecodable node registration; ignored"),
        },
        EventKind::Delete => {
            st.nodes.remove(&id);
        }
    }
}

async fn follow(
    topo: std::sync::Weak<Topology>,
    meta: Arc<dyn MetaStore>,
    mut records: walden_metastore_api::WatchReceiver,
    mut nodes: walden_metastore_api::WatchReceiver,
) {
    loop {
        let event: Option<(bool, WatchEvent)> = tokio::select! {
            e = records.recv() => e.map(|e| (true, e)),
            e = nodes.recv() => e.map(|e| (false, e)),
        };
        let Some(t) = topo.upgrade() else { return };
        match event {
            Some((is_record, e)) => {
                let mut st = t.write();
                if is_record {
                    if let Some(delta) = apply_record(&mut st, e.kind, &e.kv) {
                        let _ = t.updates.send(delta);
                    }
                } else {
                    apply_node(&mut st, e.kind, &e.kv);
                }
                drop(st);
                t.changed.notify_one();
            }
            None => {
                // A watch ended (history compacted): read everything again.
                debug!("topology watch ended; reloading");
                loop {
                    match t.subscribe_and_load(&*meta).await {
                        Ok((r, n)) => {
                            records = r;
                            nodes = n;
                            break;
                        }
                        Err(e) => {
                            warn!(error = %e, "reloading the topology failed; retrying");
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                    }
                }
            }
        }
    }
}
