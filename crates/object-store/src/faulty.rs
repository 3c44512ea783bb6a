//! A [`Blobs`] wrapper for tests that fails, delays (and so reorders) and "loses the response
//! of" calls: the object lands, the caller is told the call failed. What an object-storage WAL
//! must survive.

use std::{
    ops::Range,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use bytes::Bytes;

use crate::{Blobs, ObjectInfo, ObjectStoreError};

/// Which faults to inject, decided per write by a seeded generator.
#[derive(Clone, Debug, Default)]
pub struct FaultPlan {
    /// Of 1 000 writes, how many fail before reaching the store.
    pub fail_per_mille: u32,
    /// Of 1 000 writes, how many land but report a failure.
    pub lose_response_per_mille: u32,
    /// Each call waits up to this long first (calls in flight together finish out of order).
    pub max_delay: Duration,
    pub seed: u64,
}

/// What the wrapper did, for assertions.
#[derive(Debug, Default)]
pub struct FaultCounts {
    pub failed: AtomicU64,
    pub lost_responses: AtomicU64,
}

#[derive(Debug)]
pub struct Faulty {
    inner: Arc<dyn Blobs>,
    plan: Mutex<FaultPlan>,
    rng: Mutex<u64>,
    pub counts: FaultCounts,
}

/// What happens to one write.
enum Fate {
    Fail,
    LoseResponse,
    Ok,
}

impl Faulty {
    pub fn new(inner: Arc<dyn Blobs>, plan: FaultPlan) -> Self {
        Self {
            inner,
            rng: Mutex::new(plan.seed | 1),
            plan: Mutex::new(plan),
            counts: FaultCounts::default(),
        }
    }

    /// Replaces the plan (e.g. to stop the faults before checking what is stored).
    pub fn set_plan(&self, plan: FaultPlan) {
        *self.plan.lock().unwrap_or_else(|e| e.into_inner()) = plan;
    }

    /// xorshift: deterministic for a seed, no dependency.
    fn next(&self) -> u64 {
        let mut x = self.rng.lock().unwrap_or_else(|e| e.into_inner());
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        *x
    }

    async fn before(&self) -> Fate {
        let plan = self.plan.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if !plan.max_delay.is_zero() {
            let us = self.next() % (plan.max_delay.as_micros() as u64 + 1);
            tokio::time::sleep(Duration::from_micros(us)).await;
        }
        let roll = (self.next() % 1000) as u32;
        if roll < plan.fail_per_mille {
            Fate::Fail
        } else if roll < plan.fail_per_mille + plan.lose_response_per_mille {
            Fate::LoseResponse
        } else {
            Fate::Ok
        }
    }

    fn injected(op: &'static str, key: &str, what: &str) -> ObjectStoreError {
        ObjectStoreError::Unavailable {
            op,
            key: key.to_owned(),
            detail: format!("injected: {what}"),
        }
    }

    async fn write(
        &self,
        op: &'static str,
        key: &str,
        call: impl Future<Output = Result<(), ObjectStoreError>>,
    ) -> Result<(), ObjectStoreError> {
        match self.before().await {
            Fate::Fail => {
                self.counts.failed.fetch_add(1, Ordering::Relaxed);
                Err(Self::injected(
                    op,
                    key,
                    "the call failed before reaching the store",
                ))
            }
            Fate::LoseResponse => {
                let r = call.await;
                self.counts.lost_responses.fetch_add(1, Ordering::Relaxed);
                r?;
                Err(Self::injected(
                    op,
                    key,
                    "the object landed; the response was lost",
                ))
            }
            Fate::Ok => call.await,
        }
    }
}

#[async_trait]
impl Blobs for Faulty {
    fn url(&self, key: &str) -> String {
        self.inner.url(key)
    }

    async fn put_if_absent(&self, key: &str, data: Bytes) -> Result<(), ObjectStoreError> {
        self.write("put_if_absent", key, self.inner.put_if_absent(key, data))
            .await
    }

    async fn put(&self, key: &str, data: Bytes) -> Result<(), ObjectStoreError> {
        self.write("put", key, self.inner.put(key, data)).await
    }

    async fn get(&self, key: &str) -> Result<Bytes, ObjectStoreError> {
        self.before().await;
        self.inner.get(key).await
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes, ObjectStoreError> {
        self.before().await;
        self.inner.get_range(key, range).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, ObjectStoreError> {
        self.before().await;
        self.inner.list(prefix).await
    }

    async fn delete(&self, key: &str) -> Result<(), ObjectStoreError> {
        self.write("delete", key, self.inner.delete(key)).await
    }
}
