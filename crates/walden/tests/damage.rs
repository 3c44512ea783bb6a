//! A damaged record in the shared log, on a real server: only the pchannel whose record it is
//! is affected (the others open and take writes), that pchannel reports CORRUPTED with the
//! exact ids in `status` and `/healthz` and serves every intact record before and after them,
//! `walden wal check` finds it offline, and `walden wal skip-damaged` lets it serve again,
//! leaving an audit record.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::{path::Path, process::Command, time::Duration};

use bytes::Bytes;
use common::{Server, WALDEN, http_get};
use walden_client::{Client, ConsumerOptions, DeliverFrom, ProducerOptions};
use walden_common::{ErrorCode, HasErrorCode, MessageId};
use walden_message::{ImmutableMessage, MessageType, MutableMessage};

const DAMAGED: &str = "walden-dml-1";

fn msg(text: String) -> MutableMessage {
    let mut payload = text.into_bytes();
    payload.resize(300, b'.');
    MutableMessage::new(MessageType::Data, "v", Bytes::from(payload))
}

/// Flips a byte inside the stored record whose payload starts with `marker`.
fn damage(wal: &Path, marker: &[u8]) {
    for entry in std::fs::read_dir(wal.join("log")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "log") {
            continue;
        }
        let mut b = std::fs::read(&path).unwrap();
        if let Some(at) = b.windows(marker.len()).position(|w| w == marker) {
            b[at + marker.len() + 5] ^= 0x5a;
            std::fs::write(&path, &b).unwrap();
            return;
        }
    }
    panic!("marker not found");
}

/// Data messages of `pchannel` from `from`, until an error or `n` messages.
async fn consume(
    client: &Client,
    pchannel: &str,
    from: DeliverFrom,
    n: usize,
) -> (Vec<ImmutableMessage>, Option<walden_client::ClientError>) {
    let mut c = client.consumer(
        pchannel,
        ConsumerOptions {
            from,
            retry_timeout: Duration::ZERO,
            ..ConsumerOptions::default()
        },
    );
    let mut got = Vec::new();
    while got.len() < n {
        match tokio::time::timeout(Duration::from_secs(10), c.next()).await {
            Ok(Some(Ok(m))) if m.message_type() == MessageType::Data => got.push(m),
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(e))) => return (got, Some(e)),
            Ok(None) => break,
            Err(_) => panic!("consume stalled after {} messages", got.len()),
        }
    }
    (got, None)
}

fn text(m: &ImmutableMessage) -> String {
    String::from_utf8_lossy(&m.payload)
        .trim_end_matches('.')
        .to_owned()
}

async fn state(client: &Client, pchannel: &str) -> (String, String) {
    let s = client.status().await.unwrap();
    let p = s.pchannels.iter().find(|p| p.name == pchannel).unwrap();
    (p.state.clone(), p.state_detail.clone())
}

