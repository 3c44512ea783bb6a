//! The byte form of a message inside a WAL record.
//!
//! ```text
//! [version u8 = 1][header_len u32 LE][header: protobuf MessageHeader][payload: rest]
//! ```
//!
//! The payload is not re-encoded, so a decoded message's payload is a slice of the record.
//! Integrity (CRC) is the WAL storage's job; this layer only checks structure.

use bytes::{BufMut, Bytes};
use prost::Message as _;
use thiserror::Error;
use walden_common::{ErrorCode, HasErrorCode, MessageId};

use crate::{ImmutableMessage, MessageHeader, MessageType, MutableMessage};

/// Format version written as the first byte of every record.
pub const FORMAT_VERSION: u8 = 1;
/// Fixed bytes before the header.
pub const PREFIX_LEN: usize = 5;
/// Largest header accepted (the header holds names and properties, never data).
pub const MAX_HEADER_LEN: usize = 1 << 20;

/// Why a record could not be decoded.
#[derive(Debug, Error, PartialEq)]
pub enum DecodeError {
    #[error("record of {0} bytes is shorter than the {PREFIX_LEN}-byte prefix")]
    TooShort(usize),
    #[error("unknown record format version {0}")]
    UnknownVersion(u8),
    #[error("header length {header_len} exceeds the {available} bytes available")]
    HeaderOverrun { header_len: usize, available: usize },
    #[error("header length {0} exceeds the limit of {MAX_HEADER_LEN}")]
    HeaderTooLarge(usize),
    #[error("header is not a valid protobuf: {0}")]
    BadHeader(String),
    #[error("message has no header")]
    MissingHeader,
    #[error("unknown message type {0}")]
    UnknownType(i32),
}

impl HasErrorCode for DecodeError {
    fn code(&self) -> ErrorCode {
        ErrorCode::Corrupted
    }
}

/// Encodes `header` and `payload` into `buf` (appending), reusing its allocation.
pub fn encode_into(header: &MessageHeader, payload: &[u8], buf: &mut Vec<u8>) {
    let header_len = header.encoded_len();
    buf.reserve(PREFIX_LEN + header_len + payload.len());
    buf.put_u8(FORMAT_VERSION);
    buf.put_u32_le(header_len as u32);
    // Encoding into a Vec with reserved room cannot fail.
    header
        .encode(buf)
        .unwrap_or_else(|_| unreachable!("Vec<u8> grows as needed"));
    buf.extend_from_slice(payload);
}

/// Encodes a mutable message with its assigned header fields into a fresh record.
pub fn encode(header: &MessageHeader, msg: &MutableMessage) -> Bytes {
    let mut buf = Vec::new();
    encode_into(header, &msg.payload, &mut buf);
    Bytes::from(buf)
}

/// Decodes a record read back at `id`. The payload shares `record`'s memory.
pub fn decode(id: MessageId, record: Bytes) -> Result<ImmutableMessage, DecodeError> {
    if record.len() < PREFIX_LEN {
        return Err(DecodeError::TooShort(record.len()));
    }
    if record[0] != FORMAT_VERSION {
        return Err(DecodeError::UnknownVersion(record[0]));
    }
    let header_len = u32::from_le_bytes([record[1], record[2], record[3], record[4]]) as usize;
    if header_len > MAX_HEADER_LEN {
        return Err(DecodeError::HeaderTooLarge(header_len));
    }
    let available = record.len() - PREFIX_LEN;
    if header_len > available {
        return Err(DecodeError::HeaderOverrun {
            header_len,
            available,
        });
    }
    let header = MessageHeader::decode(&record[PREFIX_LEN..PREFIX_LEN + header_len])
        .map_err(|e| DecodeError::BadHeader(e.to_string()))?;
    validate_header(&header)?;
    let payload = record.slice(PREFIX_LEN + header_len..);
    Ok(ImmutableMessage {
        id,
        header,
        payload,
    })
}

