//! The bytes of every object the object-storage WAL writes (also in `docs/design.md` §3.4).
//! All integers are little-endian; every object ends in (or its header holds) a crc32c.
//!
//! ```text
//! fragment: "WALDFRAG" | version u32 | epoch u64 | first_id u64 | count u32
//!           | durable_before u32 | body_crc u32 (of the body)
//!           | header_crc u32 (of the 40 bytes before it)
//!           | body: count records in the record framing (len u32 | crc u32 | payload)
//! fence:    "WALDFENC" | version u32 | epoch u64 | term u64 | crc u32
//! claim:    "WALDEPOC" | version u32 | epoch u64 | term u64 | nonce u64 | crc u32
//! manifest: "WALDMANI" | version u32 | first_id u64 | n u32
//!           | n × (count u32 | size u32) | crc u32
//! ```
//!
//! `durable_before` is how many of the segment's fragments were durable when this one was cut:
//! a gap below it is a lost fragment (corruption), not an upload that never finished.
//!
//! A fence and a fragment share a key space (a segment's fragment numbers), so what is at a
//! key is told by its magic.

use bytes::{BufMut, Bytes, BytesMut};
use walden_wal_api::record::{MAX_RECORD_LEN, RECORD_HEADER_LEN};

const VERSION: u32 = 1;
const FRAGMENT_MAGIC: &[u8; 8] = b"WALDFRAG";
const FENCE_MAGIC: &[u8; 8] = b"WALDFENC";
const CLAIM_MAGIC: &[u8; 8] = b"WALDEPOC";
const MANIFEST_MAGIC: &[u8; 8] = b"WALDMANI";
/// Bytes of a fragment's header.
pub const FRAGMENT_HEADER_LEN: usize = 44;

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Checks magic, version and the trailing crc of a fixed-size object.
fn check_fixed<'a>(
    b: &'a [u8],
    magic: &[u8; 8],
    len: usize,
    what: &str,
) -> Result<&'a [u8], String> {
    if b.len() != len {
        return Err(format!("{what}: {} bytes, expected {len}", b.len()));
    }
    check_tail(b, magic, what)
}

fn check_tail<'a>(b: &'a [u8], magic: &[u8; 8], what: &str) -> Result<&'a [u8], String> {
    if b.len() < 16 || &b[..8] != magic {
        return Err(format!("{what}: bad magic"));
    }
    let version = u32_at(b, 8);
    if version != VERSION {
        return Err(format!("{what}: unsupported version {version}"));
    }
    let body = &b[..b.len() - 4];
    if crc32c::crc32c(body) != u32_at(b, b.len() - 4) {
        return Err(format!("{what}: checksum mismatch"));
    }
    Ok(body)
}

/// What a fragment's header says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FragmentHeader {
    pub epoch: u64,
    pub first_id: u64,
    pub count: u32,
    pub durable_before: u32,
    pub body_crc: u32,
}

/// Builds fragments: records are framed straight into one buffer behind a reserved header.
#[derive(Debug)]
pub struct FragmentBuilder {
    buf: BytesMut,
    count: u32,
}

impl FragmentBuilder {
    pub fn new(capacity: usize) -> Self {
        let mut buf = BytesMut::with_capacity(FRAGMENT_HEADER_LEN + capacity);
        buf.put_bytes(0, FRAGMENT_HEADER_LEN);
        Self { buf, count: 0 }
    }

    pub fn push(&mut self, payload: &[u8]) {
        let len = (payload.len() as u32).to_le_bytes();
        let crc = crc32c::crc32c_append(crc32c::crc32c(&len), payload);
        self.buf.put_slice(&len);
        self.buf.put_u32_le(crc);
        self.buf.put_slice(payload);
        self.count += 1;
    }

    pub fn count(&self) -> u32 {
        self.count
    }

    /// The finished fragment.
    pub fn finish(mut self, epoch: u64, first_id: u64, durable_before: u32) -> Bytes {
        let body_crc = crc32c::crc32c(&self.buf[FRAGMENT_HEADER_LEN..]);
        let mut h = [0u8; FRAGMENT_HEADER_LEN];
        h[..8].copy_from_slice(FRAGMENT_MAGIC);
        h[8..12].copy_from_slice(&VERSION.to_le_bytes());
        h[12..20].copy_from_slice(&epoch.to_le_bytes());
        h[20..28].copy_from_slice(&first_id.to_le_bytes());
        h[28..32].copy_from_slice(&self.count.to_le_bytes());
        h[32..36].copy_from_slice(&durable_before.to_le_bytes());
        h[36..40].copy_from_slice(&body_crc.to_le_bytes());
        let crc = crc32c::crc32c(&h[..40]);
        h[40..44].copy_from_slice(&crc.to_le_bytes());
        self.buf[..FRAGMENT_HEADER_LEN].copy_from_slice(&h);
        self.buf.freeze()
    }
}

