//! Key filters arrive from query nodes over the network: any bytes must decode to a filter or
//! give an error (never a panic), and a decoded filter must answer lookups without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use walden_segment_format::{KeyFilter, Pk};

fuzz_target!(|data: &[u8]| {
    if let Ok(f) = KeyFilter::from_bytes(data) {
        let _ = f.may_contain(&Pk::Int(i64::from(data.len() as u32)));
        let _ = f.may_contain(&Pk::Str(String::from_utf8_lossy(data).into_owned()));
        assert_eq!(f.to_bytes(), data);
    }
});
