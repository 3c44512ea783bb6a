//! What the fault tests of both local WAL layouts share: helpers, and the FaultFs scenarios
//! (torn writes, failed fsyncs, crashes between write and sync), run against a storage
//! constructor.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::{collections::HashMap, path::PathBuf, sync::Arc};

use bytes::Bytes;
use rand::{Rng, SeedableRng, rngs::StdRng};
use walden_common::{MessageId, Term};
use walden_wal_api::{ReadFrom, Wal, WalStorage};
use walden_wal_local::{
    LocalWalConfig,
    fs::{FaultFs, FaultPlan},
};

/// Builds a storage on the fault file system, rooted at `/wal`.
pub type Make = fn(&FaultFs) -> Box<dyn WalStorage>;

pub fn small_segments() -> LocalWalConfig {
    LocalWalConfig {
        segment_bytes: 4096,
        max_batch_bytes: 64 << 10,
        ..LocalWalConfig::default()
    }
}

pub fn payload(i: u64) -> Bytes {
    // Sizes vary so records straddle read chunks and segment boundaries.
    let len = 10 + (i * 37 % 300) as usize;
    let mut v = format!("msg-{i}-").into_bytes();
    v.resize(len, b'a' + (i % 26) as u8);
    Bytes::from(v)
}

pub async fn read_all(wal: &Arc<dyn Wal>) -> Vec<(MessageId, Bytes)> {
    let mut r = wal.read(ReadFrom::Earliest).unwrap();
    let mut out = Vec::new();
    while let Some(x) = r.next().await.unwrap() {
        out.push(x);
    }
    out
}

/// Appends `n` records in pipelined groups of 10 (so several group commits happen); returns
/// what was acknowledged and what failed.
pub async fn append_some(
    wal: &Arc<dyn Wal>,
    from: u64,
    n: u64,
) -> (HashMap<MessageId, Bytes>, Vec<Bytes>) {
    let mut acked = HashMap::new();
    let mut failed = Vec::new();
    let mut i = from;
    while i < from + n {
        let end = (i + 10).min(from + n);
        let futs: Vec<_> = (i..end)
            .map(|k| (payload(k), wal.append(payload(k))))
            .collect();
        for (p, f) in futs {
            match f.await {
                Ok(id) => {
                    acked.insert(id, p);
                }
                Err(_) => failed.push(p),
            }
        }
        i = end;
    }
    (acked, failed)
}

/// After recovery: every acknowledged record is at its id, and every other record present is
/// one of the failed ones, whole.
pub fn check_recovered(
    got: &[(MessageId, Bytes)],
    acked: &HashMap<MessageId, Bytes>,
    failed: &[Bytes],
) {
    let by_id: HashMap<_, _> = got.iter().cloned().collect();
    for (id, p) in acked {
        assert_eq!(
            by_id.get(id),
            Some(p),
            "acknowledged record {id} lost or changed"
        );
    }
    for (id, p) in got {
        if !acked.contains_key(id) {
            assert!(
                failed.contains(p),
                "record {id} was never acknowledged and is not a whole failed record"
            );
        }
    }
    let ids: Vec<_> = got.iter().map(|x| x.0.0).collect();
    assert!(ids.windows(2).all(|w| w[1] == w[0] + 1), "ids are dense");
}

/// Segment files (by extension) on the fault file system.
pub fn segments(fs: &FaultFs, ext: &str) -> Vec<PathBuf> {
    fs.files()
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == ext))
        .collect()
}

