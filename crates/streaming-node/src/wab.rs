//! The write-ahead buffer: the confirmed tail of one pchannel, in memory, for tailing readers.
//!
//! Entries are appended in id order (which is tick order) as they become visible. The buffer
//! holds every confirmed message with id `>= floor_id`; eviction (by bytes and by age) raises
//! the floor but never drops the newest entry, so a reader catching up from storage can always
//! meet the buffer. Readers wait on a watch of the buffer's [`Mark`]: the next id to be
//! confirmed and the tick the pchannel is complete through, which idle TimeTicks (not stored,
//! docs/design.md §8) raise without a message.

use std::{
    collections::VecDeque,
    sync::{Mutex, MutexGuard},
    time::{Duration, Instant},
};

use tokio::sync::watch;
use walden_common::{MessageId, TimeTick};
use walden_message::ImmutableMessage;

#[derive(Debug)]
struct Entry {
    msg: ImmutableMessage,
    size: usize,
    added: Instant,
}

#[derive(Debug)]
struct State {
    entries: VecDeque<Entry>,
    bytes: usize,
    /// Every confirmed message with an id at or above this is in `entries`.
    floor_id: MessageId,
}

/// How far a pchannel is confirmed: every message with a tick at or below `tick` has an id
/// below `end` and is confirmed. Both move together, so a reader at `end` knows it has seen
/// everything through `tick`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mark {
    /// One past the id of the newest confirmed message.
    pub end: MessageId,
    /// The tick of the newest confirmed message, or a later idle TimeTick.
    pub tick: TimeTick,
}

/// Positions a reader asked for that the buffer no longer holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Evicted {
    pub floor: MessageId,
}

/// The write-ahead buffer of one pchannel.
#[derive(Debug)]
pub struct WriteAheadBuffer {
    state: Mutex<State>,
    capacity_bytes: usize,
    keepalive: Duration,
    /// What is confirmed; readers wait on it.
    mark: watch::Sender<Mark>,
}

