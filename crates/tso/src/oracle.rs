//! The oracle proper: a window persisted by compare-and-swap.

use std::{
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use async_trait::async_trait;
use bytes::Bytes;
use walden_common::{TimeTick, tick::MAX_LOGICAL};
use walden_metastore_api::{Compare, MetaStore, Op, Revision, Txn, keys::TSO_UPPER_MS};

use crate::{Exhausted, TickSource, TsoError};

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[derive(Debug)]
struct State {
    last: TimeTick,
    /// No tick may have `physical_ms >= upper_ms` until a larger bound is persisted.
    upper_ms: u64,
    /// The bound key's revision as this oracle last wrote it: a different one means another
    /// oracle wrote since.
    revision: Revision,
    superseded: bool,
}

/// A timestamp oracle backed by one metastore key.
#[derive(Debug)]
pub struct Oracle {
    meta: Arc<dyn MetaStore>,
    state: Mutex<State>,
    window: Duration,
    /// Serializes window extensions.
    extending: tokio::sync::Mutex<()>,
}

fn parse(value: &[u8]) -> Result<u64, TsoError> {
    std::str::from_utf8(value)
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .ok_or_else(|| TsoError::Corrupted(TSO_UPPER_MS.into()))
}

impl Oracle {
    /// Loads the persisted bound and persists a new window above it.
    pub async fn open(meta: Arc<dyn MetaStore>, window: Duration) -> Result<Self, TsoError> {
        let (persisted, revision) = match meta.get(TSO_UPPER_MS).await? {
            Some(kv) => (parse(&kv.value)?, kv.mod_revision),
            None => (0, 0),
        };
        let oracle = Self {
            meta,
            state: Mutex::new(State {
                // Every earlier tick had a physical part below `persisted`.
                last: TimeTick::compose(persisted, 0),
                upper_ms: persisted,
                revision,
                superseded: false,
            }),
            window,
            extending: tokio::sync::Mutex::new(()),
        };
        oracle.extend().await?;
        Ok(oracle)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The next tick, strictly greater than every tick handed out before.
    pub fn allocate(&self) -> Result<TimeTick, Exhausted> {
        self.allocate_batch(1, TimeTick(0)).map(|(first, _)| first)
    }

    /// `count` consecutive ticks, all above `above` and above every tick handed out before:
    /// returns the first. Fails when the window cannot hold them all.
    pub fn allocate_batch(
        &self,
        count: u32,
        above: TimeTick,
    ) -> Result<(TimeTick, u32), Exhausted> {
        let mut s = self.lock();
        if s.superseded || count == 0 {
            return Err(Exhausted);
        }
        let floor = s.last.max(above);
        let now = TimeTick::compose(now_ms(), 0);
        let first = if now > floor {
            now
        } else {
            TimeTick(floor.0 + 1)
        };
        let end = TimeTick(first.0 + u64::from(count) - 1);
        if end.physical_ms() >= s.upper_ms {
            return Err(Exhausted);
        }
        s.last = end;
        Ok((first, count))
    }

    /// Moves the oracle past `tick`, a tick found in a log.
    pub async fn observe(&self, tick: TimeTick) -> Result<(), TsoError> {
        {
            let mut s = self.lock();
            if tick > s.last {
                s.last = tick;
            }
        }
        self.extend().await
    }

    /// The last tick handed out.
    pub fn last(&self) -> TimeTick {
        self.lock().last
    }

    /// Whether the window should be extended soon (less than half of it is left).
    pub fn wants_extension(&self) -> bool {
        let s = self.lock();
        let ahead = s
            .upper_ms
            .saturating_sub(now_ms().max(s.last.physical_ms()));
        ahead < self.window.as_millis() as u64 / 2
    }

    /// Persists a new upper bound a window ahead of now (or of the last tick, if later), by
    /// compare-and-swap on the bound this oracle last wrote.
    pub async fn extend(&self) -> Result<(), TsoError> {
        let _one = self.extending.lock().await;
        let (target, revision) = {
            let s = self.lock();
            if s.superseded {
                return Err(TsoError::Superseded {
                    key: TSO_UPPER_MS.into(),
                });
            }
            // A logical counter near its end spills into the next millisecond.
            let spill = u64::from(s.last.logical() > MAX_LOGICAL / 2);
            let target =
                now_ms().max(s.last.physical_ms() + 1 + spill) + self.window.as_millis() as u64;
            if target <= s.upper_ms {
                return Ok(());
            }
            (target, s.revision)
        };
        let resp = self
            .meta
            .txn(Txn {
                compare: vec![Compare::mod_revision(TSO_UPPER_MS, revision)],
                success: vec![Op::Put {
                    key: TSO_UPPER_MS.into(),
                    value: Bytes::from(target.to_string()),
                    lease: None,
                }],
                failure: vec![],
            })
            .await?;
        let mut s = self.lock();
        if !resp.succeeded {
            s.superseded = true;
            return Err(TsoError::Superseded {
                key: TSO_UPPER_MS.into(),
            });
        }
        s.upper_ms = s.upper_ms.max(target);
        s.revision = resp.revision;
        Ok(())
    }

    /// Whether another oracle has taken over.
    pub fn superseded(&self) -> bool {
        self.lock().superseded
    }
}

/// The oracle serves batches itself: this is what the leader coordinator answers nodes with.
#[async_trait]
impl crate::TickServer for Oracle {
    async fn allocate(&self, count: u32, above: TimeTick) -> Result<TimeTick, TsoError> {
        loop {
            match self.allocate_batch(count, above) {
                Ok((first, _)) => return Ok(first),
                // A superseded oracle fails to extend: the error ends the loop.
                Err(Exhausted) => self.extend().await?,
            }
        }
    }
}

/// An oracle in the same process, as a [`TickSource`]; a background task keeps its window
/// ahead of the clock.
#[derive(Debug, Clone)]
pub struct LocalTicks(Arc<Oracle>);

impl LocalTicks {
    pub fn new(oracle: Arc<Oracle>) -> Self {
        let weak = Arc::downgrade(&oracle);
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_millis(100));
            loop {
                every.tick().await;
                let Some(o) = weak.upgrade() else { return };
                if o.wants_extension()
                    && let Err(e) = o.extend().await
                {
                    tracing::warn!(error = %e, "extending the timestamp window failed");
                }
            }
        });
        Self(oracle)
    }

    pub fn oracle(&self) -> &Arc<Oracle> {
        &self.0
    }
}

