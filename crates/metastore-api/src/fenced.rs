//! A view of a store whose every write also requires a fence to hold: for a leader whose
//! writes must stop the moment it is deposed (the fence compares the leader key's revision).

use std::{fmt, sync::Arc, time::Duration};

use async_trait::async_trait;
use bytes::Bytes;

use crate::{
    Compare, KeyValue, LeaseId, MetaError, MetaResult, MetaStore, Op, Revision, Txn, TxnResponse,
    WatchReceiver,
};

/// `inner`, with `fence` added to every write. A transaction whose fence fails fails as a
/// whole (`succeeded == false`), like any failed comparison; a plain put or delete whose fence
/// fails is [`MetaError::FenceLost`].
pub struct Fenced {
    inner: Arc<dyn MetaStore>,
    fence: Compare,
}

impl Fenced {
    pub fn new(inner: Arc<dyn MetaStore>, fence: Compare) -> Self {
        Self { inner, fence }
    }

    async fn holds(&self) -> MetaResult<bool> {
        // A transaction that changes nothing: whether the fence holds now.
        Ok(self
            .inner
            .txn(Txn {
                compare: vec![self.fence.clone()],
                success: vec![],
                failure: vec![],
            })
            .await?
            .succeeded)
    }

    fn lost(&self) -> MetaError {
        MetaError::FenceLost(self.fence.key.clone())
    }
}

impl fmt::Debug for Fenced {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fenced")
            .field("fence", &self.fence)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl MetaStore for Fenced {
    async fn get(&self, key: &str) -> MetaResult<Option<KeyValue>> {
        self.inner.get(key).await
    }

    async fn range(&self, prefix: &str) -> MetaResult<Vec<KeyValue>> {
        self.inner.range(prefix).await
    }

    async fn put(&self, key: &str, value: Bytes, lease: Option<LeaseId>) -> MetaResult<Revision> {
        let r = self
            .txn(Txn {
                compare: vec![],
                success: vec![Op::Put {
                    key: key.to_owned(),
                    value,
                    lease,
                }],
                failure: vec![],
            })
            .await?;
        if r.succeeded {
            Ok(r.revision)
        } else {
            Err(self.lost())
        }
    }

    async fn delete(&self, key: &str) -> MetaResult<bool> {
        let existed = self.inner.get(key).await?.is_some();
        let r = self
            .txn(Txn {
                compare: vec![],
                success: vec![Op::Delete {
                    key: key.to_owned(),
                }],
                failure: vec![],
            })
            .await?;
        if r.succeeded {
            Ok(existed)
        } else {
            Err(self.lost())
        }
    }

    async fn txn(&self, mut txn: Txn) -> MetaResult<TxnResponse> {
        txn.compare.push(self.fence.clone());
        // The failure branch runs when *any* comparison fails, the fence included: a deposed
        // writer must not run it either.
        if !txn.failure.is_empty() && !self.holds().await? {
            return Err(self.lost());
        }
        self.inner.txn(txn).await
    }

    async fn txn_relaxed(&self, mut txn: Txn) -> MetaResult<TxnResponse> {
        txn.compare.push(self.fence.clone());
        if !txn.failure.is_empty() && !self.holds().await? {
            return Err(self.lost());
        }
        self.inner.txn_relaxed(txn).await
    }

    async fn watch(&self, prefix: &str) -> MetaResult<WatchReceiver> {
        self.inner.watch(prefix).await
    }

    async fn grant_lease(&self, ttl: Duration) -> MetaResult<LeaseId> {
        self.inner.grant_lease(ttl).await
    }

    async fn keep_alive(&self, lease: LeaseId) -> MetaResult<()> {
        self.inner.keep_alive(lease).await
    }

    async fn revoke_lease(&self, lease: LeaseId) -> MetaResult<()> {
        self.inner.revoke_lease(lease).await
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::{MemoryMetaStore, increment};

    #[tokio::test]
    async fn once_the_fence_fails_no_write_goes_through() {
        let store: Arc<dyn MetaStore> = Arc::new(MemoryMetaStore::new());
        let rev = store.put("leader", Bytes::from("me"), None).await.unwrap();
        let fenced = Fenced::new(store.clone(), Compare::mod_revision("leader", rev));
        fenced.put("a", Bytes::from("1"), None).await.unwrap();
        assert_eq!(increment(&fenced, "n").await.unwrap(), 1);

        // Another leader takes over.
        store
            .put("leader", Bytes::from("other"), None)
            .await
            .unwrap();
        assert!(matches!(
            fenced.put("a", Bytes::from("2"), None).await,
            Err(MetaError::FenceLost(_))
        ));
        assert!(matches!(
            fenced.delete("a").await,
            Err(MetaError::FenceLost(_))
        ));
        let cas = fenced
            .txn(Txn {
                compare: vec![Compare::absent("b")],
                success: vec![Op::Put {
                    key: "b".into(),
                    value: Bytes::from("x"),
                    lease: None,
                }],
                failure: vec![],
            })
            .await
            .unwrap();
        assert!(!cas.succeeded);
        assert_eq!(
            store.get("a").await.unwrap().unwrap().value,
            Bytes::from("1")
        );
        assert_eq!(store.get("b").await.unwrap(), None);
    }
}