/// Checks the parts of a header that protobuf itself cannot.
pub fn validate_header(header: &MessageHeader) -> Result<(), DecodeError> {
    match MessageType::try_from(header.message_type) {
        Ok(MessageType::Unspecified) | Err(_) => Err(DecodeError::UnknownType(header.message_type)),
        Ok(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use walden_common::{Term, TimeTick};

    use crate::ALL_TYPES;

    fn arb_message() -> impl Strategy<Value = MutableMessage> {
        (
            proptest::sample::select(ALL_TYPES.to_vec()),
            "[a-z0-9_]{0,20}",
            proptest::collection::hash_map("[a-z]{1,8}", ".{0,16}", 0..4),
            proptest::option::of((any::<u64>(), any::<u64>())),
            proptest::option::of((1..u64::MAX, any::<u64>())),
            proptest::collection::vec(any::<u8>(), 0..512),
            (
                any::<u64>(),
                "[a-z_]{0,12}",
                any::<u64>(),
                any::<u64>(),
                any::<u64>(),
            ),
        )
            .prop_map(|(t, vc, props, txn, producer, payload, c)| MutableMessage {
                message_type: t,
                vchannel: vc,
                properties: props,
                txn: txn.map(|(txn_id, keepalive_ms)| crate::TxnContext {
                    txn_id,
                    keepalive_ms,
                }),
                producer,
                coll: crate::CollectionFields {
                    collection_id: c.0,
                    partition: c.1,
                    segment_id: c.2,
                    rows: c.3,
                    broadcast_id: c.4,
                },
                payload: Bytes::from(payload),
            })
    }

    proptest! {
        #[test]
        fn encode_then_decode_returns_the_same_message(
            msg in arb_message(), tick in any::<u64>(), term in any::<u64>(),
            lc in any::<u64>(), id in any::<u64>(),
        ) {
            let header = msg.header(TimeTick(tick), Term(term), MessageId(lc));
            let record = encode(&header, &msg);
            let decoded = decode(MessageId(id), record).unwrap();
            prop_assert_eq!(decoded.id, MessageId(id));
            prop_assert_eq!(decoded.message_type(), msg.message_type);
            prop_assert_eq!(decoded.time_tick(), TimeTick(tick));
            prop_assert_eq!(decoded.last_confirmed(), MessageId(lc));
            prop_assert_eq!(decoded.term(), Term(term));
            prop_assert_eq!(decoded.vchannel(), msg.vchannel.as_str());
            prop_assert_eq!(decoded.header.txn, msg.txn);
            prop_assert_eq!(decoded.producer(), msg.producer);
            prop_assert_eq!(&decoded.header.properties, &msg.properties);
            prop_assert_eq!(&decoded.payload, &msg.payload);
            let (moved, payload) = msg.clone().into_header(TimeTick(tick), Term(term), MessageId(lc));
            prop_assert_eq!(moved, header.clone());
            prop_assert_eq!(payload, msg.payload);
        }

        /// The decoder's only outcomes on arbitrary bytes are a message or a typed error.
        #[test]
        fn arbitrary_bytes_decode_to_a_message_or_a_typed_error(
            data in proptest::collection::vec(any::<u8>(), 0..256),
        ) {
            // No panic; and whatever decodes is a message that encodes back to itself.
            if let Ok(m) = decode(MessageId(0), Bytes::from(data)) {
                let mut buf = Vec::new();
                encode_into(&m.header, &m.payload, &mut buf);
                prop_assert_eq!(decode(MessageId(0), Bytes::from(buf)).unwrap(), m);
            }
        }

        /// Every strict prefix of a valid record with a header is refused or decodes to a
        /// shorter payload, never to a different header.
        #[test]
        fn truncated_records_never_yield_a_different_header(msg in arb_message(), cut in 0usize..64) {
            let header = msg.header(TimeTick(7), Term(1), MessageId(3));
            let record = encode(&header, &msg);
            let cut = cut.min(record.len());
            if let Ok(m) = decode(MessageId(0), record.slice(..record.len() - cut)) {
                prop_assert_eq!(m.header, header);
            }
        }
    }

    #[test]
    fn malformed_records_get_specific_errors() {
        assert_eq!(
            decode(MessageId(0), Bytes::from_static(b"\x01\x00")),
            Err(DecodeError::TooShort(2))
        );
        assert_eq!(
            decode(MessageId(0), Bytes::from_static(b"\x02\x00\x00\x00\x00")),
            Err(DecodeError::UnknownVersion(2))
        );
        assert!(matches!(
            decode(MessageId(0), Bytes::from_static(b"\x01\x09\x00\x00\x00ab")),
            Err(DecodeError::HeaderOverrun {
                header_len: 9,
                available: 2
            })
        ));
        // An empty header has message type 0 (unspecified): refused.
        assert_eq!(
            decode(MessageId(0), Bytes::from_static(b"\x01\x00\x00\x00\x00")),
            Err(DecodeError::UnknownType(0))
        );
        // Field 1 (varint) = 77: not a known type.
        assert_eq!(
            decode(
                MessageId(0),
                Bytes::from_static(b"\x01\x02\x00\x00\x00\x08\x4d")
            ),
            Err(DecodeError::UnknownType(77))
        );
        assert!(matches!(
            decode(
                MessageId(0),
                Bytes::from_static(b"\x01\x02\x00\x00\x00\xff\xff")
            ),
            Err(DecodeError::BadHeader(_))
        ));
    }
}
