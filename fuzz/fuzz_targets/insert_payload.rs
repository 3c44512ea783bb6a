//! The node runs this on every Insert/Upsert payload: arbitrary bytes must be refused with a
//! typed error (never a panic that escapes, never a hang), and whatever validates must decode.
//! Seed it with a real payload (`fuzz/corpus/insert_payload/`, e.g. an Insert's payload from a WAL).
#![no_main]

use libfuzzer_sys::fuzz_target;
use walden_schema::Schema;

const SCHEMA: &str = r#"{"fields":[{"name":"id","type":"int64","primary_key":true},{"name":"emb","type":"float_vector","dim":4},{"name":"title","type":"string"}]}"#;

// The Arrow reader panics on some malformed input; `validate_ipc` catches that with
// `catch_unwind` and refuses the payload. libFuzzer's panic hook aborts before unwinding, so put
// a quiet hook back: a panic that escapes `validate_ipc` still aborts (it crosses into C).
fuzz_target!(init: { std::panic::set_hook(Box::new(|_| {})) }, |data: &[u8]| {
    let schema = Schema::from_json(SCHEMA).expect("valid schema");
    if let Ok(rows) = schema.validate_ipc(data) {
        let batches = walden_schema::decode_ipc(data).expect("validated payloads decode");
        let n: usize = batches.iter().map(|b| b.num_rows()).sum();
        assert_eq!(n as u64, rows);
    }
});