/// What is stored at a fragment key.
#[derive(Debug, PartialEq, Eq)]
pub enum AtFragmentKey {
    Fragment(FragmentHeader),
    Fence(Fence),
}

/// Decodes the header at the start of what is stored at a fragment key.
pub fn decode_at_fragment_key(b: &[u8]) -> Result<AtFragmentKey, String> {
    if b.starts_with(FENCE_MAGIC) {
        return Fence::decode(b).map(AtFragmentKey::Fence);
    }
    if b.len() < FRAGMENT_HEADER_LEN || &b[..8] != FRAGMENT_MAGIC {
        return Err("not a fragment: bad magic or too short".into());
    }
    let version = u32_at(b, 8);
    if version != VERSION {
        return Err(format!("fragment: unsupported version {version}"));
    }
    if crc32c::crc32c(&b[..40]) != u32_at(b, 40) {
        return Err("fragment header: checksum mismatch".into());
    }
    Ok(AtFragmentKey::Fragment(FragmentHeader {
        epoch: u64_at(b, 12),
        first_id: u64_at(b, 20),
        count: u32_at(b, 28),
        durable_before: u32_at(b, 32),
        body_crc: u32_at(b, 36),
    }))
}

/// A whole fragment: its header and its records (slices of `b`, not copies).
pub fn decode_fragment(b: &Bytes) -> Result<(FragmentHeader, Vec<Bytes>), String> {
    let h = match decode_at_fragment_key(b)? {
        AtFragmentKey::Fragment(h) => h,
        AtFragmentKey::Fence(_) => return Err("a fence, not a fragment".into()),
    };
    let body = &b[FRAGMENT_HEADER_LEN..];
    if crc32c::crc32c(body) != h.body_crc {
        return Err("fragment body: checksum mismatch".into());
    }
    // The body's crc covers every record, so each record's own crc need not be checked again.
    let mut records = Vec::with_capacity(h.count as usize);
    let mut off = FRAGMENT_HEADER_LEN;
    for i in 0..h.count {
        if b.len() < off + RECORD_HEADER_LEN {
            return Err(format!("fragment body ends inside record {i}"));
        }
        let len = u32_at(b, off) as usize;
        let start = off + RECORD_HEADER_LEN;
        if len > MAX_RECORD_LEN || b.len() < start + len {
            return Err(format!("fragment record {i}: bad length {len}"));
        }
        records.push(b.slice(start..start + len));
        off = start + len;
    }
    if off != b.len() {
        return Err(format!(
            "fragment: {} bytes after its last record",
            b.len() - off
        ));
    }
    Ok((h, records))
}

/// Written by a new writer at the next fragment key of a segment it takes over: the old
/// writer's next upload there fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fence {
    pub epoch: u64,
    pub term: u64,
}

const FENCE_LEN: usize = 8 + 4 + 8 + 8 + 4;

impl Fence {
    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(FENCE_LEN);
        b.put_slice(FENCE_MAGIC);
        b.put_u32_le(VERSION);
        b.put_u64_le(self.epoch);
        b.put_u64_le(self.term);
        let crc = crc32c::crc32c(&b);
        b.put_u32_le(crc);
        b.freeze()
    }

    pub fn decode(b: &[u8]) -> Result<Self, String> {
        let b = check_fixed(b, FENCE_MAGIC, FENCE_LEN, "fence")?;
        Ok(Self {
            epoch: u64_at(b, 12),
            term: u64_at(b, 20),
        })
    }
}

/// A writer's claim of an epoch. The nonce tells a writer its own claim from another's when
/// a create's response was lost.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Claim {
    pub epoch: u64,
    pub term: u64,
    pub nonce: u64,
}

const CLAIM_LEN: usize = 8 + 4 + 8 + 8 + 8 + 4;

impl Claim {
    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(CLAIM_LEN);
        b.put_slice(CLAIM_MAGIC);
        b.put_u32_le(VERSION);
        b.put_u64_le(self.epoch);
        b.put_u64_le(self.term);
        b.put_u64_le(self.nonce);
        let crc = crc32c::crc32c(&b);
        b.put_u32_le(crc);
        b.freeze()
    }

    pub fn decode(b: &[u8]) -> Result<Self, String> {
        let b = check_fixed(b, CLAIM_MAGIC, CLAIM_LEN, "epoch claim")?;
        Ok(Self {
            epoch: u64_at(b, 12),
            term: u64_at(b, 20),
            nonce: u64_at(b, 28),
        })
    }
}

