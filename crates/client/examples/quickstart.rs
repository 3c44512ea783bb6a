//! Appends a few messages and reads them back.
//!
//! Start a server (`cargo run --release -p walden -- standalone`), then:
//!
//! ```sh
//! cargo run -p walden-client --example quickstart [ADDR]
//! ```

use bytes::Bytes;
use walden_client::{Client, ConsumerOptions, DeliverFrom, ProducerOptions};
use walden_message::{MessageType, MutableMessage, type_name};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:19540".into());
    let client = Client::connect(&addr).await?;
    let pchannel = "walden-dml-0";

    // Pipelined: queue all three, then wait for the acknowledgements (they arrive in order).
    let producer = client.producer(pchannel, ProducerOptions::default());
    let mut pending = Vec::new();
    for text in ["alpha", "beta", "gamma"] {
        let msg = MutableMessage::new(MessageType::Data, "example", Bytes::from(text));
        pending.push(producer.send(msg).await?);
    }
    let mut first = None;
    for p in pending {
        let placed = p.await?;
        println!("appended id={} tick={}", placed.id, placed.tick);
        first.get_or_insert(placed.id);
    }

    // Read them back: start at the first one, only this vchannel.
    let mut consumer = client.consumer(
        pchannel,
        ConsumerOptions {
            from: DeliverFrom::StartFrom(first.unwrap_or_default()),
            vchannel: Some("example".into()),
            types: Some(vec![MessageType::Data]),
            ..ConsumerOptions::default()
        },
    );
    for _ in 0..3 {
        let Some(m) = consumer.next().await else {
            break;
        };
        let m = m?;
        println!(
            "read     id={} tick={} {} {:?}",
            m.id,
            m.time_tick(),
            type_name(m.message_type()),
            String::from_utf8_lossy(&m.payload)
        );
    }
    Ok(())
}
