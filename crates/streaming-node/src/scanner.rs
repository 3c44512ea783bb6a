//! Delivers one pchannel's messages to a consumer, in tick order.
//!
//! A scan reads storage until it reaches the write-ahead buffer's floor, then tails the buffer;
//! if the buffer evicts past the scan's position (a slow consumer), it falls back to storage.
//! Because ids follow ticks within a pchannel, both sources are already in tick order and the
//! switch points are plain ids.

use std::{collections::HashMap, future::Future, sync::Arc};

use prost::Message as _;
use walden_proto::v1::TxnBody;

use tokio::sync::mpsc;
use tracing::debug;
use walden_common::{MessageId, TimeTick};
use walden_message::{Delivery, ImmutableMessage, MessageType, codec};
use walden_wal_api::ReadFrom;

use crate::{NodeError, channel::Channel, channel::Health};

/// Where delivery starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeliverPolicy {
    All,
    Latest,
    StartFrom(MessageId),
    StartAfter(MessageId),
}

/// Which messages are delivered; all conditions must hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filters {
    pub tick_gt: Option<TimeTick>,
    pub tick_gte: Option<TimeTick>,
    pub types: Option<Vec<MessageType>>,
    /// Messages of other vchannels are dropped; pchannel-level messages (empty vchannel) pass.
    pub vchannel: Option<String>,
}

impl Filters {
    pub fn admits(&self, m: &ImmutableMessage) -> bool {
        let t = m.time_tick();
        self.tick_gt.is_none_or(|g| t > g)
            && self.tick_gte.is_none_or(|g| t >= g)
            && self
                .types
                .as_ref()
                .is_none_or(|ts| ts.contains(&m.message_type()))
            && self
                .vchannel
                .as_ref()
                .is_none_or(|v| m.vchannel().is_empty() || m.vchannel() == v)
    }

    /// The highest tick that no delivered message can have, if a tick filter sets one.
    fn tick_floor(&self) -> Option<TimeTick> {
        let gt = self.tick_gt;
        let gte = self.tick_gte.map(|t| TimeTick(t.0.saturating_sub(1)));
        gt.max(gte)
    }
}

/// Holds transaction bodies until their commit, then yields the whole transaction as one
/// `Txn` message at the commit's tick and id. Rolled back transactions are dropped, and so are
/// bodies whose `BeginTxn` the scan did not see (it started in the middle of them).
///
/// What it holds is bounded by what producers put in open transactions; the write side expires
/// idle ones (`node.txn_keepalive_ms`).
#[derive(Debug, Default)]
pub struct TxnAssembler {
    open: HashMap<u64, Vec<ImmutableMessage>>,
}

impl TxnAssembler {
    /// Feeds one stored message; returns what to deliver, if anything.
    pub fn push(&mut self, m: ImmutableMessage) -> Option<ImmutableMessage> {
        let Some(ctx) = m.header.txn else {
            return Some(m);
        };
        match m.message_type() {
            MessageType::BeginTxn => {
                self.open.insert(ctx.txn_id, vec![m]);
                None
            }
            MessageType::RollbackTxn => {
                self.open.remove(&ctx.txn_id);
                None
            }
            MessageType::CommitTxn => {
                let mut body = self.open.remove(&ctx.txn_id)?;
                let mut header = m.header.clone();
                header.message_type = MessageType::Txn as i32;
                let id = m.id;
                body.push(m);
                let payload = TxnBody {
                    messages: body.into_iter().map(ImmutableMessage::into_proto).collect(),
                }
                .encode_to_vec();
                Some(ImmutableMessage {
                    id,
                    header,
                    payload: payload.into(),
                })
            }
            _ => {
                if let Some(body) = self.open.get_mut(&ctx.txn_id) {
                    body.push(m);
                }
                None
            }
        }
    }
}

/// Messages a tail read takes at once.
const TAIL_BATCH: usize = 256;

enum Pos {
    Storage(MessageId),
    Tail(MessageId),
}