impl WriteAheadBuffer {
    /// An empty buffer; `floor` is the first id that will be pushed (the WAL's end when the
    /// channel opened), `last_tick` the newest tick before it.
    pub fn new(
        floor: MessageId,
        last_tick: TimeTick,
        capacity_bytes: usize,
        keepalive: Duration,
    ) -> Self {
        Self {
            state: Mutex::new(State {
                entries: VecDeque::new(),
                bytes: 0,
                floor_id: floor,
            }),
            capacity_bytes,
            keepalive,
            mark: watch::channel(Mark {
                end: floor,
                tick: last_tick,
            })
            .0,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends newly confirmed messages (ascending ids), evicting what is over the limits.
    pub fn push(&self, msgs: impl IntoIterator<Item = ImmutableMessage>) {
        let now = Instant::now();
        let mut s = self.lock();
        let mut last = None;
        for msg in msgs {
            let size = msg.payload.len() + msg.header.vchannel.len() + 64;
            s.bytes += size;
            last = Some(Mark {
                end: msg.id.next(),
                tick: msg.time_tick(),
            });
            s.entries.push_back(Entry {
                msg,
                size,
                added: now,
            });
        }
        while s.entries.len() > 1 {
            let Some(front) = s.entries.front() else {
                break;
            };
            let over = s.bytes > self.capacity_bytes;
            let old = now.duration_since(front.added) > self.keepalive;
            if !(over || old) {
                break;
            }
            let size = front.size;
            let next_floor = s.entries.get(1).map_or(s.floor_id, |e| e.msg.id);
            s.entries.pop_front();
            s.bytes -= size;
            s.floor_id = next_floor;
        }
        drop(s);
        if let Some(mark) = last {
            // Pushes and idle ticks come from one task (the completer), in tick order.
            self.mark.send_modify(|m| {
                m.end = mark.end;
                m.tick = m.tick.max(mark.tick);
            });
        }
    }

    /// Records that the pchannel is complete through `tick` although no message carries it
    /// (an idle TimeTick: every message with a lower tick is confirmed, every later one will
    /// have a greater tick). Wakes tailing readers.
    pub fn advance(&self, tick: TimeTick) {
        self.mark.send_if_modified(|m| {
            let newer = tick > m.tick;
            if newer {
                m.tick = tick;
            }
            newer
        });
    }

    /// Up to `max` messages with id `>= from`, or [`Evicted`] if some of them were dropped.
    pub fn read_from(
        &self,
        from: MessageId,
        max: usize,
        out: &mut Vec<ImmutableMessage>,
    ) -> Result<(), Evicted> {
        let s = self.lock();
        if from < s.floor_id {
            return Err(Evicted { floor: s.floor_id });
        }
        let start = s.entries.partition_point(|e| e.msg.id < from);
        out.extend(s.entries.range(start..).take(max).map(|e| e.msg.clone()));
        Ok(())
    }

    /// The lowest id a reader can start from.
    pub fn floor(&self) -> MessageId {
        self.lock().floor_id
    }

    /// The tick of the oldest message held, if any.
    pub fn first_tick(&self) -> Option<TimeTick> {
        self.lock().entries.front().map(|e| e.msg.time_tick())
    }

    /// The last-confirmed id of the oldest message held: reading from it sees whole every
    /// transaction that commits after that message.
    pub fn first_last_confirmed(&self) -> Option<MessageId> {
        self.lock().entries.front().map(|e| e.msg.last_confirmed())
    }

    /// The tick the pchannel is confirmed through: the newest confirmed message's, or a later
    /// idle TimeTick's.
    pub fn last_tick(&self) -> TimeTick {
        self.mark.borrow().tick
    }

    /// One past the newest confirmed id.
    pub fn end(&self) -> MessageId {
        self.mark.borrow().end
    }

    /// The end and the tick, read together.
    pub fn mark(&self) -> Mark {
        *self.mark.borrow()
    }

    /// A receiver that changes whenever messages are confirmed or an idle tick advances.
    pub fn subscribe(&self) -> watch::Receiver<Mark> {
        self.mark.subscribe()
    }

    /// (bytes, messages) held.
    pub fn usage(&self) -> (usize, usize) {
        let s = self.lock();
        (s.bytes, s.entries.len())
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use walden_message::{MessageType, MutableMessage};

    use super::*;

    fn msg(id: u64) -> ImmutableMessage {
        let m = MutableMessage::new(MessageType::Data, "v", Bytes::from(vec![0u8; 100]));
        ImmutableMessage {
            id: MessageId(id),
            header: m.header(TimeTick(id * 10), walden_common::Term(1), MessageId(id)),
            payload: m.payload,
        }
    }

    #[test]
    fn eviction_by_bytes_raises_the_floor_but_keeps_the_newest_entry() {
        let wab = WriteAheadBuffer::new(MessageId(5), TimeTick(0), 500, Duration::from_secs(60));
        wab.push((5..20).map(msg));
        let floor = wab.floor();
        assert!(floor > MessageId(5), "something was evicted");
        let (bytes, n) = wab.usage();
        assert!(bytes <= 500 && n >= 1);
        let mut out = Vec::new();
        assert_eq!(
            wab.read_from(MessageId(5), 100, &mut out),
            Err(Evicted { floor })
        );
        wab.read_from(floor, 100, &mut out).unwrap();
        assert_eq!(out.first().map(|m| m.id), Some(floor));
        assert_eq!(out.last().map(|m| m.id), Some(MessageId(19)));
        assert_eq!(wab.end(), MessageId(20));
        assert_eq!(wab.last_tick(), TimeTick(190));

        let tiny = WriteAheadBuffer::new(MessageId(0), TimeTick(0), 1, Duration::from_secs(60));
        tiny.push([msg(0)]);
        assert_eq!(tiny.usage().1, 1, "the newest entry is never evicted");
    }

    #[test]
    fn an_idle_tick_raises_the_mark_without_a_message_and_never_lowers_it() {
        let wab =
            WriteAheadBuffer::new(MessageId(0), TimeTick(0), 1 << 20, Duration::from_secs(60));
        let mut rx = wab.subscribe();
        wab.push([msg(0), msg(1)]);
        assert!(rx.has_changed().unwrap());
        rx.borrow_and_update();
        wab.advance(TimeTick(500));
        assert!(rx.has_changed().unwrap(), "readers are woken");
        assert_eq!(
            wab.mark(),
            Mark {
                end: MessageId(2),
                tick: TimeTick(500)
            }
        );
        rx.borrow_and_update();
        wab.advance(TimeTick(400));
        assert!(!rx.has_changed().unwrap(), "an older tick changes nothing");
        wab.push([msg(2)]);
        assert_eq!(wab.mark().end, MessageId(3));
        assert_eq!(wab.usage().1, 3);
    }

    #[test]
    fn eviction_by_age_drops_old_entries() {
        let wab = WriteAheadBuffer::new(MessageId(0), TimeTick(0), 1 << 20, Duration::ZERO);
        wab.push((0..3).map(msg));
        std::thread::sleep(Duration::from_millis(5));
        wab.push([msg(3)]);
        assert_eq!(wab.floor(), MessageId(3));
        assert_eq!(wab.usage().1, 1);
    }

    #[test]
    fn reads_start_at_the_first_id_not_below_the_cursor() {
        let wab =
            WriteAheadBuffer::new(MessageId(0), TimeTick(0), 1 << 20, Duration::from_secs(60));
        wab.push([msg(0), msg(1), msg(3), msg(4)]);
        let mut out = Vec::new();
        wab.read_from(MessageId(2), 1, &mut out).unwrap();
        assert_eq!(out.iter().map(|m| m.id.0).collect::<Vec<_>>(), [3]);
    }
}
