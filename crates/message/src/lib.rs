//! Walden's message model.
//!
//! A message is a typed protobuf header plus an opaque payload. A [`MutableMessage`] is what a
//! client submits; the WAL stamps it with a time tick, its term and a last-confirmed id and
//! stores it as a record (see [`codec`]); what comes back from storage is an
//! [`ImmutableMessage`].

pub mod codec;

use std::collections::HashMap;

use bytes::Bytes;
use walden_common::{MessageId, Term, TimeTick, validate_channel_name};
pub use walden_proto::v1::{MessageHeader, MessageType, TxnContext};

pub use codec::DecodeError;

/// Properties a message may carry, beyond its typed header fields.
pub type Properties = HashMap<String, String>;

/// A message before it is appended: the WAL has not yet assigned its tick or id.
#[derive(Clone, Debug, PartialEq)]
pub struct MutableMessage {
    pub message_type: MessageType,
    /// The vchannel it belongs to; empty for pchannel-level messages.
    pub vchannel: String,
    pub properties: Properties,
    pub txn: Option<TxnContext>,
    /// `(producer id, sequence)` of an idempotent producer; a retry with the same pair is
    /// answered with the original result.
    pub producer: Option<(u64, u64)>,
    /// Collection fields: see [`CollectionFields`].
    pub coll: CollectionFields,
    pub payload: Bytes,
}

/// The header fields of collection messages. Clients set `partition`, `segment_id` (rarely) and
/// `broadcast_id` (the coordinator); the node sets `collection_id` and `rows` from the vchannel's
/// state and the payload, whatever the client sent.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CollectionFields {
    pub collection_id: u64,
    pub partition: String,
    pub segment_id: u64,
    pub rows: u64,
    pub broadcast_id: u64,
}

/// The partition every collection has, and that DML without a partition goes to.
pub const DEFAULT_PARTITION: &str = "_default";

impl MutableMessage {
    /// A message of `message_type` on `vchannel` with `payload` and no properties.
    pub fn new(message_type: MessageType, vchannel: impl Into<String>, payload: Bytes) -> Self {
        Self {
            message_type,
            vchannel: vchannel.into(),
            properties: Properties::new(),
            txn: None,
            producer: None,
            coll: CollectionFields::default(),
            payload,
        }
    }

    /// Sets the partition (builder style).
    #[must_use]
    pub fn with_partition(mut self, partition: impl Into<String>) -> Self {
        self.coll.partition = partition.into();
        self
    }

    /// The WAL's own TimeTick message, visible to every vchannel.
    pub fn time_tick() -> Self {
        Self::new(MessageType::TimeTick, "", Bytes::new())
    }

    /// Checks what a client may submit: a known type that clients are allowed to write, and a
    /// valid vchannel name.
    pub fn validate_from_client(&self) -> Result<(), String> {
        match self.message_type {
            MessageType::Unspecified => return Err("message type is unspecified".into()),
            MessageType::TimeTick => {
                return Err("TimeTick messages are written by the WAL only".into());
            }
            MessageType::Txn => {
                return Err("Txn messages are assembled for consumers, never written".into());
            }
            _ => {}
        }
        validate_channel_name(&self.vchannel).map_err(|e| format!("vchannel: {e}"))
    }

    /// The header this message is stored with, once the WAL has assigned its place.
    pub fn header(&self, tick: TimeTick, term: Term, last_confirmed: MessageId) -> MessageHeader {
        MessageHeader {
            message_type: self.message_type as i32,
            vchannel: self.vchannel.clone(),
            time_tick: tick.0,
            last_confirmed_id: last_confirmed.0,
            term: term.0,
            txn: self.txn,
            properties: self.properties.clone(),
            producer_id: self.producer.map_or(0, |p| p.0),
            producer_seq: self.producer.map_or(0, |p| p.1),
            collection_id: self.coll.collection_id,
            partition: self.coll.partition.clone(),
            segment_id: self.coll.segment_id,
            rows: self.coll.rows,
            broadcast_id: self.coll.broadcast_id,
        }
    }

