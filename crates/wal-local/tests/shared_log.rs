//! The shared-log layout of the local WAL (every pchannel in one log) against the conformance
//! suite, the fault-injecting file system and damage, plus what sharing adds: many pchannels
//! in one group commit, truncation per pchannel, ids that never restart.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::faults;

use std::{path::Path, sync::Arc};

use bytes::Bytes;
use faults::{append_some, check_recovered, payload, read_all, small_segments};
use walden_common::{MessageId, Term};
use walden_wal_api::{ReadFrom, WalError, WalStorage};
use walden_wal_local::{
    LocalWalConfig, SharedLogStorage,
    fs::{FaultFs, FileSystem, StdFs},
};

layout_suite!(SharedLogStorage, "log");

/// Without a sound index, a sealed segment is scanned at open: damage in it is then found there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_or_damaged_segment_index_falls_back_to_scanning_the_segment() {
    let fs = FaultFs::new();
    let storage = storage_on(&fs);
    let wal = storage.open("p", Term(1)).await.unwrap();
    let (acked, _) = append_some(&wal, 0, 100).await;
    wal.close().await.unwrap();
    drop(wal);
    drop(storage);
    let indexes: Vec<_> = fs
        .files()
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "idx"))
        .collect();
    assert!(
        indexes.len() >= 2,
        "sealed segments have indexes: {indexes:?}"
    );
    fs.corrupt(&indexes[0], 30);
    fs.remove(&indexes[1]).unwrap();
    let wal = storage_on(&fs).open("p", Term(2)).await.unwrap();
    check_recovered(&read_all(&wal).await, &acked, &[]);
    assert_eq!(wal.append(payload(100)).await.unwrap(), MessageId(100));
    // And a scanned segment is checked: damage there is found at open and reported (the
    // pchannel's damaged ids), never skipped.
    drop(wal);
    let segs = segments(&fs);
    fs.corrupt(&segs[0], 200);
    let wal = storage_on(&fs).open("p", Term(3)).await.unwrap();
    assert_eq!(wal.damaged().len(), 1, "{:?}", wal.damaged());
    let mut r = wal.read(walden_wal_api::ReadFrom::Earliest).unwrap();
    let err = loop {
        match r.next().await {
            Ok(Some(_)) => {}
            Ok(None) => panic!("the damage was skipped"),
            Err(e) => break e,
        }
    };
    assert!(matches!(err, WalError::Corrupted { .. }), "got {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_storage_on_the_same_directory_cannot_open_the_pchannel() {
    let dir = tempfile::tempdir().unwrap();
    let a = SharedLogStorage::new(dir.path(), LocalWalConfig::default());
    let b = SharedLogStorage::new(dir.path(), LocalWalConfig::default());
    let wal = a.open("p", Term(1)).await.unwrap();
    let err = b.open("p", Term(2)).await.unwrap_err();
    assert!(matches!(err, WalError::Locked { .. }), "got {err:?}");
    wal.close().await.unwrap();
    drop(wal);
    // The lock belongs to the storage (one log for every pchannel), not to a handle.
    drop(a);
    b.open("p", Term(2))
        .await
        .expect("free once the first storage is gone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_cross_segments_and_truncation_removes_whole_segments_only() {
    let dir = tempfile::tempdir().unwrap();
    let storage = SharedLogStorage::new(dir.path(), small_segments());
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
    let on_disk = count_segments(&dir.path().join("log"));
    wal.close().await.unwrap();
    drop(wal);
    drop(storage);
    let storage = SharedLogStorage::new(dir.path(), small_segments());
    let wal = storage.open("p", Term(2)).await.unwrap();
    assert_eq!(wal.first_id(), first, "truncation survives reopening");
    assert_eq!(count_segments(&dir.path().join("log")), on_disk);
    assert_eq!(read_all(&wal).await.len() as u64, 200 - first.0);
}

fn count_segments(dir: &Path) -> usize {
    StdFs
        .list(dir)
        .unwrap()
        .iter()
        .filter(|n| n.ends_with(".log"))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_pchannels_share_group_commits_and_truncate_independently() {
    let dir = tempfile::tempdir().unwrap();
    let storage = SharedLogStorage::new(dir.path(), small_segments());
    let mut wals = Vec::new();
    for p in 0..8 {
        wals.push(storage.open(&format!("p{p}"), Term(1)).await.unwrap());
    }
    // 8 pchannels x 40 records, all in flight together.
    let mut pending = Vec::new();
    for i in 0..40u64 {
        for w in &wals {
            pending.push((w.pchannel().to_owned(), i, w.append(payload(i))));
        }
    }
    for (p, i, f) in pending {
        assert_eq!(
            f.await.unwrap(),
            MessageId(i),
            "{p}: ids dense per pchannel"
        );
    }
    let syncs = wals[0].sync_count();
    assert!(
        syncs < 320 / 2,
        "{syncs} fsyncs for 320 records: group commit is shared"
    );
    for w in &wals {
        let got = read_all(w).await;
        assert_eq!(got.len(), 40);
        assert!(got.iter().all(|(id, p)| *p == payload(id.0)));
    }
    // Truncating one pchannel removes nothing the others still need.
    wals[0].truncate(MessageId(40)).await.unwrap();
    assert_eq!(wals[0].first_id(), MessageId(40));
    for w in &wals[1..] {
        assert_eq!(read_all(w).await.len(), 40);
    }
    // Once all are truncated, old segments go; ids go on from where they were.
    for w in &wals[1..] {
        w.truncate(MessageId(40)).await.unwrap();
    }
    let before = count_segments(&dir.path().join("log"));
    assert_eq!(wals[3].append(payload(1)).await.unwrap(), MessageId(40));
    for w in &wals {
        w.close().await.unwrap();
    }
    drop(wals);
    drop(storage);
    let storage = SharedLogStorage::new(dir.path(), small_segments());
    let w0 = storage.open("p0", Term(2)).await.unwrap();
    assert_eq!(w0.first_id(), MessageId(40));
    assert_eq!(
        w0.append(payload(2)).await.unwrap(),
        MessageId(40),
        "ids never restart"
    );
    let w3 = storage.open("p3", Term(2)).await.unwrap();
    assert_eq!(read_all(&w3).await.len(), 1);
    assert!(
        before <= 2,
        "{before} segments left after truncating everything"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_disk_zeros_written_ahead_read_as_the_end_and_a_torn_record_in_them_is_cut() {
    let dir = tempfile::tempdir().unwrap();
    let config = LocalWalConfig {
        segment_bytes: 1 << 20,
        max_batch_bytes: 64 << 10,
        ..LocalWalConfig::default()
    };
    let storage = SharedLogStorage::new(dir.path(), config.clone());
    let wal = storage.open("p", Term(1)).await.unwrap();
    let (acked, _) = append_some(&wal, 0, 50).await;
    drop(wal);
    drop(storage);
    let seg = dir.path().join("log").join(format!("{:020}.log", 0));
    let len = std::fs::metadata(&seg).unwrap().len();
    assert_eq!(
        len,
        1 << 20,
        "the segment was zero-filled ahead of its records"
    );

    // Reopen: the zeros are the end, nothing is lost, appends go on after the last record.
    let storage = SharedLogStorage::new(dir.path(), config.clone());
    let wal = storage.open("p", Term(2)).await.unwrap();
    check_recovered(&read_all(&wal).await, &acked, &[]);
    assert_eq!(wal.append(payload(50)).await.unwrap(), MessageId(50));
    let end = wal.size_bytes() + 20;
    drop(wal);
    drop(storage);

    // A torn record in the zeros (a crash mid-write): cut, and the rest recovers.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
        f.write_all_at(&[0x40, 0, 0, 0, 1, 2, 3, 4, 5, 6], end)
            .unwrap();
    }
    let storage = SharedLogStorage::new(dir.path(), config);
    let wal = storage.open("p", Term(3)).await.unwrap();
    assert_eq!(read_all(&wal).await.len(), 51);
    assert_eq!(wal.append(payload(51)).await.unwrap(), MessageId(51));
    assert_eq!(read_all(&wal).await.len(), 52);
}

fn files_ending(dir: &Path, suffix: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(suffix))
        .collect();
    v.sort();
    v
}

/// The next segment is written whole (header and zeros, synced) by a thread of its own, so the
/// writer never stops to zero-fill: once the few MiB zeroed inline in a fresh log run out, it
/// rolls to the prepared segment, whose size then stays put while commits land in it. An
/// unused prepared segment is removed when the log closes, and a stray one (a crash while
/// preparing) when it opens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_next_segment_is_prepared_whole_and_the_writer_rolls_to_it_instead_of_zero_filling() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let seg_bytes: u64 = 8 << 20;
    let config = LocalWalConfig {
        segment_bytes: seg_bytes,
        max_batch_bytes: 64 << 10,
        ..LocalWalConfig::default()
    };
    let storage = SharedLogStorage::new(dir.path(), config.clone());
    let wal = storage.open("p", Term(1)).await.unwrap();
    let mut next = 0u64;
    let append = async |n: u64| {
        let futs: Vec<_> = (0..n)
            .map(|_| wal.append(Bytes::from(vec![b'r'; 4000])))
            .collect();
        for f in futs {
            f.await.unwrap();
        }
        n
    };
    next += append(1).await;
    // Wait until segment 1 is prepared whole (and a little longer, for its last sync).
    let prepared = log.join(format!("{:020}.prep", 1));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while std::fs::metadata(&prepared).map_or(0, |m| m.len()) < seg_bytes {
        assert!(
            std::time::Instant::now() < deadline,
            "segment 1 was never prepared"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    // 6 MiB of records: more than the 4 MiB zeroed inline, less than a segment.
    for _ in 0..96 {
        next += append(16).await;
    }
    let seg = |i: u64| log.join(format!("{i:020}.log"));
    let first = std::fs::metadata(seg(0)).unwrap().len();
    assert!(
        first < 5 << 20,
        "segment 0 ({first} B) rolled once its inline zeros ran out"
    );
    assert_eq!(std::fs::metadata(seg(1)).unwrap().len(), seg_bytes);
    next += append(16).await;
    assert_eq!(
        std::fs::metadata(seg(1)).unwrap().len(),
        seg_bytes,
        "commits into a prepared segment overwrite its zeros"
    );
    let records = read_all(&wal).await;
    assert_eq!(records.len() as u64, next);
    drop(wal);
    drop(storage);
    assert_eq!(
        files_ending(&log, ".prep"),
        Vec::<String>::new(),
        "closing removes an unused prepared segment"
    );

    // A stray prepared segment holds no record: removed at open, nothing else changes.
    std::fs::write(log.join(format!("{:020}.prep", 7)), b"half-written").unwrap();
    let storage = SharedLogStorage::new(dir.path(), config);
    let wal = storage.open("p", Term(2)).await.unwrap();
    assert_eq!(read_all(&wal).await.len() as u64, next);
    assert!(!log.join(format!("{:020}.prep", 7)).exists());
}

/// Readers slice records out of mapped segments: a reader that follows the writer must see
/// the active segment grow past what it mapped (a fresh log zero-fills 4 MiB at a time), and
/// the roll to the next segment, and each pchannel only its own records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_following_the_writer_sees_every_record_as_segments_grow_and_roll() {
    let dir = tempfile::tempdir().unwrap();
    let config = LocalWalConfig {
        segment_bytes: 12 << 20,
        max_batch_bytes: 1 << 20,
        ..LocalWalConfig::default()
    };
    let storage = SharedLogStorage::new(dir.path(), config);
    let a = storage.open("a", Term(1)).await.unwrap();
    let b = storage.open("b", Term(1)).await.unwrap();
    let big = |p: &str, i: u64| {
        let mut v = format!("{p}-{i}-").into_bytes();
        v.resize(40 << 10, b'a' + (i % 26) as u8);
        Bytes::from(v)
    };
    let mut reader = a.read(ReadFrom::Earliest).unwrap();
    let mut seen = 0u64;
    // 2 x 600 x 40 KiB = 47 MiB: several segments, each grown in steps while being read.
    for round in 0..60u64 {
        let mut pending = Vec::new();
        for i in round * 10..round * 10 + 10 {
            pending.push(a.append(big("a", i)));
            pending.push(b.append(big("b", i)));
        }
        for f in pending {
            f.await.unwrap();
        }
        while let Some((id, bytes)) = reader.next().await.unwrap() {
            assert_eq!(id, MessageId(seen));
            assert_eq!(bytes, big("a", seen), "record {seen} of `a`");
            seen += 1;
        }
        assert_eq!(seen, round * 10 + 10, "caught up after round {round}");
    }
    assert!(
        count_segments(&dir.path().join("log")) >= 3,
        "the records span several segments"
    );
}

/// What a damaged shared log gives back, for any damage: the open does not fail (bar an I/O
/// error), every record read is the one written at its id, and every id that cannot be read is
/// reported as damaged. The same property the fuzz targets check for the decoders, over the
/// whole open-and-read path, in the normal suite.
mod damage_anywhere {
    use proptest::prelude::*;

    use super::*;

    const PCHANNELS: [&str; 3] = ["a", "b", "c"];
    const PER_PCHANNEL: u64 = 40;

    fn written(p: usize, i: u64) -> Bytes {
        let mut b = format!("{p}-{i}-").into_bytes();
        b.resize(20 + (i as usize * 13) % 90, b'a' + p as u8);
        Bytes::from(b)
    }

    async fn case(flips: Vec<(prop::sample::Index, prop::sample::Index, u8)>) {
        let fs = FaultFs::new();
        {
            let storage = storage_on(&fs);
            let mut wals = Vec::new();
            for (k, name) in PCHANNELS.iter().enumerate() {
                wals.push((k, storage.open(name, Term(1)).await.unwrap()));
            }
            for i in 0..PER_PCHANNEL {
                for (k, wal) in &wals {
                    wal.append(written(*k, i)).await.unwrap();
                }
            }
            for (_, wal) in &wals {
                wal.close().await.unwrap();
            }
        }
        let files: Vec<_> = fs
            .files()
            .into_iter()
            .filter(|p| p.extension().is_some_and(|e| e == "log" || e == "idx"))
            .collect();
        for (file, at, header) in flips {
            let f = file.get(&files);
            // A third of the flips land in a file's first 20 bytes (a segment's header).
            let len = fs
                .file_len(f)
                .unwrap()
                .min(if header % 3 == 0 { 20 } else { usize::MAX });
            if len > 0 {
                fs.corrupt(f, at.index(len));
            }
        }
        let storage = storage_on(&fs);
        for (k, name) in PCHANNELS.iter().enumerate() {
            let wal = storage
                .open(name, Term(2))
                .await
                .expect("a damaged log still opens");
            for i in 0..PER_PCHANNEL {
                let mut r = wal.read(ReadFrom::At(MessageId(i))).unwrap();
                match r.next().await {
                    Ok(Some((id, bytes))) => {
                        assert_eq!(id, MessageId(i));
                        assert_eq!(bytes, written(k, i), "{name} {i}: another record's bytes");
                    }
                    Ok(None) => {} // lost with nothing of its pchannel after it
                    Err(WalError::Corrupted { .. }) => assert!(
                        wal.damaged().iter().any(|r| r.contains(&MessageId(i))),
                        "{name} {i}: unreadable but not reported damaged"
                    ),
                    Err(e) => panic!("{name} {i}: {e}"),
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn any_damage_is_confined_and_reported(
            flips in proptest::collection::vec(
                (any::<prop::sample::Index>(), any::<prop::sample::Index>(), any::<u8>()),
                1..5,
            ),
        ) {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(case(flips));
        }
    }
}