/// Torn writes keep acknowledged data; unacknowledged data is whole or absent.
pub async fn torn_writes_keep_acknowledged_data(make: Make) {
    for seed in 0..20u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let fs = FaultFs::new();
        let storage = make(&fs);
        let wal = storage.open("p", Term(1)).await.unwrap();
        let (mut acked, _) = append_some(&wal, 0, 30).await;
        fs.set_plan(FaultPlan {
            torn_write_at: Some(rng.random_range(0..4)),
            torn_keep: rng.random_range(0..400),
            fail_sync_at: None,
        });
        let (more, failed) = append_some(&wal, 100, 40).await;
        acked.extend(more);
        assert!(
            !failed.is_empty(),
            "seed {seed}: the torn write must fail some appends"
        );
        // After a failure the handle stays failed.
        assert!(wal.append(payload(999)).await.is_err());
        drop(wal);
        // Power loss: keep an arbitrary part of whatever was not synced.
        fs.crash(|_, unsynced| rng.random_range(0..=unsynced));
        let storage = make(&fs);
        let wal = storage.open("p", Term(2)).await.unwrap();
        let got = read_all(&wal).await;
        check_recovered(&got, &acked, &failed);
        let id = wal
            .append(payload(7))
            .await
            .expect("the WAL accepts appends again");
        assert_eq!(id, MessageId(got.len() as u64));
    }
}

/// A failed fsync fails its appends; the WAL reopens consistently.
pub async fn failed_fsync_reopens_consistently(make: Make) {
    for seed in 0..20u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let fs = FaultFs::new();
        let storage = make(&fs);
        let wal = storage.open("p", Term(1)).await.unwrap();
        fs.set_plan(FaultPlan {
            torn_write_at: None,
            torn_keep: 0,
            fail_sync_at: Some(rng.random_range(1..6)),
        });
        let (acked, failed) = append_some(&wal, 0, 60).await;
        assert!(!failed.is_empty(), "seed {seed}");
        drop(wal);
        // The kernel may or may not have written the pages whose fsync failed.
        fs.crash(|_, unsynced| if rng.random_bool(0.5) { unsynced } else { 0 });
        let storage = make(&fs);
        let wal = storage.open("p", Term(2)).await.unwrap();
        check_recovered(&read_all(&wal).await, &acked, &failed);
    }
}

/// A crash between write and sync loses nothing acknowledged.
pub async fn crash_between_write_and_sync(make: Make) {
    for seed in 0..20u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let fs = FaultFs::new();
        let storage = make(&fs);
        let wal = storage.open("p", Term(1)).await.unwrap();
        let (acked, _) = append_some(&wal, 0, 50).await;
        // Enqueue more and crash without waiting: these are written but maybe not synced.
        let pending: Vec<_> = (50..80)
            .map(|i| (payload(i), wal.append(payload(i))))
            .collect();
        tokio::task::yield_now().await;
        fs.crash(|_, unsynced| rng.random_range(0..=unsynced));
        let in_flight: Vec<Bytes> = pending.into_iter().map(|(p, _)| p).collect();
        drop(wal);
        drop(storage);
        let storage = make(&fs);
        let wal = storage.open("p", Term(2)).await.unwrap();
        check_recovered(&read_all(&wal).await, &acked, &in_flight);
    }
}

/// Creations and renames of files are durable only once their directory is synced: a crash
/// that keeps no unsynced byte and no unsynced directory entry loses nothing acknowledged,
/// across segment rolls, and so does a second crash right after the reopen (whose recovery
/// may itself create, cut or rename files). Fails if any directory fsync the design promises
/// is left out (a rolled segment, or a TERM or FIRST file, would vanish).
pub async fn acknowledged_records_survive_crashes_that_drop_unsynced_directory_entries(make: Make) {
    let fs = FaultFs::new();
    let storage = make(&fs);
    let wal = storage.open("p", Term(1)).await.unwrap();
    let (mut acked, failed) = append_some(&wal, 0, 200).await;
    assert!(failed.is_empty());
    drop(wal);
    drop(storage);
    let rolled = fs.files().len();
    fs.crash(|_, _| 0);
    assert_eq!(
        fs.files().len(),
        rolled,
        "a file's directory entry was never synced"
    );
    for term in 2..4 {
        let storage = make(&fs);
        let wal = storage.open("p", Term(term)).await.unwrap();
        check_recovered(&read_all(&wal).await, &acked, &[]);
        drop(wal);
        drop(storage);
        // Again, right after the reopen.
        fs.crash(|_, _| 0);
    }
    // A few records (into the segment the reopen started, no roll after them), then many.
    for (term, n) in [(4, 3), (5, 50)] {
        let storage = make(&fs);
        let wal = storage.open("p", Term(term)).await.unwrap();
        check_recovered(&read_all(&wal).await, &acked, &[]);
        let (more, failed) = append_some(&wal, 1000 * term, n).await;
        assert!(failed.is_empty());
        acked.extend(more);
        drop(wal);
        drop(storage);
        fs.crash(|_, _| 0);
    }
    let storage = make(&fs);
    let wal = storage.open("p", Term(6)).await.unwrap();
    check_recovered(&read_all(&wal).await, &acked, &[]);
}

