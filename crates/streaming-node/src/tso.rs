//! The timestamp oracle: hybrid ticks that never go back, across restarts and clock jumps.
//!
//! Ticks are handed out from a window `[.., upper_ms)` whose upper bound is persisted in the
//! metastore *before* any tick in it is used. After a restart the oracle starts above the last
//! persisted bound, so it never repeats a tick even if the clock went back. Allocation itself is
//! synchronous (it runs under a channel's append lock); a background task keeps the window ahead
//! of the clock, and an allocation that finds it exhausted waits for [`Tso::extend`].

use std::{
    sync::{Mutex, MutexGuard},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use walden_common::{TimeTick, tick::MAX_LOGICAL};
use walden_metastore_api::MetaStore;

use crate::NodeError;

/// Metastore key of the persisted upper bound (milliseconds, decimal).
pub const TSO_KEY: &str = "walden/tso/upper_ms";

#[derive(Debug)]
struct State {
    last: TimeTick,
    /// No tick may have `physical_ms >= upper_ms` until a larger bound is persisted.
    upper_ms: u64,
}

/// A timestamp oracle backed by a metastore key.
#[derive(Debug)]
pub struct Tso {
    state: Mutex<State>,
    window: Duration,
    /// Serializes window extensions.
    extending: tokio::sync::Mutex<()>,
}

/// The window is exhausted; call [`Tso::extend`] and retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exhausted;

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Tso {
    /// Loads the persisted bound and persists a new window above it.
    pub async fn open(meta: &dyn MetaStore, window: Duration) -> Result<Self, NodeError> {
        let persisted = match meta.get(TSO_KEY).await? {
            Some(kv) => std::str::from_utf8(&kv.value)
                .ok()
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or_else(|| NodeError::Internal(format!("{TSO_KEY} is not a number")))?,
            None => 0,
        };
        let tso = Self {
            state: Mutex::new(State {
                // Every earlier tick had a physical part below `persisted`.
                last: TimeTick::compose(persisted, 0),
                upper_ms: persisted,
            }),
            window,
            extending: tokio::sync::Mutex::new(()),
        };
        tso.extend(meta).await?;
        Ok(tso)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The next tick, strictly greater than every tick handed out before.
    pub fn allocate(&self) -> Result<TimeTick, Exhausted> {
        let mut s = self.lock();
        let now = now_ms();
        let last = s.last;
        let next = if now > last.physical_ms() {
            TimeTick::compose(now, 0)
        } else if last.logical() < MAX_LOGICAL {
            TimeTick(last.0 + 1)
        } else {
            TimeTick::compose(last.physical_ms() + 1, 0)
        };
        if next.physical_ms() >= s.upper_ms {
            return Err(Exhausted);
        }
        s.last = next;
        Ok(next)
    }

    /// Moves the oracle past `tick`, a tick found in a log: another writer (a process with its
    /// own metastore and perhaps a clock ahead of this one) may have written the log last, and
    /// ticks must keep rising across writers.
    pub async fn observe(&self, tick: TimeTick, meta: &dyn MetaStore) -> Result<(), NodeError> {
        {
            let mut s = self.lock();
            if tick > s.last {
                s.last = tick;
            }
        }
        self.extend(meta).await
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

    /// Persists a new upper bound a window ahead of now (or of the last tick, if later).
    pub async fn extend(&self, meta: &dyn MetaStore) -> Result<(), NodeError> {
        let _one = self.extending.lock().await;
        let target = {
            let s = self.lock();
            now_ms().max(s.last.physical_ms() + 1) + self.window.as_millis() as u64
        };
        if target <= self.lock().upper_ms {
            return Ok(());
        }
        meta.put(TSO_KEY, Bytes::from(target.to_string()), None)
            .await?;
        let mut s = self.lock();
        s.upper_ms = s.upper_ms.max(target);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use walden_metastore_api::MemoryMetaStore;

    use super::*;

    #[tokio::test]
    async fn ticks_strictly_increase_and_restarts_start_above_the_persisted_bound() {
        let meta = MemoryMetaStore::new();
        let tso = Tso::open(&meta, Duration::from_secs(3)).await.unwrap();
        let mut last = TimeTick(0);
        for _ in 0..10_000 {
            let t = tso.allocate().unwrap();
            assert!(t > last);
            last = t;
        }
        let bound: u64 = std::str::from_utf8(&meta.get(TSO_KEY).await.unwrap().unwrap().value)
            .unwrap()
            .parse()
            .unwrap();
        assert!(
            last.physical_ms() < bound,
            "no tick at or past the persisted bound"
        );
        // A restart (even with a clock that went back) starts above everything handed out.
        let tso2 = Tso::open(&meta, Duration::from_secs(3)).await.unwrap();
        let first = tso2.allocate().unwrap();
        assert!(first > last);
        assert!(first.physical_ms() >= bound);
    }

    #[tokio::test]
    async fn an_exhausted_window_refuses_until_extended() {
        let meta = MemoryMetaStore::new();
        let tso = Tso::open(&meta, Duration::from_millis(50)).await.unwrap();
        // Use up the window by waiting past it.
        tokio::time::sleep(Duration::from_millis(80)).await;
        assert_eq!(tso.allocate(), Err(Exhausted));
        assert!(tso.wants_extension());
        tso.extend(&meta).await.unwrap();
        assert!(tso.allocate().is_ok());
    }

    #[tokio::test]
    async fn a_tick_observed_in_a_log_from_a_clock_ahead_is_passed() {
        let meta = MemoryMetaStore::new();
        let tso = Tso::open(&meta, Duration::from_secs(3)).await.unwrap();
        // Another writer's clock ran an hour ahead.
        let ahead = TimeTick::compose(now_ms() + 3_600_000, 5);
        tso.observe(ahead, &meta).await.unwrap();
        let t = tso.allocate().unwrap();
        assert!(t > ahead, "{t:?} after {ahead:?}");
    }
}
