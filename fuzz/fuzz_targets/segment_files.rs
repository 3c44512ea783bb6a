//! Compaction reads data and delta files back from the object store, where bytes can be
//! damaged: any input must give batches or a typed error, never a panic that escapes, never a
//! hang. Seeded with a data file and a delta file written by the flusher.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use walden_segment_format::{Deletes, decode, read_deletes};

// The Parquet reader panics on some malformed input; `decode` catches that with
// `catch_unwind`. libFuzzer's panic hook aborts before unwinding, so put a quiet hook back: a
// panic that escapes `decode` still aborts (it crosses into C).
fuzz_target!(init: { std::panic::set_hook(Box::new(|_| {})) }, |data: &[u8]| {
    let bytes = Bytes::copy_from_slice(data);
    if let Ok(batches) = decode(bytes.clone()) {
        let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
        let mut deletes = Deletes::new();
        if let Ok(n) = read_deletes(bytes, &mut deletes) {
            assert_eq!(n as usize, rows, "every row of a delta file is a delete");
        }
    }
});