/// A term, once a pchannel opened under it, survives a crash: an older writer is refused.
pub async fn a_term_survives_a_crash(make: Make) {
    let fs = FaultFs::new();
    let storage = make(&fs);
    let wal = storage.open("p", Term(5)).await.unwrap();
    wal.append(payload(1)).await.unwrap();
    drop(wal);
    drop(storage);
    fs.crash(|_, _| 0);
    let err = make(&fs).open("p", Term(3)).await.unwrap_err();
    assert!(
        matches!(err, walden_wal_api::WalError::Fenced { .. }),
        "a stale term opened after a crash: {err:?}"
    );
}

/// Truncation survives a crash: ids below the truncation point stay gone and ids never restart.
pub async fn truncation_survives_a_crash(make: Make) {
    let fs = FaultFs::new();
    let storage = make(&fs);
    let wal = storage.open("p", Term(1)).await.unwrap();
    append_some(&wal, 0, 200).await;
    wal.truncate(MessageId(150)).await.unwrap();
    let first = wal.first_id();
    assert!(first > MessageId(0));
    drop(wal);
    drop(storage);
    fs.crash(|_, _| 0);
    let wal = make(&fs).open("p", Term(2)).await.unwrap();
    assert!(wal.first_id() >= first, "{:?} < {first:?}", wal.first_id());
    assert_eq!(wal.append(payload(7)).await.unwrap(), MessageId(200));
}

