//! A full disk, on a small tmpfs the test mounts: writes are refused with RESOURCE_EXHAUSTED
//! naming the disk (no reopen, no new term), kill -9 and a restart on a disk filled to the last
//! byte still serve every acknowledged message, `walden produce` on a full disk ends within
//! one retry window, and writes resume by themselves once space is freed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use bytes::Bytes;
use common::{Server, read_to_end};
use walden_client::{Client, ClientError, ProducerOptions};
use walden_common::{ErrorCode, HasErrorCode};
use walden_message::{MessageType, MutableMessage};

const PCH: &str = "walden-dml-0";

/// A tmpfs mounted for the test, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Option<Self> {
        std::fs::create_dir_all(at).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Self(at.to_owned()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn producer(client: &Client) -> walden_client::Producer {
    client.producer(
        PCH,
        ProducerOptions {
            retry_timeout: Duration::ZERO,
            ..ProducerOptions::default()
        },
    )
}

fn message(i: usize) -> MutableMessage {
    let mut payload = format!("m{i:06}-").into_bytes();
    payload.resize(64 << 10, b'x');
    MutableMessage::new(MessageType::Data, "v", Bytes::from(payload))
}

fn code_of(e: &ClientError) -> ErrorCode {
    match e {
        ClientError::RetriesExhausted { last, .. } => last.code(),
        other => other.code(),
    }
}

async fn state_and_term(client: &Client) -> (String, String, u64) {
    let s = client.status().await.unwrap();
    let p = s.pchannels.iter().find(|p| p.name == PCH).unwrap();
    (p.state.clone(), p.state_detail.clone(), p.term)
}

/// Fills the file system until it refuses a byte more.
fn fill(path: &Path) -> u64 {
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0xa5u8; 64 << 10];
    let mut n = 0u64;
    while f.write_all(&chunk).is_ok() {
        n += chunk.len() as u64;
    }
    let mut one = [0u8; 1];
    while f.write_all(&one).is_ok() {
        one[0] ^= 1;
        n += 1;
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_writes_serves_reads_after_kill_9_and_resumes_when_freed() {
    let dir = tempfile::tempdir().unwrap();
    let Some(mnt) = Tmpfs::mount(&dir.path().join("mnt"), "40m") else {
        assert!(
            !rustix_is_root(),
            "root could not mount a tmpfs: this test needs one"
        );
        eprintln!("skipped: mounting a tmpfs needs root");
        return;
    };
    let mut server = Server::start(
        &mnt.0.join("data"),
        Some(
            "[node]\npchannels = 2\n\
             [wal_local]\nsegment_bytes = 4194304\nmin_free_bytes = 16777216\n",
        ),
    )
    .await;
    let client = server.client().await;
    let (state, _, term0) = state_and_term(&client).await;
    assert_eq!(state, "serving");

    // Write until the disk is "full": the refusal is RESOURCE_EXHAUSTED and names the disk.
    let p = producer(&client);
    let mut acked = Vec::new();
    let refusal = loop {
        assert!(acked.len() < 2000, "40 MiB never filled");
        match p.append(message(acked.len())).await {
            Ok(r) => acked.push(r.id),
            Err(e) => break e,
        }
    };
    assert_eq!(code_of(&refusal), ErrorCode::ResourceExhausted, "{refusal}");
    assert!(refusal.is_retryable() || matches!(refusal, ClientError::RetriesExhausted { .. }));
    assert!(refusal.to_string().contains("disk full"), "{refusal}");
    assert!(acked.len() > 100, "only {} messages fit", acked.len());
    // Refused writes do not reopen the pchannel: the term stays.
    for i in 0..5 {
        assert!(p.append(message(100_000 + i)).await.is_err());
    }
    let (state, detail, term) = state_and_term(&client).await;
    assert_eq!((state.as_str(), term), ("read_only", term0), "{detail}");

    // kill -9, then something else takes the last byte of the disk.
    server.kill();
    let filler = mnt.0.join("filler");
    fill(&filler);
    server.restart().await;
    let client = server.client().await;
    let (state, detail, term) = state_and_term(&client).await;
    assert_eq!(state, "read_only", "{detail}");
    assert_eq!(term, term0 + 1, "one new term per real reopen");
    // Every acknowledged message is read back, once, in order.
    let stored: Vec<_> = read_to_end(&client, PCH)
        .await
        .into_iter()
        .filter(|m| m.message_type() == MessageType::Data)
        .collect();
    let ids: Vec<_> = stored.iter().map(|m| m.id).collect();
    assert_eq!(ids, acked, "acknowledged messages lost or duplicated");
    for (i, m) in stored.iter().enumerate() {
        assert!(m.payload.starts_with(format!("m{i:06}-").as_bytes()));
    }
    let err = producer(&client).append(message(0)).await.unwrap_err();
    assert_eq!(code_of(&err), ErrorCode::ResourceExhausted, "{err}");
    // A script piping into `walden produce` ends within one retry window, not one per line.
    let addr = server.addr.clone();
    let run = tokio::task::spawn_blocking(move || {
        common::produce_through(
            &[
                "--pchannel",
                PCH,
                "--vchannel",
                "v",
                "--addr",
                &addr,
                "--retry-timeout",
                "5",
            ],
            "full",
            2000,
            0,
            Duration::from_secs(60),
            || {},
        )
    })
    .await
    .unwrap();
    common::assert_ended_honestly(&run, 2000, Duration::from_secs(10), "full disk");
    assert_eq!(run.refused(), 2000, "nothing fits on a full disk");
    eprintln!(
        "full disk: ended {:?} after the start: {}",
        run.after_fault,
        run.stderr.lines().last().unwrap_or_default()
    );
    assert!(run.stderr.contains("RESOURCE_EXHAUSTED"), "{}", run.stderr);

    // Space comes back: writes resume by themselves, under the same term.
    std::fs::remove_file(&filler).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let p = producer(&client);
    let r = loop {
        match p.append(message(acked.len())).await {
            Ok(r) => break r,
            Err(e) => {
                assert_eq!(code_of(&e), ErrorCode::ResourceExhausted, "{e}");
                assert!(Instant::now() < deadline, "writes never resumed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    assert!(r.id > *acked.last().unwrap());
    let (state, _, term) = state_and_term(&client).await;
    assert_eq!((state.as_str(), term), ("serving", term0 + 1));
    drop(server);
}

fn rustix_is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0"))
}