/// One fragment of a sealed segment, as its manifest lists it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FragEntry {
    pub count: u32,
    pub size: u32,
}

/// The index of a sealed segment: where its fragments start, without listing or reading them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    pub first_id: u64,
    pub frags: Vec<FragEntry>,
}

impl Manifest {
    pub fn end_id(&self) -> u64 {
        self.first_id + self.frags.iter().map(|f| u64::from(f.count)).sum::<u64>()
    }

    pub fn bytes(&self) -> u64 {
        self.frags.iter().map(|f| u64::from(f.size)).sum()
    }

    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(28 + 8 * self.frags.len());
        b.put_slice(MANIFEST_MAGIC);
        b.put_u32_le(VERSION);
        b.put_u64_le(self.first_id);
        b.put_u32_le(self.frags.len() as u32);
        for f in &self.frags {
            b.put_u32_le(f.count);
            b.put_u32_le(f.size);
        }
        let crc = crc32c::crc32c(&b);
        b.put_u32_le(crc);
        b.freeze()
    }

    pub fn decode(b: &[u8]) -> Result<Self, String> {
        let b = check_tail(b, MANIFEST_MAGIC, "manifest")?;
        if b.len() < 24 {
            return Err("manifest: too short".into());
        }
        let n = u32_at(b, 20) as usize;
        if b.len() != 24 + 8 * n {
            return Err(format!("manifest: {} bytes for {n} fragments", b.len() + 4));
        }
        let frags = (0..n)
            .map(|i| FragEntry {
                count: u32_at(b, 24 + 8 * i),
                size: u32_at(b, 28 + 8 * i),
            })
            .collect();
        Ok(Self {
            first_id: u64_at(b, 12),
            frags,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn fragment(records: &[Vec<u8>]) -> Bytes {
        let mut f = FragmentBuilder::new(64);
        for r in records {
            f.push(r);
        }
        f.finish(7, 100, 3)
    }

    #[test]
    fn fences_claims_and_manifests_round_trip_and_any_flip_is_caught() {
        let fence = Fence { epoch: 3, term: 9 }.encode();
        let claim = Claim {
            epoch: 3,
            term: 9,
            nonce: 0xfeed,
        }
        .encode();
        let m = Manifest {
            first_id: 10,
            frags: vec![
                FragEntry { count: 3, size: 99 },
                FragEntry { count: 1, size: 50 },
            ],
        };
        assert_eq!(m.end_id(), 14);
        let manifest = m.encode();
        assert_eq!(Fence::decode(&fence), Ok(Fence { epoch: 3, term: 9 }));
        assert_eq!(Claim::decode(&claim).map(|c| c.nonce), Ok(0xfeed));
        assert_eq!(Manifest::decode(&manifest).as_ref(), Ok(&m));
        assert!(matches!(
            decode_at_fragment_key(&fence),
            Ok(AtFragmentKey::Fence(_))
        ));
        for i in 0..fence.len() {
            let mut d = fence.to_vec();
            d[i] ^= 0x10;
            assert!(Fence::decode(&d).is_err(), "fence flip at {i}");
        }
        for i in 0..manifest.len() {
            let mut d = manifest.to_vec();
            d[i] ^= 0x10;
            assert!(Manifest::decode(&d).is_err(), "manifest flip at {i}");
        }
    }

    proptest! {
        #[test]
        fn fragments_round_trip_and_any_single_flip_is_detected(
            records in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..200), 0..8),
            flip in any::<prop::sample::Index>(),
        ) {
            let b = fragment(&records);
            let (h, got) = decode_fragment(&b).expect("decodes");
            prop_assert_eq!(h.first_id, 100);
            prop_assert_eq!(h.epoch, 7);
            prop_assert_eq!(h.count as usize, records.len());
            prop_assert_eq!(got.iter().map(|r| r.to_vec()).collect::<Vec<_>>(), records);
            let mut d = b.to_vec();
            let i = flip.index(d.len());
            d[i] ^= 0x01;
            prop_assert!(decode_fragment(&Bytes::from(d)).is_err());
        }

        #[test]
        fn any_bytes_decode_to_an_error_or_a_value_never_a_panic(
            b in proptest::collection::vec(any::<u8>(), 0..120),
        ) {
            let b = Bytes::from(b);
            let _ = decode_fragment(&b);
            let _ = Manifest::decode(&b);
            let _ = Claim::decode(&b);
            let _ = Fence::decode(&b);
        }
    }
}