#[async_trait]
impl TickSource for LocalTicks {
    fn allocate(&self) -> Result<TimeTick, Exhausted> {
        self.0.allocate()
    }

    async fn refill(&self) -> Result<(), TsoError> {
        self.0.extend().await
    }

    async fn observe(&self, tick: TimeTick) -> Result<(), TsoError> {
        self.0.observe(tick).await
    }

    fn last(&self) -> TimeTick {
        self.0.last()
    }

    fn server(&self) -> Option<&dyn crate::TickServer> {
        Some(&*self.0)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use walden_metastore_api::MemoryMetaStore;

    use super::*;

    fn store() -> Arc<dyn MetaStore> {
        Arc::new(MemoryMetaStore::new())
    }

    async fn bound(meta: &dyn MetaStore) -> u64 {
        parse(&meta.get(TSO_UPPER_MS).await.unwrap().unwrap().value).unwrap()
    }

    #[tokio::test]
    async fn ticks_strictly_increase_and_a_new_oracle_starts_above_the_persisted_bound() {
        let meta = store();
        let tso = Oracle::open(meta.clone(), Duration::from_secs(3))
            .await
            .unwrap();
        let mut last = TimeTick(0);
        for _ in 0..10_000 {
            let t = tso.allocate().unwrap();
            assert!(t > last);
            last = t;
        }
        let b = bound(&*meta).await;
        assert!(
            last.physical_ms() < b,
            "no tick at or past the persisted bound"
        );
        // A restart (even with a clock that went back) starts above everything handed out.
        let tso2 = Oracle::open(meta.clone(), Duration::from_secs(3))
            .await
            .unwrap();
        let first = tso2.allocate().unwrap();
        assert!(first > last);
        assert!(first.physical_ms() >= b);
    }

    #[tokio::test]
    async fn an_exhausted_window_refuses_until_extended() {
        let meta = store();
        let tso = Oracle::open(meta, Duration::from_millis(50)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(80)).await;
        assert_eq!(tso.allocate(), Err(Exhausted));
        assert!(tso.wants_extension());
        tso.extend().await.unwrap();
        assert!(tso.allocate().is_ok());
    }

    #[tokio::test]
    async fn a_tick_observed_in_a_log_from_a_clock_ahead_is_passed() {
        let tso = Oracle::open(store(), Duration::from_secs(3)).await.unwrap();
        let ahead = TimeTick::compose(now_ms() + 3_600_000, 5);
        tso.observe(ahead).await.unwrap();
        let t = tso.allocate().unwrap();
        assert!(t > ahead, "{t:?} after {ahead:?}");
    }

    #[tokio::test]
    async fn an_oracle_whose_bound_another_oracle_moved_stops_handing_out_ticks() {
        let meta = store();
        let old = Oracle::open(meta.clone(), Duration::from_millis(50))
            .await
            .unwrap();
        // A new leader's oracle opens: it persists a bound above the old one's.
        let new = Oracle::open(meta.clone(), Duration::from_millis(50))
            .await
            .unwrap();
        let from_new = new.allocate().unwrap();
        tokio::time::sleep(Duration::from_millis(80)).await;
        // The old oracle's window ran out; it may not extend over the new one's bound.
        let err = old.extend().await.unwrap_err();
        assert!(matches!(err, TsoError::Superseded { .. }), "{err}");
        assert_eq!(old.allocate(), Err(Exhausted));
        assert!(old.superseded());
        new.extend().await.unwrap();
        assert!(new.allocate().unwrap() > from_new);
    }

    #[tokio::test]
    async fn a_batch_is_consecutive_and_above_what_it_is_asked_to_pass() {
        let tso = Oracle::open(store(), Duration::from_secs(3)).await.unwrap();
        let t = tso.allocate().unwrap();
        let above = TimeTick(t.0 + 1_000);
        let (first, n) = tso.allocate_batch(500, above).unwrap();
        assert_eq!(n, 500);
        assert!(first > above);
        assert_eq!(tso.last(), TimeTick(first.0 + 499));
        assert!(tso.allocate().unwrap().0 > first.0 + 499);
    }
}
