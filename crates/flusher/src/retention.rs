//! The retention floor: the WAL keeps the newest `time_ms` of messages and the newest `bytes`,
//! whatever was flushed. The flusher samples what it reads (an id, its tick and the bytes read
//! so far) and finds the floor from the samples, so no index of the log is needed.

use std::collections::VecDeque;

use walden_common::{MessageId, TimeTick};

use crate::config::RetentionConfig;

/// A sample every this many bytes or ms of ticks, whichever comes first.
const SAMPLE_BYTES: u64 = 1 << 20;
const SAMPLE_MS: u64 = 1_000;
/// Samples kept (the oldest are merged away beyond this).
const MAX_SAMPLES: usize = 8_192;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Sample {
    id: MessageId,
    physical_ms: u64,
    /// Bytes read before this id.
    bytes_before: u64,
}

/// Samples of what the flusher read, oldest first.
#[derive(Debug, Default)]
pub struct Samples {
    samples: VecDeque<Sample>,
    bytes: u64,
    /// One past the last id read, and the last tick read.
    end: Option<(MessageId, TimeTick)>,
}

impl Samples {
    /// Records that message `id` (with `tick`, `size` bytes) was read.
    pub fn read(&mut self, id: MessageId, tick: TimeTick, size: u64) {
        let ms = tick.physical_ms();
        let due = self.samples.back().is_none_or(|s| {
            self.bytes - s.bytes_before >= SAMPLE_BYTES || ms >= s.physical_ms + SAMPLE_MS
        });
        if due {
            if self.samples.len() >= MAX_SAMPLES {
                // Drop every other old sample: coarser, still a lower bound.
                let keep: VecDeque<Sample> = self
                    .samples
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| i % 2 == 0)
                    .map(|(_, s)| *s)
                    .collect();
                self.samples = keep;
            }
            self.samples.push_back(Sample {
                id,
                physical_ms: ms,
                bytes_before: self.bytes,
            });
        }
        self.bytes += size;
        self.end = Some((id.next(), tick));
    }

    /// The highest id below which every message read is older than `time_ms` and outside
    /// the newest `bytes`; `floor` when nothing read allows more.
    pub fn floor(&self, retention: RetentionConfig, now_ms: u64, floor: MessageId) -> MessageId {
        let cutoff = now_ms.saturating_sub(retention.time_ms);
        // Everything read is old and the byte floor is met: all of it may go.
        let mut best = floor;
        if let Some((end, tick)) = self.end
            && tick.physical_ms() < cutoff
            && retention.bytes == 0
        {
            return end.max(floor);
        }
        for s in &self.samples {
            // Messages below `s.id` have ticks at or below the previous sample's... and below
            // `s`'s own: they are older than the cutoff if `s` is.
            if s.physical_ms >= cutoff || self.bytes - s.bytes_before < retention.bytes {
                break;
            }
            best = best.max(s.id);
        }
        best
    }

    /// One past the last id read, and the last tick read.
    pub fn end(&self) -> Option<(MessageId, TimeTick)> {
        self.end
    }

    /// Forgets samples below `id` (truncated).
    pub fn forget_below(&mut self, id: MessageId) {
        while self.samples.len() > 1 && self.samples.get(1).is_some_and(|s| s.id <= id) {
            self.samples.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tick(ms: u64) -> TimeTick {
        TimeTick::compose(ms, 0)
    }

    #[test]
    fn the_floor_keeps_messages_younger_than_the_retention_time() {
        let mut s = Samples::default();
        for i in 0..100u64 {
            s.read(MessageId(i), tick(1_000_000 + i * 1_000), 10);
        }
        let r = RetentionConfig {
            time_ms: 10_000,
            bytes: 0,
        };
        // Now = the last message's time: messages 90.. are younger than 10 s.
        let f = s.floor(r, 1_000_000 + 99_000, MessageId(0));
        assert!(f <= MessageId(90) && f >= MessageId(85), "{f:?}");
        // Much later, everything is old.
        assert_eq!(s.floor(r, 9_000_000, MessageId(0)), MessageId(100));
        // Never below what is already truncated.
        assert_eq!(
            s.floor(r, 1_000_000, MessageId(7)),
            MessageId(7),
            "nothing old enough"
        );
    }

    #[test]
    fn the_floor_keeps_the_newest_bytes() {
        let mut s = Samples::default();
        for i in 0..100u64 {
            s.read(MessageId(i), tick(1_000 + i * 1_000), 1 << 20);
        }
        let r = RetentionConfig {
            time_ms: 0,
            bytes: 10 << 20,
        };
        let f = s.floor(r, 10_000_000, MessageId(0));
        assert_eq!(f, MessageId(90));
    }
}
