//! The on-disk format of the local WAL (also specified in `docs/design.md`).
//!
//! A pchannel is a directory. Segment files are named `{first_id:020}.seg` and hold:
//!
//! ```text
//! header:  magic "WALDNSEG" | version u32 | term u64 | first_id u64 | name_len u16 | name
//!          | crc32c u32 (of every header byte before it)
//! records: len u32 | crc32c u32 (of the 4 len bytes, then the payload) | payload[len]
//! ```
//!
//! All integers are little-endian. A record's id is the segment's `first_id` plus its index in
//! the segment, so ids need not be stored.

use thiserror::Error;

pub const MAGIC: &[u8; 8] = b"WALDNSEG";
pub const VERSION: u32 = 1;
/// The record framing, shared by every backend that stores records in byte streams.
pub use walden_wal_api::record::{
    MAX_RECORD_LEN, RECORD_HEADER_LEN, RecordAt, any_valid_record_after, encode_record, record_at,
};
/// Fixed header bytes, without the name.
const FIXED_HEADER_LEN: usize = 8 + 4 + 8 + 8 + 2 + 4;

/// The header at the start of every segment file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentHeader {
    pub term: u64,
    pub first_id: u64,
    pub pchannel: String,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum HeaderError {
    #[error("segment header is incomplete ({0} bytes)")]
    Incomplete(usize),
    #[error("bad magic")]
    BadMagic,
    #[error("unsupported segment format version {0}")]
    UnsupportedVersion(u32),
    #[error("segment header checksum mismatch")]
    BadChecksum,
}

impl SegmentHeader {
    pub fn encoded_len(&self) -> usize {
        FIXED_HEADER_LEN + self.pchannel.len()
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(self.encoded_len());
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&VERSION.to_le_bytes());
        b.extend_from_slice(&self.term.to_le_bytes());
        b.extend_from_slice(&self.first_id.to_le_bytes());
        b.extend_from_slice(&(self.pchannel.len() as u16).to_le_bytes());
        b.extend_from_slice(self.pchannel.as_bytes());
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes a header from the start of `b`.
    pub fn decode(b: &[u8]) -> Result<Self, HeaderError> {
        if b.len() < FIXED_HEADER_LEN {
            return Err(HeaderError::Incomplete(b.len()));
        }
        if &b[..8] != MAGIC {
            return Err(HeaderError::BadMagic);
        }
        let version = u32_at(b, 8);
        if version != VERSION {
            return Err(HeaderError::UnsupportedVersion(version));
        }
        let term = u64_at(b, 12);
        let first_id = u64_at(b, 20);
        let name_len = u16::from_le_bytes([b[28], b[29]]) as usize;
        let total = FIXED_HEADER_LEN + name_len;
        if b.len() < total {
            return Err(HeaderError::Incomplete(b.len()));
        }
        let crc = u32_at(b, total - 4);
        if crc32c::crc32c(&b[..total - 4]) != crc {
            return Err(HeaderError::BadChecksum);
        }
        let pchannel = String::from_utf8_lossy(&b[30..30 + name_len]).into_owned();
        Ok(Self {
            term,
            first_id,
            pchannel,
        })
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// The file name of the segment starting at `first_id`.
pub fn segment_file_name(first_id: u64) -> String {
    format!("{first_id:020}.seg")
}

/// The first id encoded in a segment file name, if it is one.
pub fn parse_segment_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".seg")?;
    (digits.len() == 20 && digits.bytes().all(|c| c.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_detects_damage() {
        let h = SegmentHeader {
            term: 7,
            first_id: 1234,
            pchannel: "walden-dml-3".into(),
        };
        let b = h.encode();
        assert_eq!(b.len(), h.encoded_len());
        assert_eq!(SegmentHeader::decode(&b), Ok(h));
        for i in 0..b.len() {
            let mut d = b.clone();
            d[i] ^= 0x40;
            assert!(
                SegmentHeader::decode(&d).is_err(),
                "flip at {i} went unnoticed"
            );
        }
        assert!(matches!(
            SegmentHeader::decode(&b[..10]),
            Err(HeaderError::Incomplete(10))
        ));
    }

    #[test]
    fn segment_names_sort_by_first_id_and_parse_back() {
        assert_eq!(parse_segment_file_name(&segment_file_name(42)), Some(42));
        assert!(segment_file_name(9) < segment_file_name(10));
        assert_eq!(parse_segment_file_name("LOCK"), None);
        assert_eq!(parse_segment_file_name("12.seg"), None);
    }
}
