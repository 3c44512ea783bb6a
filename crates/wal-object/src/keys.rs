//! Every object key of a pchannel's log, in one place (layout in `docs/design.md` §3.4).
//!
//! ```text
//! wal/{pchannel}/epoch/{epoch:020}           a writer's claim (create-if-absent)
//! wal/{pchannel}/segs/{seg:010}-{first:020}   one marker per segment, with its first id
//! wal/{pchannel}/seg/{seg:010}/{frag:010}     fragments, dense from 0; or a fence
//! wal/{pchannel}/seg/{seg:010}/manifest       written when the segment is sealed
//! ```
//!
//! Numbers are zero-padded so that a sorted listing is in numeric order.

/// The keys of one pchannel.
#[derive(Clone, Debug)]
pub struct Keys {
    root: String,
}

impl Keys {
    pub fn new(pchannel: &str) -> Self {
        Self {
            root: format!("wal/{pchannel}/"),
        }
    }

    pub fn epochs(&self) -> String {
        format!("{}epoch/", self.root)
    }

    pub fn epoch(&self, epoch: u64) -> String {
        format!("{}epoch/{epoch:020}", self.root)
    }

    pub fn parse_epoch(&self, key: &str) -> Option<u64> {
        number(key.strip_prefix(&self.epochs())?, 20)
    }

    pub fn markers(&self) -> String {
        format!("{}segs/", self.root)
    }

    pub fn marker(&self, seg: u64, first_id: u64) -> String {
        format!("{}segs/{seg:010}-{first_id:020}", self.root)
    }

    /// `(segment, first id)` of a marker key.
    pub fn parse_marker(&self, key: &str) -> Option<(u64, u64)> {
        let (seg, first) = key.strip_prefix(&self.markers())?.split_once('-')?;
        Some((number(seg, 10)?, number(first, 20)?))
    }

    pub fn segment(&self, seg: u64) -> String {
        format!("{}seg/{seg:010}/", self.root)
    }

    pub fn fragment(&self, seg: u64, frag: u64) -> String {
        format!("{}seg/{seg:010}/{frag:010}", self.root)
    }

    pub fn parse_fragment(&self, seg: u64, key: &str) -> Option<u64> {
        number(key.strip_prefix(&self.segment(seg))?, 10)
    }

    pub fn manifest(&self, seg: u64) -> String {
        format!("{}seg/{seg:010}/manifest", self.root)
    }
}

fn number(s: &str, width: usize) -> Option<u64> {
    (s.len() == width && s.bytes().all(|c| c.is_ascii_digit()))
        .then(|| s.parse().ok())
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_parse_back_and_sort_numerically() {
        let k = Keys::new("walden-dml-0");
        assert_eq!(k.parse_epoch(&k.epoch(42)), Some(42));
        assert_eq!(k.parse_marker(&k.marker(3, 1000)), Some((3, 1000)));
        assert_eq!(k.parse_fragment(7, &k.fragment(7, 12)), Some(12));
        assert_eq!(k.parse_fragment(7, &k.manifest(7)), None);
        assert_eq!(k.parse_fragment(7, &k.fragment(8, 1)), None);
        assert!(k.fragment(1, 9) < k.fragment(1, 10));
        assert!(k.marker(9, 5) < k.marker(10, 5));
        // A segment's prefix holds none of another's keys, and no marker.
        assert!(!k.fragment(10, 0).starts_with(&k.segment(1)));
        assert!(!k.marker(0, 0).starts_with("wal/walden-dml-0/seg/"));
    }
}
