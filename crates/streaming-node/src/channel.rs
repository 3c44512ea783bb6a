//! One open pchannel: the append path, confirmation in tick order, and TimeTicks.
//!
//! The append lock covers three steps: allocate a tick, stamp and encode the header, and enqueue
//! the record into the WAL. The WAL assigns ids in enqueue order, so **id order is tick order**
//! within a pchannel, and a catching-up reader needs no reorder buffer. Appends complete in that
//! same order (the WAL acknowledges a group commit at once), and one completer task per channel
//! takes them in order: a message becomes *visible* (pushed to the write-ahead buffer) only when
//! it and every message with a lower tick are durable. Because completion does not depend on the
//! caller, a producer that goes away mid-append cannot stall the watermark.
//!
//! Every message is stamped with `last_confirmed_id` = the WAL's next id at allocation time:
//! every message with a greater tick is allocated later and so gets an id at or above it, so
//! reading from it sees every later tick (what consumers resume from).

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};
use walden_metastore_api::keys::pchannel_checkpoint as checkpoint_key;
use walden_tso::TickSource;

use bytes::Bytes;
use futures::future::BoxFuture;
use prost::Message as _;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};
use tracing::{debug, warn};
use walden_common::{HasErrorCode, MessageId, Term, TimeTick};
use walden_message::{ImmutableMessage, MessageHeader, MessageType, MutableMessage, codec};
use walden_metastore_api::MetaStore;
use walden_proto::v1::PChannelCheckpoint;
use walden_wal_api::{ReadFrom, Wal, WalError};

use crate::{
    NodeConfig, NodeError,
    dedup::{Dedup, Lookup, Seen},
    metrics::Metrics,
    shard::{self, Shards},
    txn::{self, Role, Txns},
    wab::WriteAheadBuffer,
};

mod checkpoint;
use checkpoint::checkpoints;

/// Where an appended message landed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AppendResult {
    pub id: MessageId,
    pub tick: TimeTick,
    pub last_confirmed: MessageId,
}

#[derive(Debug)]
struct Slot {
    header: MessageHeader,
    payload: Bytes,
    /// Released when the append completes: bounds bytes in flight (none for the node's own
    /// messages).
    _permit: Option<OwnedSemaphorePermit>,
    /// The WAL id: slots are dense in id order, so a slot is found by its id.
    id: u64,
    /// An idempotent producer's (id, sequence).
    producer: Option<(u64, u64)>,
    /// Where resends that arrived while this append was in flight wait for its outcome. Made
    /// only when one arrives (rare), not for every message.
    waiters: Option<watch::Sender<Option<AppendResult>>>,
}

#[derive(Debug)]
struct State {
    /// Recent sequences of idempotent producers.
    dedup: Dedup,
    /// Appends enqueued but not yet completed, in tick (= id) order.
    slots: VecDeque<Slot>,
    /// Set by the first storage failure: every later append fails until the channel reopens.
    failed: Option<String>,
    /// The failure was a fence: another writer owns the log now.
    fenced: bool,
    /// Real messages were appended since the last TimeTick.
    dirty: bool,
    closed: bool,
    /// The collection state (vchannels, partitions, segments) as of the last enqueued message.
    shards: Shards,
    /// Messages enqueued since the last checkpoint was taken.
    since_checkpoint: u64,
    /// Messages enqueued since the last checkpoint saved durably: what bounds the replay.
    since_durable: u64,
    /// Open transactions.
    txns: Txns,
}

/// What the completer takes, in tick order.
enum Completion {
    /// An append: its storage write, its caller, its place, when it was enqueued.
    Append(
        BoxFuture<'static, Result<MessageId, WalError>>,
        oneshot::Sender<Result<AppendResult, NodeError>>,
        AppendResult,
        Instant,
    ),
    /// An idle TimeTick (docs/design.md §8): not stored; once every append before it is
    /// visible, readers learn the pchannel is complete through it.
    IdleTick(TimeTick),
}

/// This pchannel's metric children.
#[derive(Debug)]
struct ChannelMetrics {
    appended_bytes: prometheus::IntCounter,
    /// Indexed like [`walden_message::ALL_TYPES`].
    appended_messages: Vec<prometheus::IntCounter>,
    append_latency: prometheus::Histogram,
}

impl ChannelMetrics {
    fn new(m: &Metrics, pchannel: &str) -> Self {
        Self {
            appended_bytes: m.appended_bytes.with_label_values(&[pchannel]),
            appended_messages: walden_message::ALL_TYPES
                .iter()
                .map(|t| {
                    m.appended_messages
                        .with_label_values(&[pchannel, walden_message::type_name(*t)])
                })
                .collect(),
            append_latency: m.append_latency.with_label_values(&[pchannel]),
        }
    }

