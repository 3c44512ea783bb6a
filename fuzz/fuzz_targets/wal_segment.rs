//! Segment header and record parsing must never panic on arbitrary bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use walden_wal_local::format;

fuzz_target!(|data: &[u8]| {
    let _ = format::SegmentHeader::decode(data);
    let mut off = 0;
    while off < data.len() {
        match format::record_at(&data[off..]) {
            format::RecordAt::Valid { start, len } => off += start + len,
            _ => break,
        }
    }
    let _ = format::any_valid_record_after(data, 0);
});
