//! Byte formats of the shared log: segment and index file names, the segment header, record
//! bodies, and sealed segments' index files.

use super::{HEADER_LEN, MAGIC, VERSION};

pub(super) fn segment_name(seq: u64) -> String {
    format!("{seq:020}.log")
}

pub(super) fn parse_segment_name(n: &str) -> Option<u64> {
    sequence(n.strip_suffix(".log")?)
}

/// The sequence number of an index file's name.
pub(super) fn parse_index_name(n: &str) -> Option<u64> {
    sequence(n.strip_suffix(".idx")?)
}

/// Exactly 20 ASCII digits: `u64::from_str` alone also takes a sign (`+000…7` would name
/// segment 7 a second time; found by the `shared_layout` fuzz target).
fn sequence(digits: &str) -> Option<u64> {
    (digits.len() == 20 && digits.bytes().all(|c| c.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

/// The segments in `dir`, by sequence number.
pub(super) fn segment_seqs(
    fs: &dyn crate::fs::FileSystem,
    dir: &std::path::Path,
) -> Result<Vec<u64>, walden_wal_api::WalError> {
    let mut seqs: Vec<u64> = fs
        .list(dir)
        .map_err(crate::open::io_err(super::LOG, "listing segments"))?
        .iter()
        .filter_map(|n| parse_segment_name(n))
        .collect();
    seqs.sort_unstable();
    Ok(seqs)
}

pub(super) fn index_name(seq: u64) -> String {
    format!("{seq:020}.idx")
}

pub(super) const INDEX_MAGIC: &[u8; 8] = b"WALDNIDX";

/// A sealed segment's index: `WALDNIDX | version u32 | seq u64 | n u32`, then per pchannel
/// `name_len u8 | name | first_id u64 | count u32 | count × (offset u64, length u32)`, then a
/// crc32c of everything before it.
pub(super) fn encode_index(seq: u64, entries: &[(String, u64, Vec<Loc>)]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(INDEX_MAGIC);
    b.extend_from_slice(&VERSION.to_le_bytes());
    b.extend_from_slice(&seq.to_le_bytes());
    b.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for (name, first, locs) in entries {
        b.push(name.len() as u8);
        b.extend_from_slice(name.as_bytes());
        b.extend_from_slice(&first.to_le_bytes());
        b.extend_from_slice(&(locs.len() as u32).to_le_bytes());
        for l in locs {
            b.extend_from_slice(&l.off.to_le_bytes());
            b.extend_from_slice(&l.len.to_le_bytes());
        }
    }
    let crc = crc32c::crc32c(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    b
}

/// Reads what [`encode_index`] wrote; `None` for anything else.
pub(super) fn decode_index(b: &[u8], seq: u64) -> Option<Vec<(String, u64, Vec<Loc>)>> {
    let (body, crc) = b.split_at_checked(b.len().checked_sub(4)?)?;
    if crc32c::crc32c(body).to_le_bytes() != crc {
        return None;
    }
    let mut r = body;
    let mut take = |n: usize| -> Option<&[u8]> {
        let (head, rest) = r.split_at_checked(n)?;
        r = rest;
        Some(head)
    };
    let u32_of = |s: &[u8]| u32::from_le_bytes(s.try_into().unwrap_or([0; 4]));
    let u64_of = |s: &[u8]| u64::from_le_bytes(s.try_into().unwrap_or([0; 8]));
    if take(8)? != INDEX_MAGIC || u32_of(take(4)?) != VERSION || u64_of(take(8)?) != seq {
        return None;
    }
    let n = u32_of(take(4)?);
    let mut out = Vec::new();
    for _ in 0..n {
        let name_len = take(1)?[0] as usize;
        let name = std::str::from_utf8(take(name_len)?).ok()?.to_owned();
        let first = u64_of(take(8)?);
        let count = u32_of(take(4)?) as usize;
        if count == 0 {
            return None;
        }
        let mut locs = Vec::with_capacity(count.min(1 << 20));
        for _ in 0..count {
            let off = u64_of(take(8)?);
            let len = u32_of(take(4)?);
            locs.push(Loc { seg: seq, off, len });
        }
        out.push((name, first, locs));
    }
    Some(out)
}

pub(crate) fn header(seq: u64) -> Vec<u8> {
    let mut h = Vec::with_capacity(HEADER_LEN);
    h.extend_from_slice(MAGIC);
    h.extend_from_slice(&VERSION.to_le_bytes());
    h.extend_from_slice(&seq.to_le_bytes());
    h
}

/// `id | name_len | name | payload`, framed as a record.
pub(super) fn encode(id: u64, name: &str, payload: &[u8], buf: &mut Vec<u8>) {
    let body_len = 9 + name.len() + payload.len();
    let start = buf.len();
    buf.extend_from_slice(&(body_len as u32).to_le_bytes());
    buf.extend_from_slice(&[0; 4]);
    buf.extend_from_slice(&id.to_le_bytes());
    buf.push(name.len() as u8);
    buf.extend_from_slice(name.as_bytes());
    buf.extend_from_slice(payload);
    let crc = crc32c::crc32c_append(crc32c::crc32c(&buf[start..start + 4]), &buf[start + 8..]);
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// The (id, name, payload range within `body`) of a record body.
pub(super) fn parse_body(body: &[u8]) -> Option<(u64, &str, std::ops::Range<usize>)> {
    let id = u64::from_le_bytes(body.get(..8)?.try_into().ok()?);
    let n = *body.get(8)? as usize;
    let name = std::str::from_utf8(body.get(9..9 + n)?).ok()?;
    Some((id, name, 9 + n..body.len()))
}

#[derive(Clone, Copy, Debug)]
pub(super) struct Loc {
    pub(super) seg: u64,
    /// Offset of the record (its length field) in the segment.
    pub(super) off: u64,
    /// Whole record length, framing included.
    pub(super) len: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_index_round_trips_and_the_fuzz_seed_is_a_valid_one() {
        let entries = vec![(
            "walden-dml-0".to_owned(),
            100,
            vec![
                Loc {
                    seg: 7,
                    off: 20,
                    len: 64,
                },
                Loc {
                    seg: 7,
                    off: 84,
                    len: 70,
                },
            ],
        )];
        let b = encode_index(7, &entries);
        let d = decode_index(&b, 7).expect("decodes");
        assert_eq!(encode_index(7, &d), b);
        assert!(decode_index(&b, 8).is_none(), "another segment's index");
        let mut bad = b.clone();
        bad[12] ^= 1;
        assert!(decode_index(&bad, 7).is_none(), "a flipped bit");
        // The fuzz target's seed (fuzz/corpus/shared_layout) exercises the accepting path.
        let seed = include_bytes!("../../../../fuzz/corpus/shared_layout/index-seq7");
        assert_eq!(decode_index(seed, 7).map(|e| e.len()), Some(2));
        crate::shared::parse_untrusted(seed);
        crate::shared::parse_untrusted(b"00000000000000000007.log");
    }

    #[test]
    fn a_segment_or_index_name_is_twenty_digits_and_nothing_else() {
        assert_eq!(parse_segment_name("00000000000000000007.log"), Some(7));
        assert_eq!(parse_index_name(&index_name(7)), Some(7));
        for bad in [
            "+0000000000000000007.log",
            "-0000000000000000007.log",
            " 0000000000000000007.log",
            "0000000000000000007.log",
            "000000000000000000007.log",
        ] {
            assert_eq!(parse_segment_name(bad), None, "{bad}");
        }
        assert_eq!(parse_index_name("+0000000000000000007.idx"), None);
    }
}