/// Where a scan delivers. The gRPC service builds its frames here, in the scan's own task (a
/// task between the two cost a wake-up per delivery and a channel send per message).
pub trait Sink: Send {
    /// Takes the next message; false once the consumer is gone.
    fn push(&mut self, msg: ImmutableMessage) -> impl Future<Output = bool> + Send;
    /// Sends on what is held: the scan calls this before it waits and after each batch from
    /// the buffer. False once the consumer is gone.
    fn flush(&mut self) -> impl Future<Output = bool> + Send;
    /// Reports the error that ends the scan, after what is held.
    fn fail(&mut self, e: NodeError) -> impl Future<Output = ()> + Send;
    /// Sends on what is held, then tells the reader that every message with a tick at or below
    /// `tick` was delivered (an idle TimeTick, [`Delivery::CompleteThrough`]). False once the
    /// consumer is gone.
    fn complete_through(&mut self, tick: TimeTick) -> impl Future<Output = bool> + Send;
}

/// Frames of up to [`Frames::MAX`] messages over a channel: for readers inside the node (the
/// flusher, the delegator) that handle messages in batches.
#[derive(Debug)]
pub struct Frames {
    tx: mpsc::Sender<Result<Delivery, NodeError>>,
    buf: Vec<ImmutableMessage>,
}

impl Frames {
    pub const MAX: usize = 512;

    /// A sink and the receiver of its frames (`depth` frames in flight).
    pub fn channel(depth: usize) -> (Self, mpsc::Receiver<Result<Delivery, NodeError>>) {
        let (tx, rx) = mpsc::channel(depth);
        (
            Self {
                tx,
                buf: Vec::new(),
            },
            rx,
        )
    }
}

impl Sink for Frames {
    async fn push(&mut self, msg: ImmutableMessage) -> bool {
        self.buf.push(msg);
        if self.buf.len() >= Self::MAX {
            return self.flush().await;
        }
        true
    }
    async fn flush(&mut self) -> bool {
        if self.buf.is_empty() {
            return !self.tx.is_closed();
        }
        self.tx
            .send(Ok(Delivery::Messages(std::mem::take(&mut self.buf))))
            .await
            .is_ok()
    }
    async fn fail(&mut self, e: NodeError) {
        let _ = self.flush().await;
        let _ = self.tx.send(Err(e)).await;
    }
    async fn complete_through(&mut self, tick: TimeTick) -> bool {
        self.flush().await
            && self
                .tx
                .send(Ok(Delivery::CompleteThrough(tick)))
                .await
                .is_ok()
    }
}

/// A channel of single messages (tests, embedding).
impl Sink for mpsc::Sender<Result<ImmutableMessage, NodeError>> {
    async fn push(&mut self, msg: ImmutableMessage) -> bool {
        self.send(Ok(msg)).await.is_ok()
    }
    async fn flush(&mut self) -> bool {
        !self.is_closed()
    }
    async fn fail(&mut self, e: NodeError) {
        let _ = self.send(Err(e)).await;
    }
    async fn complete_through(&mut self, _: TimeTick) -> bool {
        !self.is_closed()
    }
}

/// Runs a scan until the consumer goes away or the channel closes; errors go to the sink.
pub async fn scan(
    channel: Arc<Channel>,
    policy: DeliverPolicy,
    filters: Filters,
    mut sink: impl Sink,
) {
    if let Err(e) = run(&channel, policy, &filters, &mut sink).await {
        sink.fail(e).await;
    }
}