/// The tests every layout runs: the conformance suite on disk and on the fault file system, and
/// the fault scenarios above, and damage. `$storage` has `new(root, config)` and
/// `with_fs(root, fs, config)`; its segment files end in `.$ext`.
#[macro_export]
macro_rules! layout_suite {
    ($storage:ty, $ext:literal) => {
        fn storage_on(fs: &FaultFs) -> $storage {
            <$storage>::with_fs("/wal", Arc::new(fs.clone()), faults::small_segments())
        }

        fn segments(fs: &FaultFs) -> Vec<std::path::PathBuf> {
            faults::segments(fs, $ext)
        }

        fn make(fs: &FaultFs) -> Box<dyn WalStorage> {
            Box::new(storage_on(fs))
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn passes_the_conformance_suite_on_disk() {
            let dir = tempfile::tempdir().unwrap();
            let root = dir.path().to_owned();
            walden_wal_api::conformance::run_all(move || {
                Arc::new(<$storage>::new(root.clone(), faults::small_segments()))
                    as Arc<dyn WalStorage>
            })
            .await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn passes_the_conformance_suite_on_the_fault_fs() {
            let fs = FaultFs::new();
            walden_wal_api::conformance::run_all(move || {
                Arc::new(<$storage>::with_fs(
                    "/wal",
                    Arc::new(fs.clone()),
                    walden_wal_local::LocalWalConfig::default(),
                )) as Arc<dyn WalStorage>
            })
            .await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn torn_writes_keep_acknowledged_data_and_leave_unacknowledged_data_whole_or_absent()
        {
            faults::torn_writes_keep_acknowledged_data(make).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_failed_fsync_fails_its_appends_and_the_wal_reopens_consistently() {
            faults::failed_fsync_reopens_consistently(make).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_crash_between_write_and_sync_loses_nothing_acknowledged() {
            faults::crash_between_write_and_sync(make).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn acknowledged_records_survive_crashes_that_drop_unsynced_directory_entries() {
            faults::acknowledged_records_survive_crashes_that_drop_unsynced_directory_entries(make)
                .await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_term_survives_a_crash() {
            faults::a_term_survives_a_crash(make).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn truncation_survives_a_crash() {
            faults::truncation_survives_a_crash(make).await;
        }

        /// Damage with valid records after it is never taken for a torn tail and never
        /// skipped in silence: either the open refuses it (per-pchannel layout), or the
        /// pchannel reports the damaged ids and a reader gets every record before them and
        /// then CORRUPTED (shared layout, where the other pchannels must go on).
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn damage_in_the_middle_of_the_active_segment_is_reported_never_skipped() {
            for at in [30usize, 100, 400] {
                let fs = FaultFs::new();
                let config = walden_wal_local::LocalWalConfig::default();
                let storage = <$storage>::with_fs("/wal", Arc::new(fs.clone()), config.clone());
                let wal = storage.open("p", walden_common::Term(1)).await.unwrap();
                let (acked, _) = faults::append_some(&wal, 0, 20).await;
                let mut acked: Vec<_> = acked.into_iter().collect();
                acked.sort_by_key(|x| x.0);
                wal.close().await.unwrap();
                drop(wal);
                drop(storage);
                let seg = segments(&fs).pop().unwrap();
                fs.corrupt(&seg, at);
                let storage = <$storage>::with_fs("/wal", Arc::new(fs.clone()), config);
                let wal = match storage.open("p", walden_common::Term(2)).await {
                    Err(e) => {
                        assert!(
                            matches!(e, walden_wal_api::WalError::Corrupted { .. }),
                            "byte {at}: got {e:?}"
                        );
                        continue;
                    }
                    Ok(w) => w,
                };
                let damaged = wal.damaged();
                assert_eq!(damaged.len(), 1, "byte {at}: {damaged:?}");
                let mut r = wal.read(walden_wal_api::ReadFrom::Earliest).unwrap();
                let mut before = Vec::new();
                let err = loop {
                    match r.next().await {
                        Ok(Some((id, p))) => before.push((id, p)),
                        Ok(None) => panic!("byte {at}: the damage was skipped"),
                        Err(e) => break e,
                    }
                };
                assert!(
                    matches!(err, walden_wal_api::WalError::Corrupted { .. }),
                    "byte {at}: got {err:?}"
                );
                let first_bad = damaged[0].start.0 as usize;
                assert_eq!(before, acked[..first_bad].to_vec(), "byte {at}");
                // Past the damage, everything else reads.
                let mut r = wal
                    .read(walden_wal_api::ReadFrom::At(damaged[0].end))
                    .unwrap();
                let mut after = Vec::new();
                while let Some(x) = r.next().await.unwrap() {
                    after.push(x);
                }
                assert_eq!(
                    after,
                    acked[damaged[0].end.0 as usize..].to_vec(),
                    "byte {at}"
                );
            }
        }

        /// Damage in a sealed segment (not read at open) is reported to the reader that meets it.
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn damage_in_a_sealed_segment_is_reported_when_read() {
            let fs = FaultFs::new();
            let storage = storage_on(&fs);
            let wal = storage.open("p", walden_common::Term(1)).await.unwrap();
            faults::append_some(&wal, 0, 100).await;
            wal.close().await.unwrap();
            drop(wal);
            drop(storage);
            let segs = segments(&fs);
            assert!(segs.len() > 2, "small segments roll");
            fs.corrupt(&segs[0], 200);
            let wal = storage_on(&fs)
                .open("p", walden_common::Term(2))
                .await
                .unwrap();
            let mut r = wal.read(walden_wal_api::ReadFrom::Earliest).unwrap();
            let err = loop {
                match r.next().await {
                    Ok(Some(_)) => continue,
                    Ok(None) => panic!("corruption was skipped"),
                    Err(e) => break e,
                }
            };
            assert!(
                matches!(err, walden_wal_api::WalError::Corrupted { .. }),
                "got {err:?}"
            );
        }
    };
}
