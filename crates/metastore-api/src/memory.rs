//! The in-memory store. It is also the engine of the embedded store, which gives it a
//! [`Persistence`] that makes each revision durable before it is visible.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex, MutexGuard, Weak},
    time::{Duration, Instant},
};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::mpsc;

use crate::{
    Compare, CompareOp, CompareTarget, EventKind, KeyValue, LeaseId, MetaError, MetaResult,
    MetaStore, Op, Revision, Txn, TxnResponse, WatchEvent, WatchReceiver,
};

/// One key's change within a revision, as handed to [`Persistence`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mutation {
    Put(KeyValue),
    Delete(String),
}

/// The durable state a store starts from.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub revision: Revision,
    pub kvs: Vec<KeyValue>,
}

/// Makes a revision durable. Called with the store locked, so revisions are applied in order.
pub trait Persistence: Send + Sync + std::fmt::Debug {
    /// Persists one revision; with `durable` false it may reach the disk with a later one.
    fn apply(&self, revision: Revision, mutations: &[Mutation], durable: bool) -> MetaResult<()>;
}

#[derive(Debug)]
struct Lease {
    ttl: Duration,
    deadline: Instant,
    keys: Vec<String>,
}

#[derive(Debug, Default)]
struct State {
    revision: Revision,
    kvs: BTreeMap<String, KeyValue>,
    leases: HashMap<LeaseId, Lease>,
    next_lease: LeaseId,
    watchers: Vec<(String, mpsc::UnboundedSender<WatchEvent>)>,
}

/// An in-memory store; clones share state.
#[derive(Clone, Debug)]
pub struct MemoryMetaStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    state: Mutex<State>,
    persistence: Option<Arc<dyn Persistence>>,
}

impl Default for MemoryMetaStore {
    fn default() -> Self {
        Self::new()
    }
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl MemoryMetaStore {
    pub fn new() -> Self {
        Self::with_persistence(Snapshot::default(), None)
    }

    /// A store that starts from `snapshot` and makes every revision durable through
    /// `persistence` before applying it. Keys with leases are not restored: their owners are
    /// gone.
    pub fn with_persistence(snapshot: Snapshot, persistence: Option<Arc<dyn Persistence>>) -> Self {
        let state = State {
            revision: snapshot.revision,
            kvs: snapshot
                .kvs
                .into_iter()
                .filter(|kv| kv.lease.is_none())
                .map(|kv| (kv.key.clone(), kv))
                .collect(),
            next_lease: 1,
            ..State::default()
        };
        let store = Self {
            inner: Arc::new(Inner {
                state: Mutex::new(state),
                persistence,
            }),
        };
        store.start_lease_sweeper();
        store
    }

    fn txn_with(&self, txn: &Txn, durable: bool) -> MetaResult<TxnResponse> {
        let mut s = lock(&self.inner.state);
        let succeeded = txn.compare.iter().all(|c| Self::holds(&s, c));
        let ops = if succeeded {
            &txn.success
        } else {
            &txn.failure
        };
        let revision = self.apply_with(&mut s, ops, durable)?;
        Ok(TxnResponse {
            succeeded,
            revision,
        })
    }

    fn start_lease_sweeper(&self) {
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        // Weak, so the sweeper never keeps a dropped store (and its file) alive.
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        handle.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { return };
                let store = MemoryMetaStore { inner };
                // A persistence failure leaves the keys in place; the next sweep retries.
                let _ = store.expire_leases();
            }
        });
    }

    fn expire_leases(&self) -> MetaResult<()> {
        let mut s = lock(&self.inner.state);
        let now = Instant::now();
        let expired: Vec<LeaseId> = s
            .leases
            .iter()
            .filter(|(_, l)| l.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            self.drop_lease(&mut s, id)?;
        }
        Ok(())
    }

    fn drop_lease(&self, s: &mut State, id: LeaseId) -> MetaResult<()> {
        let Some(lease) = s.leases.get(&id) else {
            return Err(MetaError::LeaseNotFound(id));
        };
        let ops: Vec<Op> = lease
            .keys
            .iter()
            .filter(|k| s.kvs.get(*k).is_some_and(|kv| kv.lease == Some(id)))
            .map(|k| Op::Delete { key: k.clone() })
            .collect();
        if !ops.is_empty() {
            self.apply(s, &ops)?;
        }
        s.leases.remove(&id);
        Ok(())
    }

    /// Applies `ops` as one revision: persist first, then change memory and notify watchers.
    fn apply(&self, s: &mut State, ops: &[Op]) -> MetaResult<Revision> {
        self.apply_with(s, ops, true)
    }

    fn apply_with(&self, s: &mut State, ops: &[Op], durable: bool) -> MetaResult<Revision> {
        let revision = s.revision + 1;
        let mut mutations = Vec::with_capacity(ops.len());
        let mut events = Vec::with_capacity(ops.len());
        // Stage against a view that sees earlier ops of the same txn.
        let mut staged: BTreeMap<String, Option<KeyValue>> = BTreeMap::new();
        for op in ops {
            match op {
                Op::Put { key, value, lease } => {
                    if let Some(l) = lease
                        && !s.leases.contains_key(l)
                    {
                        return Err(MetaError::LeaseNotFound(*l));
                    }
                    let prev = staged
                        .get(key)
                        .cloned()
                        .unwrap_or_else(|| s.kvs.get(key).cloned());
                    let kv = KeyValue {
                        key: key.clone(),
                        value: value.clone(),
                        create_revision: prev.as_ref().map_or(revision, |p| p.create_revision),
                        mod_revision: revision,
                        version: prev.as_ref().map_or(1, |p| p.version + 1),
                        lease: *lease,
                    };
                    staged.insert(key.clone(), Some(kv.clone()));
                    mutations.push(Mutation::Put(kv.clone()));
                    events.push(WatchEvent {
                        kind: EventKind::Put,
                        kv,
                    });
                }
                Op::Delete { key } => {
                    let exists = staged
                        .get(key)
                        .map_or_else(|| s.kvs.contains_key(key), Option::is_some);
                    if exists {
                        staged.insert(key.clone(), None);
                        mutations.push(Mutation::Delete(key.clone()));
                        events.push(WatchEvent {
                            kind: EventKind::Delete,
                            kv: KeyValue {
                                key: key.clone(),
                                value: Bytes::new(),
                                create_revision: 0,
                                mod_revision: revision,
                                version: 0,
                                lease: None,
                            },
                        });
                    }
                }
            }
        }
        if mutations.is_empty() {
            return Ok(s.revision);
        }
        if let Some(p) = &self.inner.persistence {
            p.apply(revision, &mutations, durable)?;
        }
        s.revision = revision;
        for (key, kv) in staged {
            match kv {
                Some(kv) => {
                    if let Some(l) = kv.lease
                        && let Some(lease) = s.leases.get_mut(&l)
                    {
                        lease.keys.push(key.clone());
                    }
                    s.kvs.insert(key, kv);
                }
                None => {
                    s.kvs.remove(&key);
                }
            }
        }
        s.watchers.retain(|(prefix, tx)| {
            for e in &events {
                if e.kv.key.starts_with(prefix.as_str()) && tx.send(e.clone()).is_err() {
                    return false;
                }
            }
            !tx.is_closed()
        });
        Ok(revision)
    }

    fn holds(s: &State, c: &Compare) -> bool {
        let kv = s.kvs.get(&c.key);
        let ord = match &c.target {
            CompareTarget::CreateRevision(r) => kv.map_or(0, |k| k.create_revision).cmp(r),
            CompareTarget::ModRevision(r) => kv.map_or(0, |k| k.mod_revision).cmp(r),
            CompareTarget::Version(v) => kv.map_or(0, |k| k.version).cmp(v),
            CompareTarget::Value(v) => match kv {
                Some(k) => k.value.as_ref().cmp(v.as_ref()),
                None => return c.op == CompareOp::NotEqual,
            },
        };
        match c.op {
            CompareOp::Equal => ord.is_eq(),
            CompareOp::NotEqual => ord.is_ne(),
            CompareOp::Less => ord.is_lt(),
            CompareOp::Greater => ord.is_gt(),
        }
    }
}