    fn appended(&self, t: MessageType, bytes: usize) {
        if let Some(c) = walden_message::ALL_TYPES
            .iter()
            .position(|x| *x == t)
            .and_then(|i| self.appended_messages.get(i))
        {
            c.inc();
        }
        self.appended_bytes.inc_by(bytes as u64);
    }
}

/// Health of a channel, watched by the manager (to reopen) and by scanners (to stop).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Health {
    Serving,
    Failed(String),
    /// Another writer took the log over (its storage fenced this one): not to be reopened here.
    Fenced(String),
    Closed,
}

/// One open pchannel.
#[derive(Debug)]
pub struct Channel {
    name: String,
    term: Term,
    wal: Arc<dyn Wal>,
    tso: Arc<dyn TickSource>,
    meta: Arc<dyn MetaStore>,
    config: NodeConfig,
    metrics: Metrics,
    /// Metric children bound to this pchannel once, off the per-message path.
    counters: ChannelMetrics,
    state: Mutex<State>,
    inflight: Arc<Semaphore>,
    completions: mpsc::UnboundedSender<Completion>,
    health: watch::Sender<Health>,
    pub wab: WriteAheadBuffer,
    recovery: Mutex<Recovery>,
    /// Woken when enough messages were appended to call for a checkpoint.
    checkpoint_due: Arc<tokio::sync::Notify>,
    /// Closed because the node is shutting down (not for a reopen): callers get ON_SHUTDOWN
    /// and go to the pchannel's next owner.
    shutting_down: std::sync::atomic::AtomicBool,
    /// Set when the replay met damaged records: the collection state past them is unknown,
    /// so every write is refused (CORRUPTED) while intact records are still read.
    read_only: Mutex<Option<String>>,
    /// The `next_id` of the last checkpoint known durable: the WAL may be truncated up to
    /// here, never past it (a relaxed checkpoint lost in a crash would leave the replay's
    /// start truncated away: Milvus #47802).
    durable_checkpoint: std::sync::atomic::AtomicU64,
    /// What the flusher reports as its lag (status `flush_lag_ms`).
    flush_lag_ms: std::sync::atomic::AtomicU64,
}

/// What opening the channel took.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Recovery {
    /// From open to ready.
    pub took: Duration,
    /// Messages replayed into the collection state (those after the checkpoint).
    pub replayed: u64,
    /// Where the replay started (the checkpoint's `next_id`, or the log's start).
    pub from: MessageId,
    /// Messages of idempotent producers put back into their windows.
    pub producer_messages: u64,
}

/// An append that was enqueued (or recognised as a retry); await it for the result.
#[derive(Debug)]
pub struct PendingAppend {
    kind: Pending,
    pchannel: String,
}

#[derive(Debug)]
enum Pending {
    Fresh(oneshot::Receiver<Result<AppendResult, NodeError>>),
    /// A retry of a message still in flight: its original's outcome.
    Retry(watch::Receiver<Option<AppendResult>>),
    /// A retry of a message already durable.
    Done(AppendResult),
}

impl PendingAppend {
    pub async fn wait(self) -> Result<AppendResult, NodeError> {
        let closed = || NodeError::ChannelClosed(self.pchannel.clone());
        match self.kind {
            Pending::Fresh(rx) => rx.await.unwrap_or_else(|_| Err(closed())),
            Pending::Done(r) => Ok(r),
            // If the original fails, its sender is dropped: the retry fails as retryable, and
            // the next retry writes the message.
            Pending::Retry(mut rx) => match rx.wait_for(Option::is_some).await {
                Ok(r) => (*r).ok_or_else(closed),
                Err(_) => Err(closed()),
            },
        }
    }
}

