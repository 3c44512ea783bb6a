//! Idempotent producers: the recent sequences of each producer on one pchannel.
//!
//! A producer numbers its messages in send order and resends a message with the same number.
//! The window remembers, per producer, the last `window` sequences and what became of them, so a
//! retry is answered with the original result (or waits for the original, if it is still in
//! flight) instead of being written twice. A sequence below what the window can vouch for is
//! refused: it might have been written, and guessing could duplicate it.
//!
//! The window lives in memory and is rebuilt when the pchannel opens from the WAL since the last
//! checkpoint (the messages carry their producer and sequence), so it holds across restarts for
//! the retries that matter: those of messages in flight when the node stopped. The checkpoint
//! keeps each producer's highest sequence, so an older resend that the rebuilt window cannot
//! answer is refused rather than written twice.

use std::collections::{BTreeMap, HashMap};

use crate::channel::AppendResult;

/// What became of a sequence.
#[derive(Debug, Clone, Copy)]
pub enum Seen {
    /// Enqueued as WAL id `.0`, not yet durable: a resend waits for it.
    InFlight(u64),
    Done(AppendResult),
}

/// The answer for a (producer, sequence).
#[derive(Debug)]
pub enum Lookup {
    /// Not seen: append it.
    New,
    Duplicate(Seen),
    /// Older than the window remembers.
    TooOld {
        floor: u64,
    },
}

#[derive(Debug)]
struct Window {
    /// Sequences below this are not vouched for.
    floor: u64,
    entries: BTreeMap<u64, Seen>,
    last_used: u64,
}

/// Per-producer windows of one pchannel, bounded in producers and in sequences per producer.
#[derive(Debug)]
pub struct Dedup {
    windows: HashMap<u64, Window>,
    window: usize,
    max_producers: usize,
    clock: u64,
}

impl Dedup {
    pub fn new(window: usize, max_producers: usize) -> Self {
        Self {
            windows: HashMap::new(),
            window: window.max(1),
            max_producers: max_producers.max(1),
            clock: 0,
        }
    }

    pub fn lookup(&mut self, producer: u64, seq: u64) -> Lookup {
        self.clock += 1;
        let Some(w) = self.windows.get_mut(&producer) else {
            return Lookup::New;
        };
        w.last_used = self.clock;
        match w.entries.get(&seq) {
            Some(seen) => Lookup::Duplicate(*seen),
            None if seq < w.floor => Lookup::TooOld { floor: w.floor },
            None => Lookup::New,
        }
    }

    /// Records `seq` of `producer`; the first sequence seen of a producer sets its floor.
    pub fn record(&mut self, producer: u64, seq: u64, seen: Seen) {
        self.clock += 1;
        if !self.windows.contains_key(&producer) && self.windows.len() >= self.max_producers {
            // Forget the producer idle the longest.
            if let Some(oldest) = self
                .windows
                .iter()
                .min_by_key(|(_, w)| w.last_used)
                .map(|(id, _)| *id)
            {
                self.windows.remove(&oldest);
            }
        }
        let w = self.windows.entry(producer).or_insert_with(|| Window {
            floor: seq,
            entries: BTreeMap::new(),
            last_used: 0,
        });
        w.last_used = self.clock;
        w.floor = w.floor.min(seq);
        w.entries.insert(seq, seen);
        while w.entries.len() > self.window {
            if let Some((evicted, _)) = w.entries.pop_first() {
                w.floor = evicted + 1;
            }
        }
    }

    /// A sequence whose append failed: forget it, so that a retry writes it.
    pub fn forget(&mut self, producer: u64, seq: u64) {
        if let Some(w) = self.windows.get_mut(&producer) {
            w.entries.remove(&seq);
        }
    }

    /// Producers remembered.
    pub fn producers(&self) -> usize {
        self.windows.len()
    }

    /// Each remembered producer's highest recorded sequence (what a checkpoint keeps).
    pub fn high_water(&self) -> Vec<(u64, u64)> {
        let mut marks: Vec<_> = self
            .windows
            .iter()
            .filter_map(|(p, w)| w.entries.last_key_value().map(|(s, _)| (*p, *s)))
            .collect();
        marks.sort_unstable();
        marks
    }

    /// Restores a producer's high-water mark from a checkpoint, before the WAL's messages are
    /// recorded: sequences up to it that no rebuilt entry answers are refused as too old.
    pub fn restore_mark(&mut self, producer: u64, last_seq: u64) {
        if self.windows.len() >= self.max_producers {
            return;
        }
        self.windows.entry(producer).or_insert_with(|| Window {
            floor: last_seq.saturating_add(1),
            entries: BTreeMap::new(),
            last_used: 0,
        });
    }
}

#[cfg(test)]
mod tests {
    use walden_common::{MessageId, TimeTick};

    use super::*;

    fn done(id: u64) -> Seen {
        Seen::Done(AppendResult {
            id: MessageId(id),
            tick: TimeTick(id * 10),
            last_confirmed: MessageId(id),
        })
    }

    #[test]
    fn a_retry_is_a_duplicate_and_a_new_sequence_is_new() {
        let mut d = Dedup::new(4, 10);
        assert!(matches!(d.lookup(7, 1), Lookup::New));
        d.record(7, 1, done(100));
        match d.lookup(7, 1) {
            Lookup::Duplicate(Seen::Done(r)) => assert_eq!(r.id, MessageId(100)),
            other => panic!("{other:?}"),
        }
        assert!(matches!(d.lookup(7, 2), Lookup::New));
        assert!(
            matches!(d.lookup(8, 1), Lookup::New),
            "producers are separate"
        );
    }

    #[test]
    fn sequences_that_fell_out_of_the_window_are_refused_not_rewritten() {
        let mut d = Dedup::new(3, 10);
        for s in 1..=5 {
            d.record(1, s, done(s));
        }
        assert!(matches!(d.lookup(1, 5), Lookup::Duplicate(_)));
        assert!(matches!(d.lookup(1, 3), Lookup::Duplicate(_)));
        assert!(matches!(d.lookup(1, 2), Lookup::TooOld { floor: 3 }));
        assert!(matches!(d.lookup(1, 6), Lookup::New));
    }

    #[test]
    fn a_failed_append_is_forgotten_and_idle_producers_are_evicted_first() {
        let mut d = Dedup::new(8, 2);
        d.record(1, 1, done(1));
        d.forget(1, 1);
        assert!(matches!(d.lookup(1, 1), Lookup::New));
        d.record(1, 2, done(2));
        d.record(2, 1, done(3));
        let _ = d.lookup(1, 2); // producer 1 is now the most recently used
        d.record(3, 1, done(4));
        assert_eq!(d.producers(), 2);
        assert!(
            matches!(d.lookup(2, 1), Lookup::New),
            "producer 2 was evicted"
        );
        assert!(matches!(d.lookup(1, 2), Lookup::Duplicate(_)));
    }
}