#[async_trait]
impl MetaStore for MemoryMetaStore {
    async fn get(&self, key: &str) -> MetaResult<Option<KeyValue>> {
        Ok(lock(&self.inner.state).kvs.get(key).cloned())
    }

    async fn range(&self, prefix: &str) -> MetaResult<Vec<KeyValue>> {
        let s = lock(&self.inner.state);
        Ok(s.kvs
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(_, v)| v.clone())
            .collect())
    }

    async fn put(&self, key: &str, value: Bytes, lease: Option<LeaseId>) -> MetaResult<Revision> {
        let mut s = lock(&self.inner.state);
        self.apply(
            &mut s,
            &[Op::Put {
                key: key.to_owned(),
                value,
                lease,
            }],
        )
    }

    async fn delete(&self, key: &str) -> MetaResult<bool> {
        let mut s = lock(&self.inner.state);
        let existed = s.kvs.contains_key(key);
        self.apply(
            &mut s,
            &[Op::Delete {
                key: key.to_owned(),
            }],
        )?;
        Ok(existed)
    }

    async fn txn(&self, txn: Txn) -> MetaResult<TxnResponse> {
        self.txn_with(&txn, true)
    }

    async fn txn_relaxed(&self, txn: Txn) -> MetaResult<TxnResponse> {
        self.txn_with(&txn, false)
    }

    async fn watch(&self, prefix: &str) -> MetaResult<WatchReceiver> {
        let (tx, rx) = mpsc::unbounded_channel();
        lock(&self.inner.state)
            .watchers
            .push((prefix.to_owned(), tx));
        Ok(rx)
    }

    async fn grant_lease(&self, ttl: Duration) -> MetaResult<LeaseId> {
        if ttl.is_zero() {
            return Err(MetaError::InvalidArgument(
                "lease TTL must be positive".into(),
            ));
        }
        let mut s = lock(&self.inner.state);
        let id = s.next_lease;
        s.next_lease += 1;
        s.leases.insert(
            id,
            Lease {
                ttl,
                deadline: Instant::now() + ttl,
                keys: Vec::new(),
            },
        );
        Ok(id)
    }

    async fn keep_alive(&self, lease: LeaseId) -> MetaResult<()> {
        self.expire_leases()?;
        let mut s = lock(&self.inner.state);
        let l = s
            .leases
            .get_mut(&lease)
            .ok_or(MetaError::LeaseNotFound(lease))?;
        l.deadline = Instant::now() + l.ttl;
        Ok(())
    }

    async fn revoke_lease(&self, lease: LeaseId) -> MetaResult<()> {
        let mut s = lock(&self.inner.state);
        self.drop_lease(&mut s, lease)
    }
}

#[cfg(all(test, feature = "conformance"))]
mod tests {
    use super::*;

    #[tokio::test]
    async fn memory_store_passes_the_conformance_suite() {
        let store = MemoryMetaStore::new();
        crate::conformance::run_all(move || Arc::new(store.clone()) as Arc<dyn MetaStore>).await;
    }
}
