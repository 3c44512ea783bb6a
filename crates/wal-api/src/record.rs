//! The record framing: how one record is laid out in a byte stream (a local segment file, an
//! object-storage fragment). Specified in `docs/design.md`.
//!
//! ```text
//! len u32 | crc32c u32 (of the 4 len bytes, then the payload) | payload[len]
//! ```

/// Bytes before a record's payload.
pub const RECORD_HEADER_LEN: usize = 8;
/// Largest record payload the format allows (the node enforces a much smaller limit).
pub const MAX_RECORD_LEN: usize = 256 << 20;

/// Appends one record to `buf`.
pub fn encode_record(payload: &[u8], buf: &mut Vec<u8>) {
    let len = (payload.len() as u32).to_le_bytes();
    let crc = crc32c::crc32c_append(crc32c::crc32c(&len), payload);
    buf.extend_from_slice(&len);
    buf.extend_from_slice(&crc.to_le_bytes());
    buf.extend_from_slice(payload);
}

/// What is at a position where a record should start.
#[derive(Debug, PartialEq, Eq)]
pub enum RecordAt {
    /// A whole, checksummed record whose payload is `b[start..start+len]`.
    Valid { start: usize, len: usize },
    /// Not enough bytes for the header or payload: the end, or a torn tail.
    Incomplete,
    /// The bytes are there but do not form a record.
    Invalid(&'static str),
}

/// Parses the record at the start of `b`.
pub fn record_at(b: &[u8]) -> RecordAt {
    if b.len() < RECORD_HEADER_LEN {
        return RecordAt::Incomplete;
    }
    let len = u32_at(b, 0) as usize;
    if len > MAX_RECORD_LEN {
        return RecordAt::Invalid("length exceeds the format limit");
    }
    if b.len() < RECORD_HEADER_LEN + len {
        return RecordAt::Incomplete;
    }
    let crc = u32_at(b, 4);
    let actual = crc32c::crc32c_append(crc32c::crc32c(&b[..4]), &b[8..8 + len]);
    if actual != crc {
        return RecordAt::Invalid("checksum mismatch");
    }
    RecordAt::Valid {
        start: RECORD_HEADER_LEN,
        len,
    }
}

/// Whether a valid record starts anywhere in `b` at or after `from` (used to tell a torn tail,
/// after which nothing valid follows, from corruption in the middle of the log).
pub fn any_valid_record_after(b: &[u8], from: usize) -> Option<usize> {
    (from..b.len().saturating_sub(RECORD_HEADER_LEN))
        .find(|&off| u32_at(b, off) != 0 && matches!(record_at(&b[off..]), RecordAt::Valid { .. }))
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn records_round_trip_and_any_single_flip_is_detected(
            payload in proptest::collection::vec(any::<u8>(), 0..300),
            flip in any::<prop::sample::Index>(),
        ) {
            let mut b = Vec::new();
            encode_record(&payload, &mut b);
            prop_assert_eq!(record_at(&b), RecordAt::Valid { start: 8, len: payload.len() });
            prop_assert_eq!(&b[8..], &payload[..]);
            let i = flip.index(b.len());
            b[i] ^= 0x01;
            prop_assert_ne!(record_at(&b), RecordAt::Valid { start: 8, len: payload.len() });
        }

        #[test]
        fn every_strict_prefix_of_a_record_is_incomplete(
            payload in proptest::collection::vec(any::<u8>(), 0..100), cut in 1usize..108,
        ) {
            let mut b = Vec::new();
            encode_record(&payload, &mut b);
            let cut = cut.min(b.len());
            prop_assert_eq!(record_at(&b[..b.len() - cut]), RecordAt::Incomplete);
        }
    }
}
