//! A payload that makes the Arrow reader panic is refused with the panic's message, and the
//! panic hook stays silent for it (a server's stderr must not show a crash for bad input),
//! while panics elsewhere still reach the hook installed before. A test binary of its own: it
//! installs a panic hook, which is process-wide.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::json;
use walden_common::{ErrorCode, HasErrorCode};
use walden_schema::{Schema, decode_ipc};

static HOOK_CALLS: AtomicUsize = AtomicUsize::new(0);

#[test]
fn a_payload_that_panics_the_reader_is_refused_without_a_panic_message() {
    std::panic::set_hook(Box::new(|_| {
        HOOK_CALLS.fetch_add(1, Ordering::SeqCst);
    }));
    let schema = Schema::from_json(
        r#"{"fields":[
            {"name":"id","type":"int64","primary_key":true},
            {"name":"emb","type":"float_vector","dim":4},
            {"name":"title","type":"string"},
            {"name":"score","type":"double","nullable":true},
            {"name":"meta","type":"json","nullable":true}
        ]}"#,
    )
    .unwrap();
    let rows: Vec<_> = (0..3i64)
        .map(|i| json!({"id": i, "emb": [i as f64, 0.5, 0.25, 1.0], "title": format!("t{i}")}))
        .collect();
    let mut payload = schema
        .encode_ipc(&schema.rows_from_json(&rows).unwrap())
        .unwrap()
        .to_vec();
    // Found by flipping bytes of this payload: it sends the reader's buffer slicing out of
    // bounds (arrow 60).
    payload[470] ^= 0x80;

    let err = decode_ipc(&payload).unwrap_err();
    assert_eq!(err.code(), ErrorCode::InvalidArgument, "{err}");
    assert!(
        err.to_string().contains("the reader gave up: "),
        "the panic's message is in the error: {err}"
    );
    assert!(schema.validate_ipc(&payload).is_err());
    assert_eq!(
        HOOK_CALLS.load(Ordering::SeqCst),
        0,
        "the refusal reached the panic hook"
    );

    // Any other panic still reaches the hook that was there before.
    assert!(std::panic::catch_unwind(|| panic!("elsewhere")).is_err());
    assert_eq!(HOOK_CALLS.load(Ordering::SeqCst), 1);
}
