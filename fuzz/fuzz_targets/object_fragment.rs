//! What the object-storage WAL reads back from a store: fragments (or fences at fragment
//! keys), manifests and epoch claims. Arbitrary bytes must decode to a value or an error,
//! never a panic, and a fragment that decodes must hold records that fit its bytes.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use walden_wal_object::format::{Claim, Fence, Manifest, decode_at_fragment_key, decode_fragment};

fuzz_target!(|data: &[u8]| {
    let b = Bytes::copy_from_slice(data);
    if let Ok((h, records)) = decode_fragment(&b) {
        assert_eq!(records.len(), h.count as usize);
        assert!(records.iter().map(|r| r.len()).sum::<usize>() <= data.len());
    }
    let _ = decode_at_fragment_key(data);
    if let Ok(m) = Manifest::decode(data) {
        assert_eq!(Manifest::decode(&m.encode()).as_ref(), Ok(&m));
    }
    let _ = Claim::decode(data);
    let _ = Fence::decode(data);
});