    /// Converts from the wire form, refusing unknown message types.
    pub fn from_proto(m: walden_proto::v1::MutableMessage) -> Result<Self, String> {
        let message_type = MessageType::try_from(m.message_type)
            .map_err(|_| format!("unknown message type {}", m.message_type))?;
        Ok(Self {
            message_type,
            vchannel: m.vchannel,
            properties: m.properties,
            producer: (m.producer_id != 0).then_some((m.producer_id, m.producer_seq)),
            txn: m.txn,
            coll: CollectionFields {
                partition: m.partition,
                segment_id: m.segment_id,
                broadcast_id: m.broadcast_id,
                ..CollectionFields::default()
            },
            payload: m.payload,
        })
    }

    /// Converts to the wire form.
    pub fn into_proto(self) -> walden_proto::v1::MutableMessage {
        walden_proto::v1::MutableMessage {
            message_type: self.message_type as i32,
            vchannel: self.vchannel,
            properties: self.properties,
            payload: self.payload,
            producer_id: self.producer.map_or(0, |p| p.0),
            producer_seq: self.producer.map_or(0, |p| p.1),
            partition: self.coll.partition,
            segment_id: self.coll.segment_id,
            broadcast_id: self.coll.broadcast_id,
            txn: self.txn,
        }
    }

    /// Like [`MutableMessage::header`], consuming the message so that its names and properties
    /// move instead of being copied; returns the payload beside the header.
    pub fn into_header(
        self,
        tick: TimeTick,
        term: Term,
        last_confirmed: MessageId,
    ) -> (MessageHeader, Bytes) {
        let header = MessageHeader {
            message_type: self.message_type as i32,
            vchannel: self.vchannel,
            time_tick: tick.0,
            last_confirmed_id: last_confirmed.0,
            term: term.0,
            txn: self.txn,
            properties: self.properties,
            producer_id: self.producer.map_or(0, |p| p.0),
            producer_seq: self.producer.map_or(0, |p| p.1),
            collection_id: self.coll.collection_id,
            partition: self.coll.partition,
            segment_id: self.coll.segment_id,
            rows: self.coll.rows,
            broadcast_id: self.coll.broadcast_id,
        };
        (header, self.payload)
    }

    /// Bytes this message occupies before encoding (payload, names and properties): what size
    /// limits are checked against.
    pub fn approximate_size(&self) -> usize {
        self.payload.len()
            + self.vchannel.len()
            + self.coll.partition.len()
            + self
                .properties
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
    }
}

/// What a reader of one pchannel receives, in order.
#[derive(Clone, Debug, PartialEq)]
pub enum Delivery {
    /// Consecutive messages, in tick order.
    Messages(Vec<ImmutableMessage>),
    /// Every message with a tick at or below this one was delivered before it (subject to
    /// the reader's filters). Sent by a reader caught up with an idle pchannel: an idle
    /// TimeTick, which is not stored (docs/design.md §8).
    CompleteThrough(TimeTick),
}

/// A message as stored: header with its tick, the id the WAL gave it, and the payload.
#[derive(Clone, Debug, PartialEq)]
pub struct ImmutableMessage {
    pub id: MessageId,
    pub header: MessageHeader,
    pub payload: Bytes,
}

impl ImmutableMessage {
    pub fn message_type(&self) -> MessageType {
        // The codec refuses unknown types, so this cannot fall back in practice.
        MessageType::try_from(self.header.message_type).unwrap_or(MessageType::Unspecified)
    }

    pub fn time_tick(&self) -> TimeTick {
        TimeTick(self.header.time_tick)
    }

    pub fn last_confirmed(&self) -> MessageId {
        MessageId(self.header.last_confirmed_id)
    }

    pub fn vchannel(&self) -> &str {
        &self.header.vchannel
    }

    pub fn term(&self) -> Term {
        Term(self.header.term)
    }

    /// `(producer id, sequence)` if an idempotent producer sent it.
    pub fn producer(&self) -> Option<(u64, u64)> {
        (self.header.producer_id != 0)
            .then_some((self.header.producer_id, self.header.producer_seq))
    }

