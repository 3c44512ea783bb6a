//! The embedded metastore for standalone: the in-memory engine of `walden-metastore-api`, made
//! durable in one redb file. Every revision is committed (fsynced) to the file before it becomes
//! visible. Leases and the keys attached to them are not restored after a restart: whoever held
//! them is gone with the process.

use std::{path::Path, sync::Arc};

use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use walden_metastore_api::{
    KeyValue, MemoryMetaStore, MetaError, MetaResult, Mutation, Persistence, Revision, Snapshot,
};

const KVS: TableDefinition<&str, &[u8]> = TableDefinition::new("kvs");
const META: TableDefinition<&str, i64> = TableDefinition::new("meta");
const REVISION_KEY: &str = "revision";

/// Opens (or creates) the store in `path`.
pub fn open(path: &Path) -> MetaResult<MemoryMetaStore> {
    let db = Database::create(path).map_err(|e| unavailable("opening", &e))?;
    let snapshot = load(&db)?;
    tracing::info!(path = %path.display(), revision = snapshot.revision, keys = snapshot.kvs.len(), "embedded metastore open");
    Ok(MemoryMetaStore::with_persistence(
        snapshot,
        Some(Arc::new(RedbPersistence { db })),
    ))
}

fn unavailable(context: &str, e: &dyn std::fmt::Display) -> MetaError {
    MetaError::Unavailable {
        context: format!("embedded metastore: {context}"),
        detail: e.to_string(),
    }
}

fn load(db: &Database) -> MetaResult<Snapshot> {
    let tx = db.begin_read().map_err(|e| unavailable("reading", &e))?;
    let revision = match tx.open_table(META) {
        Ok(t) => t
            .get(REVISION_KEY)
            .map_err(|e| unavailable("reading", &e))?
            .map_or(0, |v| v.value()),
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Snapshot::default()),
        Err(e) => return Err(unavailable("reading", &e)),
    };
    let table = tx.open_table(KVS).map_err(|e| unavailable("reading", &e))?;
    let mut kvs = Vec::new();
    for entry in table.iter().map_err(|e| unavailable("reading", &e))? {
        let (k, v) = entry.map_err(|e| unavailable("reading", &e))?;
        kvs.push(decode(k.value(), v.value())?);
    }
    Ok(Snapshot { revision, kvs })
}

/// Value layout: create_revision i64 | mod_revision i64 | version i64 | lease i64 (0: none) |
/// value bytes; integers little-endian.
fn encode(kv: &KeyValue) -> Vec<u8> {
    let mut b = Vec::with_capacity(32 + kv.value.len());
    for n in [
        kv.create_revision,
        kv.mod_revision,
        kv.version,
        kv.lease.unwrap_or(0),
    ] {
        b.extend_from_slice(&n.to_le_bytes());
    }
    b.extend_from_slice(&kv.value);
    b
}

fn decode(key: &str, b: &[u8]) -> MetaResult<KeyValue> {
    if b.len() < 32 {
        return Err(MetaError::Corrupted(format!(
            "value of {key:?} is {} bytes",
            b.len()
        )));
    }
    let n = |i: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[i * 8..i * 8 + 8]);
        i64::from_le_bytes(a)
    };
    Ok(KeyValue {
        key: key.to_owned(),
        value: bytes::Bytes::copy_from_slice(&b[32..]),
        create_revision: n(0),
        mod_revision: n(1),
        version: n(2),
        lease: Some(n(3)).filter(|l| *l != 0),
    })
}

#[derive(Debug)]
struct RedbPersistence {
    db: Database,
}

impl Persistence for RedbPersistence {
    fn apply(&self, revision: Revision, mutations: &[Mutation], durable: bool) -> MetaResult<()> {
        if !durable {
            // No fsync: redb makes it durable with the next durable commit.
            return self.commit(revision, mutations, Durability::None);
        }
        // A commit fsyncs (milliseconds). On a multi-threaded runtime, say so, so the worker's
        // other tasks move elsewhere instead of stalling behind it (it showed as 20 ms append
        // latency spikes whenever the timestamp window was extended).
        match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(|| {
                    self.commit(revision, mutations, Durability::Immediate)
                })
            }
            _ => self.commit(revision, mutations, Durability::Immediate),
        }
    }
}

impl RedbPersistence {
    fn commit(
        &self,
        revision: Revision,
        mutations: &[Mutation],
        durability: Durability,
    ) -> MetaResult<()> {
        let mut tx = self
            .db
            .begin_write()
            .map_err(|e| unavailable("writing", &e))?;
        tx.set_durability(durability)
            .map_err(|e| unavailable("setting durability", &e))?;
        {
            let mut kvs = tx.open_table(KVS).map_err(|e| unavailable("writing", &e))?;
            for m in mutations {
                match m {
                    Mutation::Put(kv) => {
                        kvs.insert(kv.key.as_str(), encode(kv).as_slice())
                            .map_err(|e| unavailable("writing", &e))?;
                    }
                    Mutation::Delete(k) => {
                        kvs.remove(k.as_str())
                            .map_err(|e| unavailable("writing", &e))?;
                    }
                }
            }
            let mut meta = tx
                .open_table(META)
                .map_err(|e| unavailable("writing", &e))?;
            meta.insert(REVISION_KEY, revision)
                .map_err(|e| unavailable("writing", &e))?;
        }
        tx.commit().map_err(|e| unavailable("committing", &e))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;
    use walden_metastore_api::MetaStore;

    use super::*;

    #[tokio::test]
    async fn embedded_store_passes_the_conformance_suite() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir.path().join("meta.redb")).unwrap();
        walden_metastore_api::conformance::run_all(move || {
            Arc::new(store.clone()) as Arc<dyn MetaStore>
        })
        .await;
    }

    #[tokio::test]
    async fn committed_keys_and_revisions_survive_reopening_but_leased_keys_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.redb");
        let rev = {
            let store = open(&path).unwrap();
            store
                .put("a", Bytes::from_static(b"1"), None)
                .await
                .unwrap();
            let lease = store.grant_lease(Duration::from_secs(60)).await.unwrap();
            store
                .put("leased", Bytes::from_static(b"x"), Some(lease))
                .await
                .unwrap();
            store
                .put("a", Bytes::from_static(b"2"), None)
                .await
                .unwrap()
        };
        let store = open(&path).unwrap();
        let kv = store.get("a").await.unwrap().unwrap();
        assert_eq!(kv.value, Bytes::from_static(b"2"));
        assert_eq!((kv.mod_revision, kv.version), (rev, 2));
        assert_eq!(store.get("leased").await.unwrap(), None);
        let next = store.put("b", Bytes::new(), None).await.unwrap();
        assert!(next > rev, "revisions keep growing across restarts");
    }

    #[tokio::test]
    async fn a_relaxed_write_is_made_durable_by_the_next_durable_one() {
        use walden_metastore_api::{Op, Txn};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.redb");
        {
            let store = open(&path).unwrap();
            let put = |k: &str| Txn {
                success: vec![Op::Put {
                    key: k.into(),
                    value: Bytes::from_static(b"v"),
                    lease: None,
                }],
                ..Txn::default()
            };
            store.txn_relaxed(put("relaxed")).await.unwrap();
            store.txn(put("durable")).await.unwrap();
        }
        let store = open(&path).unwrap();
        assert!(store.get("relaxed").await.unwrap().is_some());
        assert!(store.get("durable").await.unwrap().is_some());
    }
}