impl Channel {
    /// Wraps an open WAL and starts its completer and TimeTick tasks. Call
    /// [`Channel::write_first_time_tick`] before serving.
    pub fn start(
        wal: Arc<dyn Wal>,
        tso: Arc<dyn TickSource>,
        meta: Arc<dyn MetaStore>,
        config: NodeConfig,
        metrics: Metrics,
    ) -> Arc<Self> {
        let (tx, rx) = mpsc::unbounded_channel();
        let wab = WriteAheadBuffer::new(
            wal.durable_end(),
            tso.last(),
            config.wab_capacity_bytes,
            Duration::from_millis(config.wab_keepalive_ms),
        );
        let channel = Arc::new(Self {
            counters: ChannelMetrics::new(&metrics, wal.pchannel()),
            name: wal.pchannel().to_owned(),
            term: wal.term(),
            inflight: Arc::new(Semaphore::new(config.max_inflight_bytes)),
            wal,
            tso,
            meta,
            state: Mutex::new(State {
                dedup: Dedup::new(config.dedup_window, config.dedup_max_producers),
                slots: VecDeque::new(),
                failed: None,
                fenced: false,
                dirty: false,
                closed: false,
                shards: Shards::new(shard::SealPolicy::from_config(&config)),
                since_checkpoint: 0,
                since_durable: 0,
                txns: Txns::new(config.txn_keepalive_ms, config.txn_max_bytes),
            }),
            config,
            metrics,
            completions: tx,
            health: watch::channel(Health::Serving).0,
            wab,
            recovery: Mutex::new(Recovery::default()),
            checkpoint_due: Arc::new(tokio::sync::Notify::new()),
            read_only: Mutex::new(None),
            durable_checkpoint: std::sync::atomic::AtomicU64::new(0),
            flush_lag_ms: std::sync::atomic::AtomicU64::new(0),
            shutting_down: std::sync::atomic::AtomicBool::new(false),
        });
        tokio::spawn(complete_in_order(Arc::downgrade(&channel), rx));
        tokio::spawn(time_ticks(Arc::downgrade(&channel)));
        channel
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn term(&self) -> Term {
        self.term
    }

    pub fn wal(&self) -> &Arc<dyn Wal> {
        &self.wal
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn health(&self) -> watch::Receiver<Health> {
        self.health.subscribe()
    }

    /// Waits until the channel behind `health` stops serving: `Some` with the failure
    /// ([`Health::Failed`] or [`Health::Fenced`]), `None` once it closed or is gone. Takes the
    /// receiver, not the channel, so the waiter does not keep the channel alive.
    pub async fn until_unhealthy(mut health: watch::Receiver<Health>) -> Option<Health> {
        loop {
            let state = health.borrow_and_update().clone();
            match state {
                Health::Serving => health.changed().await.ok()?,
                Health::Closed => return None,
                failed => return Some(failed),
            }
        }
    }

    /// The `next_id` of the last durable checkpoint: the highest point the WAL may be
    /// truncated to.
    pub fn durable_checkpoint_id(&self) -> MessageId {
        MessageId(
            self.durable_checkpoint
                .load(std::sync::atomic::Ordering::Acquire),
        )
    }

    /// The collections of this pchannel's vchannels, as of the last enqueued message.
    pub fn collections(&self) -> Vec<crate::shard::CollectionOf> {
        self.lock().shards.collections()
    }

    /// A tick no message of this pchannel has or will have: names that must be unique on the
    /// pchannel (a compacted segment's id, like a segment's, is a tick).
    pub async fn fresh_tick(&self) -> Result<TimeTick, NodeError> {
        loop {
            if let Ok(t) = self.tso.allocate() {
                return Ok(t);
            }
            self.tso.refill().await?;
        }
    }

    /// The tick of the last message readers can see: every write acknowledged so far has a
    /// tick at or below it (what a strong read must wait for when the WAL is local).
    pub fn last_tick(&self) -> TimeTick {
        self.wab.last_tick()
    }

    /// Set by the flusher; shown in status.
    pub fn set_flush_lag_ms(&self, ms: u64) {
        self.flush_lag_ms
            .store(ms, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn set_recovery_time(&self, d: Duration) {
        self.recovery.lock().unwrap_or_else(|e| e.into_inner()).took = d;
    }

    pub fn recovery(&self) -> Recovery {
        *self.recovery.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Rebuilds the collection state (the checkpoint from the metastore, then every message
    /// after it) and the idempotent producers' windows (from the same read, which goes back
    /// at least `node.dedup_rebuild_messages`: retries of anything written since the last
    /// checkpoint, or among the last messages, are recognised). Call before serving; it starts
    /// the checkpoint task.
    pub async fn recover_state(self: &Arc<Self>) -> Result<Recovery, NodeError> {
        let policy = shard::SealPolicy::from_config(&self.config);
        let keepalive = self.config.txn_keepalive_ms;
        let mut dedup = Dedup::new(self.config.dedup_window, self.config.dedup_max_producers);
        let (mut shards, mut txns, from) = match self.meta.get(&checkpoint_key(&self.name)).await? {
            Some(kv) => {
                let cp = PChannelCheckpoint::decode(kv.value.as_ref()).map_err(|e| {
                    NodeError::Internal(format!("checkpoint of {}: {e}", self.name))
                })?;
                for m in &cp.producers {
                    dedup.restore_mark(m.producer_id, m.last_seq);
                }
                (
                    Shards::from_checkpoint(&cp, policy)?,
                    Txns::from_proto(&cp.open_txns, keepalive, self.config.txn_max_bytes),
                    MessageId(cp.next_id),
                )
            }
            None => (
                Shards::new(policy),
                Txns::new(keepalive, self.config.txn_max_bytes),
                self.wal.first_id(),
            ),
        };
        if from < self.wal.first_id() {
            return Err(NodeError::Internal(format!(
                "{}: the checkpoint starts at {from}, below the log's start {}",
                self.name,
                self.wal.first_id()
            )));
        }
        let end = self.wal.durable_end();
        let tail = MessageId(
            end.0
                .saturating_sub(self.config.dedup_rebuild_messages)
                .max(self.wal.first_id().0),
        );
        let (mut replayed, mut producer_messages) = (0, 0);
        let start = from.min(tail);
        let mut last_tick = None;
        if start < end {
            let mut reader = self.wal.read(ReadFrom::At(start))?;
            while let Some((id, record)) = reader.next().await? {
                let m = codec::decode(id, record)?;
                last_tick = Some(m.time_tick());
                if let Some((producer, seq)) = m.producer() {
                    let done = AppendResult {
                        id,
                        tick: m.time_tick(),
                        last_confirmed: m.last_confirmed(),
                    };
                    dedup.record(producer, seq, Seen::Done(done));
                    producer_messages += 1;
                }
                if id >= from {
                    shards.apply(&m.header, &m.payload);
                    txns.apply(&m.header, id, m.payload.len());
                    replayed += 1;
                }
            }
        }
        if let Some(t) = last_tick {
            self.tso.observe(t).await?;
        }
        self.metrics
            .growing_bytes
            .add(shards.growing_bytes() as i64);
        {
            let mut st = self.lock();
            st.shards = shards;
            st.txns = txns;
            st.dedup = dedup;
            st.since_checkpoint = replayed;
            st.since_durable = replayed;
        }
        // What was loaded survived a restart (or a move): durable.
        self.durable_checkpoint
            .store(from.0, std::sync::atomic::Ordering::Release);
        let r = Recovery {
            took: Duration::ZERO,
            replayed,
            from,
            producer_messages,
        };
        *self.recovery.lock().unwrap_or_else(|e| e.into_inner()) = r;
        tokio::spawn(checkpoints(Arc::downgrade(self)));
        Ok(r)
    }

    /// Rolls back the transactions that were open when the pchannel last stopped: their
    /// producers are gone with the old incarnation. Call once, after recovery.
    pub async fn rollback_open_txns(&self) -> Result<usize, NodeError> {
        // Written directly, not submitted: admission would refuse them as expired.
        let mut rollbacks = self.lock().txns.all(txn::reason::RECOVERY).into_iter();
        let n = rollbacks.len();
        let mut pending = Vec::with_capacity(n);
        while rollbacks.len() > 0 {
            {
                let mut st = self.lock();
                while let Some(m) = rollbacks.as_slice().first().cloned() {
                    let Ok(tick) = self.tso.allocate() else { break };
                    rollbacks.next();
                    pending.push(self.enqueue(&mut st, tick, m, None)?);
                }
            }
            if rollbacks.len() > 0 {
                self.tso.refill().await?;
            }
        }
        for p in pending {
            p.wait().await?;
        }
        Ok(n)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The fence of this incarnation: a TimeTick above every tick any earlier writer could have
    /// used, and the first message of this term.
    pub async fn write_first_time_tick(&self) -> Result<AppendResult, NodeError> {
        self.submit(MutableMessage::time_tick()).await?.wait().await
    }

    /// Enqueues `msg` and returns a handle to await its result. The enqueue happens before this
    /// returns, so calls on one task are appended in call order. Collection messages are
    /// checked against the pchannel's collection state first (see [`crate::shard`]); the node
    /// may write its own messages (CreateSegment, Flush) around them.
    pub async fn submit(&self, mut msg: MutableMessage) -> Result<PendingAppend, NodeError> {
        if let Some(why) = self.read_only() {
            return Err(NodeError::Wal(WalError::Corrupted {
                pchannel: self.name.clone(),
                location: "the replay at open".into(),
                detail: format!("{why}; writes are refused until the damage is skipped"),
            }));
        }
        // A full disk refuses writes before they get a place (nothing changes, no reopen);
        // the node's own TimeTicks and rollbacks still go (they fit in the space kept back).
        if !matches!(
            msg.message_type,
            MessageType::TimeTick | MessageType::RollbackTxn
        ) {
            self.wal.writable()?;
        }
        let size = msg.approximate_size();
        if size > self.config.max_message_bytes {
            return Err(NodeError::MessageTooLarge {
                size,
                limit: self.config.max_message_bytes,
            });
        }
        // Decoding an Arrow payload is too slow for the append lock: check it against the
        // schema first; admission re-checks that the collection is still the same.
        let checked = if shard::needs_payload_check(msg.message_type) {
            let (collection_id, schema) = self.lock().shards.schema(&msg.vchannel)?;
            Some(shard::check_payload(&msg, collection_id, &schema)?)
        } else {
            None
        };
        let permits = u32::try_from(size.max(1)).unwrap_or(u32::MAX);
        let mut permit = Some(
            self.inflight
                .clone()
                .acquire_many_owned(permits)
                .await
                .map_err(|_| self.closed_error())?,
        );
        loop {
            if let Some(done) = self.try_submit(&mut msg, checked.as_ref(), &mut permit)? {
                return Ok(done);
            }
            // The oracle's window ran out: persist a new one, then retry.
            self.tso.refill().await?;
        }
    }

    /// One attempt at [`Channel::submit`] under the lock; `None` if the oracle ran out of ticks.
    fn try_submit(
        &self,
        msg: &mut MutableMessage,
        checked: Option<&shard::Checked>,
        permit: &mut Option<OwnedSemaphorePermit>,
    ) -> Result<Option<PendingAppend>, NodeError> {
        let mut st = self.lock();
        if st.closed {
            return Err(self.closed_error());
        }
        if let Some(why) = &st.failed {
            if st.fenced {
                return Err(NodeError::Fenced {
                    pchannel: self.name.clone(),
                    why: why.clone(),
                });
            }
            return Err(NodeError::ChannelClosed(format!("{}: {why}", self.name)));
        }
        // A retry is answered before admission: its original was admitted, whatever
        // happened to the collection since.
        if let Some((producer, seq)) = msg.producer {
            let pchannel = self.name.clone();
            match st.dedup.lookup(producer, seq) {
                Lookup::New => {}
                Lookup::Duplicate(seen) => {
                    self.metrics.duplicates.inc();
                    let kind = match seen {
                        Seen::Done(r) => Pending::Done(r),
                        Seen::InFlight(id) => {
                            // Slots are dense in id order; a search covers an append the WAL
                            // refused at once (its id was not used). None left: the channel is
                            // failing, and a retry goes to its next incarnation.
                            let front = st.slots.front().map_or(u64::MAX, |s| s.id);
                            let at = id
                                .checked_sub(front)
                                .map(|i| i as usize)
                                .filter(|&i| st.slots.get(i).is_some_and(|s| s.id == id))
                                .or_else(|| st.slots.iter().position(|s| s.id == id));
                            let Some(slot) = at.and_then(|i| st.slots.get_mut(i)) else {
                                return Err(NodeError::ChannelClosed(self.name.clone()));
                            };
                            let tx = slot.waiters.get_or_insert_with(|| watch::channel(None).0);
                            Pending::Retry(tx.subscribe())
                        }
                    };
                    return Ok(Some(PendingAppend { kind, pchannel }));
                }
                Lookup::TooOld { floor } => {
                    return Err(NodeError::InvalidArgument(format!(
                        "producer {producer:#x}: sequence {seq} is older than the \
                         remembered window (from {floor}); it may have been written"
                    )));
                }
            }
        }
        let role = st
            .txns
            .admit(msg, || TimeTick::compose(walden_tso::now_ms(), 0))?;
        let mut pre = st.shards.admit(msg, checked)?;
        if role == Role::None && txn::is_exclusive(msg.message_type) {
            // Bodies of open transactions would land after the exclusive message: end them.
            let mut rollbacks = st.txns.on_vchannel(&msg.vchannel);
            rollbacks.append(&mut pre);
            pre = rollbacks;
        }
        for pre in pre {
            let Ok(tick) = self.tso.allocate() else {
                return Ok(None);
            };
            self.enqueue(&mut st, tick, pre, None)?;
        }
        st.shards.assign(msg);
        let Ok(tick) = self.tso.allocate() else {
            return Ok(None);
        };
        let segment = msg.coll.segment_id;
        let msg = std::mem::replace(msg, MutableMessage::time_tick());
        let pending = self.enqueue(&mut st, tick, msg, permit.take())?;
        // A segment this insert filled is sealed at once (unless an open transaction uses it);
        // if the oracle ran out here, the TimeTick task's seal check writes the Flush instead.
        if segment != 0
            && let Some(flush) = st.shards.full_seal(segment)
            && !st.txns.segments_in_use().contains(&segment)
            && let Ok(tick) = self.tso.allocate()
        {
            self.enqueue(&mut st, tick, flush, None)?;
        }
        Ok(Some(pending))
    }

    /// Gives `msg` a tick, stamps and encodes it, enqueues it into the WAL and folds it into
    /// the collection state. Called under the append lock.
    fn enqueue(
        &self,
        st: &mut State,
        tick: TimeTick,
        mut msg: MutableMessage,
        permit: Option<OwnedSemaphorePermit>,
    ) -> Result<PendingAppend, NodeError> {
        if msg.message_type == MessageType::CreateSegment && msg.coll.segment_id == 0 {
            // A segment is named by the tick that created it: unique, with no allocator.
            msg.coll.segment_id = tick.0;
        }
        if msg.message_type == MessageType::BeginTxn
            && let Some(ctx) = msg.txn.as_mut()
        {
            // So is a transaction.
            ctx.txn_id = tick.0;
        }
        // The WAL gives ids in enqueue order, and we hold the append lock.
        let id = self.wal.next_id();
        let last_confirmed = st.txns.min_begin().map_or(id, |b| b.min(id));
        st.dirty = msg.message_type != MessageType::TimeTick;
        let producer = msg.producer;
        let (header, payload) = msg.into_header(tick, self.term, last_confirmed);
        let mut buf =
            Vec::with_capacity(codec::PREFIX_LEN + payload.len() + 64 + header.vchannel.len());
        codec::encode_into(&header, &payload, &mut buf);
        let fut = self.wal.append(Bytes::from(buf));
        if let Some((p, seq)) = producer {
            st.dedup.record(p, seq, Seen::InFlight(id.0));
        }
        let before = st.shards.growing_bytes();
        st.shards.apply(&header, &payload);
        st.txns.apply(&header, id, payload.len());
        let after = st.shards.growing_bytes();
        if after != before {
            self.metrics.growing_bytes.add(after as i64 - before as i64);
        }
        st.since_checkpoint += 1;
        st.since_durable += 1;
        if st.since_durable == self.config.checkpoint_max_dirty_messages {
            self.checkpoint_due.notify_one();
        }
        st.slots.push_back(Slot {
            header,
            payload,
            _permit: permit,
            id: id.0,
            producer,
            waiters: None,
        });
        let (tx, rx) = oneshot::channel();
        let placed = AppendResult {
            id: MessageId(0),
            tick,
            last_confirmed,
        };
        // Sent under the lock so completions queue in tick order.
        if self
            .completions
            .send(Completion::Append(fut, tx, placed, Instant::now()))
            .is_err()
        {
            st.slots.pop_back();
            return Err(NodeError::ChannelClosed(self.name.clone()));
        }
        Ok(PendingAppend {
            kind: Pending::Fresh(rx),
            pchannel: self.name.clone(),
        })
    }

    /// Writes what time calls for: RollbackTxn for expired transactions, and the Flush messages
    /// the seal policies ask for (full, idle, lifetime, node memory).
    pub fn seal_due(&self) -> Result<usize, NodeError> {
        let now = TimeTick::compose(walden_tso::now_ms(), 0);
        let node_bytes = u64::try_from(self.metrics.growing_bytes.get()).unwrap_or(0);
        let memory = (
            self.config.growing_memory_high_bytes,
            self.config.growing_memory_low_bytes,
        );
        let mut st = self.lock();
        if st.closed || st.failed.is_some() {
            return Ok(0);
        }
        let busy = st.txns.segments_in_use();
        let mut due = st.txns.expired(now);
        due.extend(st.shards.due_seals(now, node_bytes, memory, &busy));
        let mut written = 0;
        for flush in due {
            let Ok(tick) = self.tso.allocate() else { break };
            self.enqueue(&mut st, tick, flush, None)?;
            written += 1;
        }
        Ok(written)
    }

    /// Takes a tick under the append lock and queues it behind every append enqueued before
    /// it, without writing anything: once those are visible, readers learn that the pchannel
    /// is complete through it, so an idle shard's served tick keeps up with the clock. Costs
    /// one oracle tick (no storage write, no PUT on the object WAL). Does nothing on a channel
    /// that is not serving writes.
    pub async fn idle_tick(&self) -> Result<(), NodeError> {
        if self.read_only().is_some() {
            return Ok(());
        }
        loop {
            {
                let st = self.lock();
                if st.closed || st.failed.is_some() {
                    return Ok(());
                }
                if let Ok(tick) = self.tso.allocate() {
                    // Sent under the lock: every later append gets a greater tick and queues
                    // behind it.
                    let _ = self.completions.send(Completion::IdleTick(tick));
                    return Ok(());
                }
            }
            self.tso.refill().await?;
        }
    }

    /// Convenience: submit and wait.
    pub async fn append(&self, msg: MutableMessage) -> Result<AppendResult, NodeError> {
        self.submit(msg).await?.wait().await
    }

    /// Marks the front slot completed and makes it visible if it succeeded.
    fn complete(
        &self,
        result: &Result<MessageId, WalError>,
        placed: AppendResult,
        written: Instant,
    ) {
        let slot = {
            let mut st = self.lock();
            let mut slot = st.slots.pop_front();
            let waiters = slot.as_mut().and_then(|s| s.waiters.take());
            if let Some((producer, seq)) = slot.as_mut().and_then(|s| s.producer.take()) {
                match result {
                    Ok(id) => {
                        let done = AppendResult { id: *id, ..placed };
                        st.dedup.record(producer, seq, Seen::Done(done));
                        if let Some(tx) = waiters {
                            tx.send_replace(Some(done));
                        }
                    }
                    // Dropping the waiters' sender fails the waiting retries; forgetting lets
                    // the next write.
                    Err(_) => st.dedup.forget(producer, seq),
                }
            }
            if let Err(e) = result
                && st.failed.is_none()
            {
                st.failed = Some(e.to_string());
                if e.code() == walden_common::ErrorCode::ChannelFenced {
                    st.fenced = true;
                    drop(st);
                    warn!(pchannel = %self.name, error = %e, "another writer took the pchannel over");
                    self.health.send_replace(Health::Fenced(e.to_string()));
                } else {
                    drop(st);
                    warn!(pchannel = %self.name, error = %e, "append failed; the channel must reopen");
                    self.health.send_replace(Health::Failed(e.to_string()));
                }
            }
            slot
        };
        let Some(slot) = slot else { return };
        match result {
            Ok(id) => {
                let msg = ImmutableMessage {
                    id: *id,
                    header: slot.header,
                    payload: slot.payload,
                };
                self.counters
                    .appended(msg.message_type(), msg.payload.len());
                self.wab.push([msg]);
                let visible = Instant::now();
                self.metrics
                    .ack_latency
                    .observe(visible.duration_since(written).as_secs_f64());
                debug!(pchannel = %self.name, id = %id, tick = %placed.tick, "visible");
            }
            Err(e) => {
                let code = e.code().name();
                self.metrics
                    .append_errors
                    .with_label_values(&[self.name.as_str(), code])
                    .inc();
            }
        }
    }

    /// Stops accepting appends, waits for what is queued, and closes the WAL.
    pub async fn close(&self) {
        let first_close = !std::mem::replace(&mut self.lock().closed, true);
        // A last checkpoint makes the next open quick; losing it only costs replay.
        let dirty = {
            let st = self.lock();
            st.since_checkpoint > 0 || st.since_durable > 0
        };
        if dirty {
            match tokio::time::timeout(Duration::from_secs(2), self.checkpoint()).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => debug!(pchannel = %self.name, error = %e, "no checkpoint at close"),
                Err(_) => debug!(pchannel = %self.name, "checkpoint at close timed out"),
            }
        }
        if let Err(e) = self.wal.close().await {
            warn!(pchannel = %self.name, error = %e, "closing the WAL");
        }
        self.inflight.close();
        self.health.send_replace(Health::Closed);
        if first_close {
            // The node-wide gauge the memory seal policy reads: the incarnation that reopens
            // this pchannel adds its segments back.
            let bytes = self.lock().shards.growing_bytes();
            self.metrics.growing_bytes.sub(bytes as i64);
        }
    }

    /// What a caller of a closed channel gets: ON_SHUTDOWN when the node is stopping, else
    /// the retryable error of a channel being reopened.
    pub fn closed_error(&self) -> NodeError {
        if self.shutting_down.load(std::sync::atomic::Ordering::SeqCst) {
            NodeError::ShuttingDown
        } else {
            NodeError::ChannelClosed(self.name.clone())
        }
    }

    /// Closes the channel because the node stops.
    pub async fn close_on_shutdown(&self) {
        self.shutting_down
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.close().await;
    }

    /// Serves reads only: the replay at open met damage (`why`).
    pub fn set_read_only(&self, why: String) {
        *self.read_only.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
    }

    pub fn read_only(&self) -> Option<String> {
        self.read_only
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The `state` word of the status and why: `serving`, `read_only` (writes refused: the
    /// storage is full), `corrupted` (damaged records; intact ones are served), `failed`
    /// (reopening) or `closed`.
    pub fn state(&self) -> (&'static str, String) {
        match &*self.health.borrow() {
            Health::Serving => {}
            Health::Failed(why) => return ("failed", why.clone()),
            Health::Fenced(why) => return ("fenced", why.clone()),
            Health::Closed => return ("closed", String::new()),
        }
        let damaged = self.wal.damaged();
        let read_only = self.read_only();
        if !damaged.is_empty() || read_only.is_some() {
            let ranges: Vec<String> = damaged
                .iter()
                .map(|r| format!("{}..{}", r.start, r.end))
                .collect();
            let mut why = if ranges.is_empty() {
                String::from("damaged records met by the replay")
            } else {
                format!("damaged records at ids {}", ranges.join(", "))
            };
            if let Some(r) = read_only {
                why.push_str(&format!("; writes refused: {r}"));
            }
            return ("corrupted", why);
        }
        if let Err(e) = self.wal.writable() {
            return ("read_only", e.to_string());
        }
        ("serving", String::new())
    }

    /// Status for the status call.
    pub fn status(&self) -> walden_proto::v1::PChannelStatus {
        let recovery = self.recovery();
        let (wab_bytes, wab_msgs) = self.wab.usage();
        self.metrics
            .wab_bytes
            .with_label_values(&[self.name.as_str()])
            .set(wab_bytes as i64);
        self.metrics
            .wab_messages
            .with_label_values(&[self.name.as_str()])
            .set(wab_msgs as i64);
        self.metrics
            .wal_syncs
            .with_label_values(&[self.name.as_str()])
            .set(self.wal.sync_count() as i64);
        walden_proto::v1::PChannelStatus {
            name: self.name.clone(),
            term: self.term.0,
            last_time_tick: self.wab.last_tick().0,
            last_message_id: self.wab.end().0.saturating_sub(1),
            wal_bytes: self.wal.size_bytes(),
            write_ahead_buffer_bytes: wab_bytes as u64,
            write_ahead_buffer_messages: wab_msgs as u64,
            recovery_ms: recovery.took.as_millis() as u64,
            replayed_messages: recovery.replayed,
            checkpoint_next_id: recovery.from.0,
            state: self.state().0.to_owned(),
            state_detail: self.state().1,
            // The manager, which knows the storage, fills it in.
            wal_storage: String::new(),
            truncation_point: self.wal.first_id().0,
            flush_lag_ms: self.flush_lag_ms.load(std::sync::atomic::Ordering::Relaxed),
            durable_checkpoint_id: self.durable_checkpoint_id().0,
        }
    }
}

/// Takes completions in enqueue (= tick) order, so visibility follows tick order.
async fn complete_in_order(
    channel: std::sync::Weak<Channel>,
    mut rx: mpsc::UnboundedReceiver<Completion>,
) {
    while let Some(c) = rx.recv().await {
        let (fut, reply, mut placed, started) = match c {
            Completion::Append(fut, reply, placed, started) => (fut, reply, placed, started),
            Completion::IdleTick(t) => {
                let Some(ch) = channel.upgrade() else { return };
                // After a failed append nothing later is visible: claim nothing past it.
                if ch.lock().failed.is_none() {
                    ch.wab.advance(t);
                }
                continue;
            }
        };
        let result = fut.await;
        let written = Instant::now();
        let Some(ch) = channel.upgrade() else { return };
        ch.complete(&result, placed, written);
        ch.counters
            .append_latency
            .observe(written.duration_since(started).as_secs_f64());
        let reply_value = match result {
            Ok(id) => {
                placed.id = id;
                Ok(placed)
            }
            Err(e) => Err(NodeError::Wal(e)),
        };
        let _ = reply.send(reply_value);
    }
}

/// Every interval: a stored TimeTick when real messages were appended since the last one,
/// else an idle TimeTick that only readers see (docs/design.md §8).
async fn time_ticks(channel: std::sync::Weak<Channel>) {
    let interval = match channel.upgrade() {
        Some(c) => c.config.time_tick_interval(),
        None => return,
    };
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(ch) = channel.upgrade() else { return };
        let (dirty, done) = {
            let st = ch.lock();
            (st.dirty, st.closed || st.failed.is_some())
        };
        if done {
            return;
        }
        if let Err(e) = ch.seal_due() {
            debug!(pchannel = %ch.name, error = %e, "seal check failed");
        }
        if !dirty {
            if let Err(e) = ch.idle_tick().await {
                debug!(pchannel = %ch.name, error = %e, "idle time tick not taken");
            }
        } else if let Err(e) = ch.append(MutableMessage::time_tick()).await {
            debug!(pchannel = %ch.name, error = %e, "time tick not written");
        }
    }
}
