//! The shared local log's parsers (index files, record bodies, segment names) must never panic
//! on arbitrary bytes, and an index they accept must encode back to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    walden_wal_local::shared::parse_untrusted(data);
});