fn wal(args: &[&str], data: &Path) -> std::process::Output {
    Command::new(WALDEN)
        .arg("wal")
        .args(args)
        .arg("--data-dir")
        .arg(data)
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_record_is_confined_to_its_pchannel_and_can_be_skipped_with_an_audit_record() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut server = Server::start_with(
        &data,
        Some("[node]\npchannels = 3\n[wal_local]\nsegment_bytes = 65536\n"),
        true,
    )
    .await;
    let client = server.client().await;
    let producers: Vec<_> = (0..3)
        .map(|p| client.producer(&format!("walden-dml-{p}"), ProducerOptions::default()))
        .collect();
    // Every pchannel, then the damaged one alone (so the damage touches only its records),
    // then every pchannel again.
    for i in 0..100 {
        for (p, producer) in producers.iter().enumerate() {
            producer.append(msg(format!("p{p}-a{i:03}"))).await.unwrap();
        }
    }
    for i in 0..100 {
        producers[1]
            .append(msg(format!("p1-b{i:03}")))
            .await
            .unwrap();
    }
    for i in 0..100 {
        for (p, producer) in producers.iter().enumerate() {
            producer.append(msg(format!("p{p}-c{i:03}"))).await.unwrap();
        }
    }
    let all_p1 = consume(&client, DAMAGED, DeliverFrom::All, 300).await.0;
    let damaged_id = all_p1.iter().find(|m| text(m) == "p1-b050").unwrap().id;
    server.stop();
    damage(&data.join("wal"), b"p1-b050");

    // Offline: the check names the damaged ids of that pchannel only, and fails.
    let out = wal(&["check"], &data);
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{report}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("CORRUPTED(9)"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let expected = format!("damaged ids {}..{}", damaged_id, damaged_id.0 + 1);
    let line = |p: &str| {
        report
            .lines()
            .find(|l| l.starts_with(&format!("{p}:")))
            .unwrap_or_else(|| panic!("{p} missing from:\n{report}"))
            .to_owned()
    };
    assert!(line(DAMAGED).contains(&expected), "{report}");
    assert!(!line("walden-dml-0").contains("damaged"), "{report}");
    assert!(!line("walden-dml-2").contains("damaged"), "{report}");

    // Online: the server starts; only the damaged pchannel reports it, with the exact ids.
    server.restart().await;
    let client = server.client().await;
    let (st, detail) = state(&client, DAMAGED).await;
    assert_eq!(st, "corrupted", "{detail}");
    assert!(
        detail.contains(&format!("{}..{}", damaged_id, damaged_id.0 + 1)),
        "{detail}"
    );
    for p in ["walden-dml-0", "walden-dml-2"] {
        assert_eq!(state(&client, p).await.0, "serving");
        let r = client
            .producer(p, ProducerOptions::default())
            .append(msg(format!("{p}-after")))
            .await
            .unwrap();
        assert!(r.id.0 > 0);
    }
    let (code, body) = http_get(server.metrics_addr.as_ref().unwrap(), "/healthz").await;
    assert_eq!(code, 503);
    assert!(
        body.contains(DAMAGED) && body.contains("corrupted"),
        "{body}"
    );
    assert!(!body.contains("walden-dml-0"), "{body}");

    // Every intact record before the damage is read, then CORRUPTED names the range...
    let (before, err) = consume(&client, DAMAGED, DeliverFrom::All, 1000).await;
    let err = err.expect("the damaged record must be reported");
    assert_eq!(err.code(), ErrorCode::Corrupted, "{err}");
    assert!(
        err.to_string()
            .contains(&format!("records {}..{}", damaged_id, damaged_id.0 + 1)),
        "{err}"
    );
    let expected_before: Vec<String> = all_p1
        .iter()
        .take_while(|m| m.id < damaged_id)
        .map(text)
        .collect();
    assert_eq!(before.iter().map(text).collect::<Vec<_>>(), expected_before);
    // ...and every intact record after it is read from past it.
    let expected_after: Vec<String> = all_p1
        .iter()
        .filter(|m| m.id > damaged_id)
        .map(text)
        .collect();
    let (after, err) = consume(
        &client,
        DAMAGED,
        DeliverFrom::StartAfter(damaged_id),
        expected_after.len(),
    )
    .await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(after.iter().map(text).collect::<Vec<_>>(), expected_after);
    // Writes to the damaged pchannel are refused: its state past the damage is unknown.
    let err = client
        .producer(
            DAMAGED,
            ProducerOptions {
                retry_timeout: Duration::ZERO,
                ..ProducerOptions::default()
            },
        )
        .append(msg("refused".into()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), ErrorCode::Corrupted, "{err}");

    // The operator skips it: an audit record, printed; then the pchannel serves again.
    server.stop();
    let out = wal(
        &[
            "skip-damaged",
            "--pchannel",
            DAMAGED,
            "--reason",
            "bit rot in test",
        ],
        &data,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        printed.contains(&format!(
            "skipped {DAMAGED} ids {}..{}",
            damaged_id,
            damaged_id.0 + 1
        )),
        "{printed}"
    );
    let audit = std::fs::read_to_string(data.join("wal").join(DAMAGED).join("SKIPPED")).unwrap();
    assert!(audit.contains("bit rot in test"), "{audit}");
    let out = wal(&["check"], &data);
    assert!(
        out.status.success(),
        "a skipped range still fails the check:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    server.restart().await;
    let client = server.client().await;
    assert_eq!(state(&client, DAMAGED).await.0, "serving");
    let (all, err) = consume(&client, DAMAGED, DeliverFrom::All, 299).await;
    assert!(err.is_none(), "{err:?}");
    let expected: Vec<String> = all_p1
        .iter()
        .filter(|m| m.id != damaged_id)
        .map(text)
        .collect();
    assert_eq!(all.iter().map(text).collect::<Vec<_>>(), expected);
    let r = client
        .producer(DAMAGED, ProducerOptions::default())
        .append(msg("after-skip".into()))
        .await
        .unwrap();
    assert!(r.id > MessageId(all.last().unwrap().id.0));
}
