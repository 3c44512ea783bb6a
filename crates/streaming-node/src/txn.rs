//! Transactions on one vchannel, write side.
//!
//! `BeginTxn` opens a transaction named by its own tick; body messages carry its
//! [`TxnContext`]; `CommitTxn` or `RollbackTxn` closes it. Every body message refreshes the
//! keepalive; a transaction idle for longer expires. The node closes transactions itself with a
//! `RollbackTxn` when they expire, when an exclusive message (DDL, flush) reaches their vchannel,
//! and when the pchannel reopens after a crash, so every `BeginTxn` in the log is followed by
//! its end and consumers can drop what they buffered.
//!
//! While a transaction is open, every message is stamped with a last-confirmed id no higher than
//! its `BeginTxn`: a consumer that resumes from it re-reads the whole body before the commit.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use walden_common::{MessageId, TimeTick};
use walden_message::{MessageHeader, MessageType, MutableMessage, TxnContext};
use walden_proto::v1::OpenTxn;

use crate::NodeError;

/// Why the node rolled a transaction back (the `reason` property of its RollbackTxn).
pub mod reason {
    pub const EXPIRED: &str = "expired";
    pub const EXCLUSIVE: &str = "exclusive_message";
    pub const RECOVERY: &str = "recovery";
}

#[derive(Clone, Debug)]
struct Session {
    vchannel: String,
    begin_id: MessageId,
    last: TimeTick,
    keepalive_ms: u64,
    segments: BTreeSet<u64>,
    /// Payload bytes of its body so far.
    bytes: u64,
}

/// What a message is to the transaction manager.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    None,
    Begin,
    Body(u64),
    End(u64),
}

/// The open transactions of one pchannel.
#[derive(Clone, Debug)]
pub struct Txns {
    open: BTreeMap<u64, Session>,
    default_keepalive_ms: u64,
    /// Most payload bytes one transaction may hold: what a consumer buffers until the commit.
    max_bytes: u64,
}

fn expired(id: u64) -> NodeError {
    NodeError::TxnExpired(format!(
        "transaction {id} expired, was rolled back or is unknown; start a new one"
    ))
}

impl Txns {
    pub fn new(default_keepalive_ms: u64, max_bytes: u64) -> Self {
        Self {
            open: BTreeMap::new(),
            default_keepalive_ms,
            max_bytes,
        }
    }

    fn live(&self, id: u64, vchannel: &str, now: TimeTick) -> Result<&Session, NodeError> {
        let s = self.open.get(&id).ok_or_else(|| expired(id))?;
        if s.vchannel != vchannel {
            return Err(NodeError::InvalidArgument(format!(
                "transaction {id} is on vchannel {:?}, not {vchannel:?}",
                s.vchannel
            )));
        }
        if now.physical_ms().saturating_sub(s.last.physical_ms()) > s.keepalive_ms {
            return Err(expired(id));
        }
        Ok(s)
    }

    /// Checks the transaction part of `msg` and fills in its context. `now` is read only for
    /// messages of an open transaction (the clock stays off the path of every other message).
    pub fn admit(
        &self,
        msg: &mut MutableMessage,
        now: impl FnOnce() -> TimeTick,
    ) -> Result<Role, NodeError> {
        match (msg.message_type, msg.txn) {
            (MessageType::BeginTxn, ctx) => {
                let keepalive_ms = match ctx.map_or(0, |c| c.keepalive_ms) {
                    0 => self.default_keepalive_ms,
                    k => k,
                };
                // Named by its tick at enqueue.
                msg.txn = Some(TxnContext {
                    txn_id: 0,
                    keepalive_ms,
                });
                Ok(Role::Begin)
            }
            (MessageType::CommitTxn | MessageType::RollbackTxn, None) => Err(
                NodeError::InvalidArgument("CommitTxn and RollbackTxn need a transaction".into()),
            ),
            (MessageType::CommitTxn | MessageType::RollbackTxn, Some(ctx)) => {
                let s = self.live(ctx.txn_id, &msg.vchannel, now())?;
                msg.txn = Some(TxnContext {
                    txn_id: ctx.txn_id,
                    keepalive_ms: s.keepalive_ms,
                });
                Ok(Role::End(ctx.txn_id))
            }
            (_, None) => Ok(Role::None),
            (
                MessageType::Insert | MessageType::Upsert | MessageType::Delete | MessageType::Data,
                Some(ctx),
            ) => {
                let s = self.live(ctx.txn_id, &msg.vchannel, now())?;
                let size = s.bytes + msg.payload.len() as u64;
                if size > self.max_bytes {
                    return Err(NodeError::TxnTooLarge {
                        txn: ctx.txn_id,
                        size,
                        limit: self.max_bytes,
                    });
                }
                msg.txn = Some(TxnContext {
                    txn_id: ctx.txn_id,
                    keepalive_ms: s.keepalive_ms,
                });
                Ok(Role::Body(ctx.txn_id))
            }
            (t, Some(_)) => Err(NodeError::InvalidArgument(format!(
                "{} messages cannot be part of a transaction",
                walden_message::type_name(t)
            ))),
        }
    }