    /// The messages of a delivered `Txn` (BeginTxn, the body, CommitTxn), in tick order.
    pub fn txn_messages(&self) -> Result<Vec<ImmutableMessage>, DecodeError> {
        use prost::Message as _;
        let body = walden_proto::v1::TxnBody::decode(self.payload.as_ref())
            .map_err(|e| DecodeError::BadHeader(format!("transaction body: {e}")))?;
        body.messages.into_iter().map(Self::from_proto).collect()
    }

    /// Converts to the wire form.
    pub fn into_proto(self) -> walden_proto::v1::ImmutableMessage {
        walden_proto::v1::ImmutableMessage {
            message_id: self.id.0,
            header: Some(self.header),
            payload: self.payload,
        }
    }

    /// Converts from the wire form, checking the header as the codec does.
    pub fn from_proto(m: walden_proto::v1::ImmutableMessage) -> Result<Self, DecodeError> {
        let header = m.header.ok_or(DecodeError::MissingHeader)?;
        codec::validate_header(&header)?;
        Ok(Self {
            id: MessageId(m.message_id),
            header,
            payload: m.payload,
        })
    }
}

/// The name of a message type as users see it (`Insert`, `TimeTick`, ...).
pub fn type_name(t: MessageType) -> &'static str {
    match t {
        MessageType::Unspecified => "Unspecified",
        MessageType::TimeTick => "TimeTick",
        MessageType::Insert => "Insert",
        MessageType::Delete => "Delete",
        MessageType::Flush => "Flush",
        MessageType::CreateCollection => "CreateCollection",
        MessageType::DropCollection => "DropCollection",
        MessageType::CreatePartition => "CreatePartition",
        MessageType::DropPartition => "DropPartition",
        MessageType::CreateSegment => "CreateSegment",
        MessageType::BeginTxn => "BeginTxn",
        MessageType::CommitTxn => "CommitTxn",
        MessageType::RollbackTxn => "RollbackTxn",
        MessageType::Upsert => "Upsert",
        MessageType::Data => "Data",
        MessageType::Txn => "Txn",
    }
}

/// Parses a user-facing type name (as printed by [`type_name`]); case-insensitive.
pub fn parse_type_name(s: &str) -> Option<MessageType> {
    ALL_TYPES
        .iter()
        .copied()
        .find(|t| type_name(*t).eq_ignore_ascii_case(s))
}

/// Every message type a message can have.
pub const ALL_TYPES: [MessageType; 15] = [
    MessageType::TimeTick,
    MessageType::Insert,
    MessageType::Delete,
    MessageType::Flush,
    MessageType::CreateCollection,
    MessageType::DropCollection,
    MessageType::CreatePartition,
    MessageType::DropPartition,
    MessageType::CreateSegment,
    MessageType::BeginTxn,
    MessageType::CommitTxn,
    MessageType::RollbackTxn,
    MessageType::Upsert,
    MessageType::Data,
    MessageType::Txn,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_names_parse_back_to_their_type() {
        for t in ALL_TYPES {
            assert_eq!(parse_type_name(type_name(t)), Some(t));
            assert_eq!(parse_type_name(&type_name(t).to_uppercase()), Some(t));
        }
        assert_eq!(parse_type_name("Nope"), None);
    }

    #[test]
    fn clients_cannot_write_time_ticks_or_unnamed_vchannels() {
        let ok = MutableMessage::new(MessageType::Insert, "v1", Bytes::from_static(b"x"));
        assert!(ok.validate_from_client().is_ok());
        assert!(MutableMessage::time_tick().validate_from_client().is_err());
        let unnamed = MutableMessage::new(MessageType::Insert, "", Bytes::new());
        assert!(unnamed.validate_from_client().is_err());
        let unspecified = MutableMessage::new(MessageType::Unspecified, "v", Bytes::new());
        assert!(unspecified.validate_from_client().is_err());
    }
}
