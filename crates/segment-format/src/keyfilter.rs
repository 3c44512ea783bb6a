//! A bloom filter of a segment's primary keys: what a delegator holds of a segment on a query
//! node, to forward a delete only to the nodes whose segments may hold its key.

use crate::{FormatError, Pk};

/// Bits per key: about 1 % false positives with [`HASHES`] probes.
const BITS_PER_KEY: usize = 10;
const HASHES: u32 = 7;
/// Largest filter accepted from the wire (64 MiB of bits: 50 M keys).
const MAX_WORDS: usize = 1 << 23;

/// The set of a segment's keys, with false positives and no false negatives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyFilter {
    words: Vec<u64>,
}

/// A stable 64-bit hash of a key (the same in every process and version: filters cross the
/// network).
fn hash(pk: &Pk) -> u64 {
    match pk {
        Pk::Int(i) => mix(*i as u64 ^ 0x9e37_79b9_7f4a_7c15),
        Pk::Str(s) => {
            // FNV-1a, then a final mix.
            let mut h: u64 = 0xcbf2_9ce4_8422_2325;
            for b in s.as_bytes() {
                h ^= u64::from(*b);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
            mix(h)
        }
    }
}

/// splitmix64's finalizer.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl KeyFilter {
    /// A filter of `keys` (`n` of them, for sizing).
    pub fn new<'a>(n: usize, keys: impl IntoIterator<Item = &'a Pk>) -> Self {
        let words = (n * BITS_PER_KEY).div_ceil(64).clamp(1, MAX_WORDS);
        let mut f = Self {
            words: vec![0; words],
        };
        for k in keys {
            let probes: Vec<usize> = f.probes(k).collect();
            for bit in probes {
                f.words[bit / 64] |= 1 << (bit % 64);
            }
        }
        f
    }

    fn probes(&self, pk: &Pk) -> impl Iterator<Item = usize> + use<> {
        let bits = (self.words.len() * 64) as u64;
        let h = hash(pk);
        let (a, b) = (h, (h >> 32) | 1);
        (0..u64::from(HASHES)).map(move |i| (a.wrapping_add(i.wrapping_mul(b)) % bits) as usize)
    }

    /// False only when no key of the set is `pk`.
    pub fn may_contain(&self, pk: &Pk) -> bool {
        self.probes(pk)
            .all(|bit| self.words[bit / 64] & (1 << (bit % 64)) != 0)
    }

    /// Little-endian words.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.words.iter().flat_map(|w| w.to_le_bytes()).collect()
    }

    /// The filter `to_bytes` wrote; an error for anything else.
    pub fn from_bytes(b: &[u8]) -> Result<Self, FormatError> {
        if b.is_empty() || !b.len().is_multiple_of(8) || b.len() / 8 > MAX_WORDS {
            return Err(FormatError(format!(
                "a key filter of {} bytes (a positive multiple of 8, at most {} expected)",
                b.len(),
                MAX_WORDS * 8
            )));
        }
        Ok(Self {
            words: b
                .chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
                .collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_filter_has_no_false_negatives_few_false_positives_and_round_trips() {
        let keys: Vec<Pk> = (0..10_000)
            .map(Pk::Int)
            .chain((0..1000).map(|i| Pk::Str(format!("k{i}"))))
            .collect();
        let f = KeyFilter::new(keys.len(), &keys);
        assert!(keys.iter().all(|k| f.may_contain(k)));
        let false_hits = (100_000..110_000)
            .filter(|i| f.may_contain(&Pk::Int(*i)))
            .count();
        assert!(false_hits < 300, "{false_hits} false positives of 10 000");
        let back = KeyFilter::from_bytes(&f.to_bytes()).unwrap();
        assert_eq!(back, f);
        assert!(KeyFilter::from_bytes(&[1, 2, 3]).is_err());
        assert!(KeyFilter::from_bytes(&[]).is_err());
    }
}