    /// The lowest id a consumer must re-read from to see every open transaction whole.
    pub fn min_begin(&self) -> Option<MessageId> {
        self.open.values().map(|s| s.begin_id).min()
    }

    /// Folds a stored message (with its id and payload size) into the open set.
    pub fn apply(&mut self, h: &MessageHeader, id: MessageId, payload_len: usize) {
        let Some(ctx) = h.txn else { return };
        let t = MessageType::try_from(h.message_type).unwrap_or(MessageType::Unspecified);
        match t {
            MessageType::BeginTxn => {
                self.open.insert(
                    ctx.txn_id,
                    Session {
                        vchannel: h.vchannel.clone(),
                        begin_id: id,
                        last: TimeTick(h.time_tick),
                        keepalive_ms: ctx.keepalive_ms,
                        segments: BTreeSet::new(),
                        bytes: 0,
                    },
                );
            }
            MessageType::CommitTxn | MessageType::RollbackTxn => {
                self.open.remove(&ctx.txn_id);
            }
            _ => {
                if let Some(s) = self.open.get_mut(&ctx.txn_id) {
                    s.last = TimeTick(h.time_tick);
                    s.bytes += payload_len as u64;
                    if h.segment_id != 0 {
                        s.segments.insert(h.segment_id);
                    }
                }
            }
        }
    }

    /// Segments an open transaction wrote into: they cannot be sealed until it ends.
    pub fn segments_in_use(&self) -> BTreeSet<u64> {
        self.open
            .values()
            .flat_map(|s| s.segments.iter().copied())
            .collect()
    }

    /// RollbackTxn messages for the transactions that `pick` selects.
    fn rollbacks(&self, why: &str, pick: impl Fn(&Session) -> bool) -> Vec<MutableMessage> {
        self.open
            .iter()
            .filter(|(_, s)| pick(s))
            .map(|(id, s)| {
                let mut m =
                    MutableMessage::new(MessageType::RollbackTxn, s.vchannel.clone(), Bytes::new());
                m.txn = Some(TxnContext {
                    txn_id: *id,
                    keepalive_ms: s.keepalive_ms,
                });
                m.properties.insert("reason".into(), why.into());
                m
            })
            .collect()
    }

    /// Rollbacks for transactions idle past their keepalive at `now`.
    pub fn expired(&self, now: TimeTick) -> Vec<MutableMessage> {
        let now = now.physical_ms();
        self.rollbacks(reason::EXPIRED, |s| {
            now.saturating_sub(s.last.physical_ms()) > s.keepalive_ms
        })
    }

    /// Rollbacks for every transaction on `vchannel` (an exclusive message is coming).
    pub fn on_vchannel(&self, vchannel: &str) -> Vec<MutableMessage> {
        self.rollbacks(reason::EXCLUSIVE, |s| s.vchannel == vchannel)
    }

    /// Rollbacks for every open transaction (the pchannel reopened).
    pub fn all(&self, why: &str) -> Vec<MutableMessage> {
        self.rollbacks(why, |_| true)
    }

    pub fn to_proto(&self) -> Vec<OpenTxn> {
        self.open
            .iter()
            .map(|(id, s)| OpenTxn {
                txn_id: *id,
                vchannel: s.vchannel.clone(),
                begin_id: s.begin_id.0,
            })
            .collect()
    }

    /// Restores open transactions from a checkpoint; they are only ever rolled back.
    pub fn from_proto(open: &[OpenTxn], default_keepalive_ms: u64, max_bytes: u64) -> Self {
        let mut t = Self::new(default_keepalive_ms, max_bytes);
        for o in open {
            t.open.insert(
                o.txn_id,
                Session {
                    vchannel: o.vchannel.clone(),
                    begin_id: MessageId(o.begin_id),
                    last: TimeTick(0),
                    keepalive_ms: default_keepalive_ms,
                    segments: BTreeSet::new(),
                    bytes: 0,
                },
            );
        }
        t
    }
}

/// Whether a message takes its vchannel exclusively: open transactions on it are rolled back
/// first, because their bodies would land after it.
pub fn is_exclusive(t: MessageType) -> bool {
    matches!(
        t,
        MessageType::DropCollection
            | MessageType::CreatePartition
            | MessageType::DropPartition
            | MessageType::Flush
    )
}
