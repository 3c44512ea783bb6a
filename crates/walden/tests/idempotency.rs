//! Idempotent producers: responses are lost (a proxy cuts connections mid-stream), producers
//! resend what was not acknowledged, and the WAL still holds every message exactly once.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::{collections::HashMap, time::Duration};

use bytes::Bytes;
use common::{Server, http_get, metric};
use rand::{Rng, SeedableRng, rngs::StdRng};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use walden_client::{Client, ProducerOptions};
use walden_message::{MessageType, MutableMessage};

const PRODUCERS: usize = 4;
const MESSAGES: usize = 1500;

/// Forwards 127.0.0.1 connections to `upstream`, cutting each one after a random number of
/// response bytes: requests may have been served, their answers are lost.
async fn lossy_proxy(listener: TcpListener, upstream: String) {
    let mut rng = StdRng::seed_from_u64(7);
    loop {
        let Ok((client, _)) = listener.accept().await else {
            return;
        };
        let budget: usize = rng.random_range(2_000..40_000);
        let upstream = upstream.clone();
        tokio::spawn(async move {
            let Ok(server) = TcpStream::connect(&upstream).await else {
                return;
            };
            let (mut cr, mut cw) = client.into_split();
            let (mut sr, mut sw) = server.into_split();
            let up = tokio::io::copy(&mut cr, &mut sw);
            let down = async {
                let mut buf = vec![0u8; 4096];
                let mut sent = 0;
                while sent < budget {
                    let n = sr.read(&mut buf).await.unwrap_or(0);
                    if n == 0 {
                        break;
                    }
                    let n = n.min(budget - sent);
                    if cw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                    sent += n;
                }
            };
            // Whichever ends first, both directions are dropped: the connection is cut.
            tokio::select! {
                _ = up => {}
                () = down => {}
            }
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_appends_after_lost_responses_are_written_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(
        &dir.path().join("data"),
        Some("[node]\npchannels = 2\n"),
        true,
    )
    .await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(lossy_proxy(listener, server.addr.clone()));

    let mut tasks = Vec::new();
    for p in 0..PRODUCERS {
        let proxy_addr = proxy_addr.clone();
        tasks.push(tokio::spawn(async move {
            let client = Client::connect(&proxy_addr).await.unwrap();
            let producer = client.producer(
                &format!("walden-dml-{}", p % 2),
                ProducerOptions {
                    max_in_flight: 32,
                    retry_timeout: Duration::from_secs(60),
                    ..ProducerOptions::default()
                },
            );
            let mut pending = Vec::new();
            for i in 0..MESSAGES {
                let msg = MutableMessage::new(
                    MessageType::Data,
                    format!("v{p}"),
                    Bytes::from(format!("p{p}-m{i}")),
                );
                pending.push(producer.send(msg).await.unwrap());
            }
            let mut ids = Vec::new();
            for f in pending {
                ids.push(
                    f.await
                        .expect("every message is eventually acknowledged")
                        .id,
                );
            }
            ids
        }));
    }
    let mut acked = Vec::new();
    for t in tasks {
        acked.push(t.await.unwrap());
    }

    let metrics = server.metrics_addr.clone().unwrap();
    let duplicates = metric(
        &http_get(&metrics, "/metrics").await.1,
        "walden_duplicates_total",
    );
    assert!(
        duplicates > 0.0,
        "no retry of a written message happened: the test did not exercise deduplication"
    );

    // Read the WAL directly (not through the proxy).
    let client = server.client().await;
    let mut count: HashMap<String, usize> = HashMap::new();
    for pc in 0..2 {
        for m in common::read_to_end(&client, &format!("walden-dml-{pc}")).await {
            if m.message_type() == MessageType::Data {
                *count
                    .entry(String::from_utf8(m.payload.to_vec()).unwrap())
                    .or_default() += 1;
            }
        }
    }
    let twice: Vec<_> = count.iter().filter(|(_, n)| **n > 1).take(5).collect();
    assert!(twice.is_empty(), "written more than once: {twice:?}");
    assert_eq!(
        count.len(),
        PRODUCERS * MESSAGES,
        "every message was written"
    );
    for (p, ids) in acked.iter().enumerate() {
        assert!(
            ids.windows(2).all(|w| w[0] < w[1]),
            "producer {p}: acknowledged ids follow send order"
        );
    }
    eprintln!("{duplicates} retried appends were answered with their original result");
}
