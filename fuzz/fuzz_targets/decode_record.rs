//! The message record decoder must return a message or a typed error for any input, and a
//! decoded message must encode back to a record that decodes to the same message.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use walden_common::MessageId;
use walden_message::codec;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = codec::decode(MessageId(1), Bytes::copy_from_slice(data)) {
        let mut buf = Vec::new();
        codec::encode_into(&m.header, &m.payload, &mut buf);
        let again = codec::decode(MessageId(1), Bytes::from(buf)).expect("re-encoded record decodes");
        assert_eq!(again, m);
    }
});