async fn run(
    channel: &Arc<Channel>,
    policy: DeliverPolicy,
    filters: &Filters,
    sink: &mut impl Sink,
) -> Result<(), NodeError> {
    let wab = &channel.wab;
    let mut pos = match policy {
        DeliverPolicy::Latest => Pos::Tail(wab.end()),
        DeliverPolicy::StartFrom(id) => Pos::Storage(id),
        DeliverPolicy::StartAfter(id) => Pos::Storage(id.next()),
        DeliverPolicy::All => match filters.tick_floor() {
            // Everything above the floor's tick is in the buffer, and so is every transaction
            // body committed after it from the oldest buffered message's last-confirmed id on.
            Some(t) if wab.first_tick().is_some_and(|f| f <= t) => {
                Pos::Storage(wab.first_last_confirmed().unwrap_or_else(|| wab.floor()))
            }
            _ => Pos::Storage(channel.wal().first_id()),
        },
    };
    // A position below the log's first id is TRUNCATED even while the write-ahead buffer
    // still holds it: what a consumer can read must not depend on what is in memory.
    // (`All` starts at whatever is retained.)
    let explicit = matches!(
        policy,
        DeliverPolicy::StartFrom(_) | DeliverPolicy::StartAfter(_)
    );
    if let Pos::Storage(from) = pos {
        let first = channel.wal().first_id();
        if from < first && !explicit {
            pos = Pos::Storage(first);
        } else if from < first {
            return Err(NodeError::Wal(walden_wal_api::WalError::Truncated {
                pchannel: channel.name().to_owned(),
                requested: from,
                first,
            }));
        }
    }
    let mut health = channel.health();
    let mut changes = wab.subscribe();
    let mut batch = Vec::with_capacity(TAIL_BATCH);
    let mut txns = TxnAssembler::default();
    // The highest tick the reader has heard of, from a message or an idle TimeTick.
    let mut heard = TimeTick(0);
    loop {
        pos = match pos {
            Pos::Storage(from) => {
                if from >= wab.floor() {
                    Pos::Tail(from)
                } else {
                    debug!(pchannel = channel.name(), from = %from, "catching up from storage");
                    let mut reader = channel.wal().read(ReadFrom::At(from))?;
                    let mut next = from;
                    loop {
                        if next >= wab.floor() {
                            break Pos::Tail(next);
                        }
                        match reader.next().await? {
                            Some((id, record)) => {
                                let msg = codec::decode(id, record)?;
                                next = id.next();
                                let Some(msg) = txns.push(msg) else { continue };
                                if filters.admits(&msg) && !sink.push(msg).await {
                                    return Ok(());
                                }
                            }
                            // Durable end, below the buffer: wait for more to be written.
                            None => {
                                if !sink.flush().await {
                                    return Ok(());
                                }
                                wait(&mut changes, &mut health, channel).await?;
                            }
                        }
                    }
                }
            }
            Pos::Tail(mut next) => loop {
                batch.clear();
                if wab.read_from(next, TAIL_BATCH, &mut batch).is_err() {
                    debug!(pchannel = channel.name(), at = %next, "evicted; back to storage");
                    break Pos::Storage(next);
                }
                if batch.is_empty() {
                    // Caught up: if the pchannel is complete past what the reader heard (an
                    // idle TimeTick, or messages the filters kept back), say so.
                    let mark = wab.mark();
                    let sent = if mark.end == next && mark.tick > heard {
                        heard = mark.tick;
                        sink.complete_through(mark.tick).await
                    } else {
                        sink.flush().await
                    };
                    if !sent {
                        return Ok(());
                    }
                    if mark.end == next {
                        wait(&mut changes, &mut health, channel).await?;
                    }
                    continue;
                }
                let end = wab.end().0;
                for msg in batch.drain(..) {
                    next = msg.id.next();
                    let Some(msg) = txns.push(msg) else { continue };
                    if filters.admits(&msg) {
                        heard = heard.max(msg.time_tick());
                        channel
                            .metrics()
                            .consumer_lag
                            .observe((end - msg.id.0) as f64);
                        if !sink.push(msg).await {
                            return Ok(());
                        }
                    }
                }
                if !sink.flush().await {
                    return Ok(());
                }
            },
        }
    }
}

/// Waits for newly confirmed messages, failing if the channel stops serving.
///
/// No timer is needed: every durable record is pushed to the write-ahead buffer, and `changed()`
/// returns at once if a push happened since this receiver last looked, so a wake-up cannot be
/// lost between a read that came back empty and this wait.
async fn wait(
    changes: &mut tokio::sync::watch::Receiver<crate::wab::Mark>,
    health: &mut tokio::sync::watch::Receiver<Health>,
    channel: &Channel,
) -> Result<(), NodeError> {
    if *health.borrow() != Health::Serving {
        return Err(channel.closed_error());
    }
    tokio::select! {
        r = changes.changed() => {
            if r.is_err() {
                return Err(channel.closed_error());
            }
        }
        _ = health.changed() => {}
    }
    Ok(())
}
