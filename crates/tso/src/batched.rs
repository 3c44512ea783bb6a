//! Ticks fetched in batches from a remote oracle (the coordinator leader).

use std::{
    fmt,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use async_trait::async_trait;
use walden_common::TimeTick;

use crate::{Exhausted, TickSource, TsoError};

/// The oracle that serves a cluster.
#[async_trait]
pub trait TickServer: Send + Sync + fmt::Debug {
    /// `count` consecutive ticks, above `above` and above every tick the cluster's oracle
    /// handed out before: returns the first.
    async fn allocate(&self, count: u32, above: TimeTick) -> Result<TimeTick, TsoError>;
}

#[derive(Debug)]
struct State {
    next: u64,
    /// Exclusive.
    end: u64,
    fetched: Instant,
    last: TimeTick,
    /// The highest tick seen in a log: the next batch must be above it.
    floor: TimeTick,
}

/// A [`TickSource`] that hands out ticks from batches fetched from a [`TickServer`]. A batch
/// older than `max_age` is dropped, so ticks stay close to the clock even on an idle node.
#[derive(Debug)]
pub struct BatchedTicks {
    server: Arc<dyn TickServer>,
    batch: u32,
    max_age: Duration,
    state: Mutex<State>,
    refilling: tokio::sync::Mutex<()>,
}

impl BatchedTicks {
    pub fn new(server: Arc<dyn TickServer>, batch: u32, max_age: Duration) -> Self {
        Self {
            server,
            batch: batch.max(1),
            max_age,
            state: Mutex::new(State {
                next: 0,
                end: 0,
                fetched: Instant::now(),
                last: TimeTick(0),
                floor: TimeTick(0),
            }),
            refilling: tokio::sync::Mutex::new(()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn usable(&self, s: &State) -> bool {
        s.next < s.end && s.fetched.elapsed() < self.max_age
    }
}

#[async_trait]
impl TickSource for BatchedTicks {
    fn allocate(&self) -> Result<TimeTick, Exhausted> {
        let mut s = self.lock();
        if !self.usable(&s) {
            return Err(Exhausted);
        }
        let t = TimeTick(s.next);
        s.next += 1;
        s.last = t;
        Ok(t)
    }

    async fn refill(&self) -> Result<(), TsoError> {
        let _one = self.refilling.lock().await;
        let above = {
            let s = self.lock();
            if self.usable(&s) {
                return Ok(()); // another caller refilled meanwhile
            }
            s.last.max(s.floor)
        };
        let first = match self.server.allocate(self.batch, above).await {
            Ok(f) => f,
            Err(e) => {
                // The oracle is away (a leader change): the rest of the batch is still unique
                // and rising, only further from the clock; use it rather than refuse appends.
                let mut s = self.lock();
                if s.next < s.end {
                    s.fetched = Instant::now();
                    tracing::warn!(error = %e, left = s.end - s.next, "tick batch not refreshed; using the rest of it");
                    return Ok(());
                }
                return Err(e);
            }
        };
        if first <= above {
            return Err(TsoError::Unavailable(format!(
                "the oracle answered a batch at {first}, not above {above}"
            )));
        }
        let mut s = self.lock();
        s.next = first.0;
        s.end = first.0 + u64::from(self.batch);
        s.fetched = Instant::now();
        Ok(())
    }

    async fn observe(&self, tick: TimeTick) -> Result<(), TsoError> {
        {
            let mut s = self.lock();
            s.floor = s.floor.max(tick);
            if s.next <= tick.0 {
                s.end = s.next; // this batch would go back: drop it
            }
        }
        self.refill().await
    }

    fn last(&self) -> TimeTick {
        self.lock().last
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use walden_metastore_api::{MemoryMetaStore, MetaStore};

    use super::*;
    use crate::Oracle;

    async fn server() -> Arc<Oracle> {
        let meta: Arc<dyn MetaStore> = Arc::new(MemoryMetaStore::new());
        Arc::new(Oracle::open(meta, Duration::from_secs(3)).await.unwrap())
    }

    async fn next(t: &BatchedTicks) -> TimeTick {
        loop {
            match t.allocate() {
                Ok(t) => return t,
                Err(Exhausted) => t.refill().await.unwrap(),
            }
        }
    }

    #[tokio::test]
    async fn two_nodes_batching_from_one_oracle_never_share_a_tick() {
        let oracle = server().await;
        let a = BatchedTicks::new(oracle.clone(), 7, Duration::from_secs(10));
        let b = BatchedTicks::new(oracle.clone(), 5, Duration::from_secs(10));
        let mut all = Vec::new();
        let (mut last_a, mut last_b) = (TimeTick(0), TimeTick(0));
        for i in 0..1_000 {
            if i % 3 == 0 {
                let t = next(&b).await;
                assert!(t > last_b);
                last_b = t;
                all.push(t);
            } else {
                let t = next(&a).await;
                assert!(t > last_a);
                last_a = t;
                all.push(t);
            }
        }
        let n = all.len();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), n, "no tick twice");
    }

    #[tokio::test]
    async fn after_observing_a_log_tick_the_next_tick_is_above_it() {
        let oracle = server().await;
        let a = BatchedTicks::new(oracle.clone(), 1_000, Duration::from_secs(10));
        let b = BatchedTicks::new(oracle.clone(), 1_000, Duration::from_secs(10));
        let early = next(&a).await; // a holds a batch from before b's
        let written_by_b = next(&b).await;
        assert!(written_by_b > early);
        // The pchannel b wrote moves to a: a's old batch would go back.
        a.observe(written_by_b).await.unwrap();
        assert!(next(&a).await > written_by_b);
    }

    #[derive(Debug)]
    struct Away;

    #[async_trait]
    impl TickServer for Away {
        async fn allocate(&self, _: u32, _: TimeTick) -> Result<TimeTick, TsoError> {
            Err(TsoError::Unavailable("leader gone".into()))
        }
    }

    #[derive(Debug)]
    struct Flaky {
        inner: Arc<Oracle>,
        up: std::sync::atomic::AtomicBool,
    }

    #[async_trait]
    impl TickServer for Flaky {
        async fn allocate(&self, count: u32, above: TimeTick) -> Result<TimeTick, TsoError> {
            if self.up.load(std::sync::atomic::Ordering::SeqCst) {
                TickServer::allocate(&*self.inner, count, above).await
            } else {
                Away.allocate(count, above).await
            }
        }
    }

    #[tokio::test]
    async fn while_the_oracle_is_away_the_rest_of_the_batch_is_used_and_then_refused() {
        let flaky = Arc::new(Flaky {
            inner: server().await,
            up: std::sync::atomic::AtomicBool::new(true),
        });
        let a = BatchedTicks::new(flaky.clone(), 10, Duration::from_millis(10));
        let mut last = next(&a).await;
        flaky.up.store(false, std::sync::atomic::Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(20)).await;
        // 9 ticks are left in the aged batch: they are handed out, still rising.
        for _ in 0..9 {
            let t = next(&a).await;
            assert!(t > last);
            last = t;
        }
        assert_eq!(a.allocate(), Err(Exhausted));
        assert!(
            a.refill().await.is_err(),
            "an empty batch cannot be stretched"
        );
    }

    #[tokio::test]
    async fn a_stale_batch_is_dropped_so_ticks_follow_the_clock() {
        let oracle = server().await;
        let a = BatchedTicks::new(oracle, 1_000_000, Duration::from_millis(20));
        let first = next(&a).await;
        tokio::time::sleep(Duration::from_millis(40)).await;
        assert_eq!(a.allocate(), Err(Exhausted));
        let later = next(&a).await;
        assert!(later.physical_ms() >= first.physical_ms() + 40);
    }
}
