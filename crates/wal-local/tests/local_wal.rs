//! The local WAL against the conformance suite, the fault-injecting file system and damage.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::faults;

use std::{path::Path, sync::Arc};

use faults::{append_some, read_all, small_segments};
use walden_common::{MessageId, Term};
use walden_wal_api::{ReadFrom, WalError, WalStorage};
use walden_wal_local::{
    LocalWalConfig, LocalWalStorage,
    fs::{FaultFs, FileSystem, StdFs},
};

layout_suite!(LocalWalStorage, "seg");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_storage_on_the_same_directory_cannot_open_the_pchannel() {
    let dir = tempfile::tempdir().unwrap();
    let a = LocalWalStorage::new(dir.path(), LocalWalConfig::default());
    let b = LocalWalStorage::new(dir.path(), LocalWalConfig::default());
    let wal = a.open("p", Term(1)).await.unwrap();
    let err = b.open("p", Term(2)).await.unwrap_err();
    assert!(matches!(err, WalError::Locked { .. }), "got {err:?}");
    wal.close().await.unwrap();
    drop(wal);
    b.open("p", Term(2)).await.expect("free once closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_cross_segments_and_truncation_removes_whole_segments_only() {
    let dir = tempfile::tempdir().unwrap();
    let storage = LocalWalStorage::new(dir.path(), small_segments());
    let wal = storage.open("p", Term(1)).await.unwrap();
    let (acked, _) = append_some(&wal, 0, 200).await;
    let got = read_all(&wal).await;
    assert_eq!(got.len(), 200);
    for (id, p) in &got {
        assert_eq!(acked.get(id), Some(p));
    }
    // Start in the middle of a later segment.
    let mut r = wal.read(ReadFrom::At(MessageId(150))).unwrap();
    assert_eq!(r.next().await.unwrap().unwrap().1, acked[&MessageId(150)]);

    let before = wal.size_bytes();
    wal.truncate(MessageId(120)).await.unwrap();
    let first = wal.first_id();
    assert!(
        first > MessageId(0) && first <= MessageId(120),
        "first = {first}"
    );
    assert!(wal.size_bytes() < before);
    let on_disk = count_segments(&dir.path().join("p"));
    wal.close().await.unwrap();
    drop(wal);
    let wal = storage.open("p", Term(2)).await.unwrap();
    assert_eq!(wal.first_id(), first, "truncation survives reopening");
    assert_eq!(count_segments(&dir.path().join("p")), on_disk + 1);
    assert_eq!(read_all(&wal).await.len() as u64, 200 - first.0);
}

fn count_segments(dir: &Path) -> usize {
    StdFs
        .list(dir)
        .unwrap()
        .iter()
        .filter(|n| n.ends_with(".seg"))
        .count()
}
