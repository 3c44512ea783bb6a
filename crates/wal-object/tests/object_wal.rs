//! The WAL contract on object storage (`memory://`, `file://` and a real S3 server), and what
//! only this backend must show: fencing through the store alone, uploads that fail, land
//! late or lose their responses, and reads that refuse a hole instead of skipping it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use prometheus::Registry;
use walden_common::{MessageId, Term};
use walden_object_store::{
    Blobs, ObjectStoreConfig, StoreMetrics,
    faulty::{FaultPlan, Faulty},
    open,
    seaweed::SeaweedFs,
};
use walden_wal_api::{ReadFrom, Wal, WalError, WalStorage, conformance};
use walden_wal_object::{ObjectWalConfig, ObjectWalStorage, keys::Keys};

/// Small fragments and segments, so that the suite crosses many of both.
fn small() -> ObjectWalConfig {
    ObjectWalConfig {
        fragment_bytes: 64 << 10,
        segment_bytes: 1 << 20,
        segment_max_fragments: 16,
        ..ObjectWalConfig::default()
    }
}

async fn blobs(url: &str) -> Arc<dyn Blobs> {
    let config = ObjectStoreConfig {
        url: url.into(),
        ..ObjectStoreConfig::default()
    };
    open(&config, StoreMetrics::new(&Registry::new()).unwrap())
        .await
        .unwrap()
}

fn storage(b: &Arc<dyn Blobs>) -> Arc<dyn WalStorage> {
    Arc::new(ObjectWalStorage::new(b.clone(), small()))
}

async fn drain(wal: &Arc<dyn Wal>, from: ReadFrom) -> Result<Vec<(MessageId, Bytes)>, WalError> {
    let mut r = wal.read(from)?;
    let mut out = Vec::new();
    while let Some(x) = r.next().await? {
        out.push(x);
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_passes_the_wal_contract() {
    let b = blobs("memory://").await;
    conformance::run_all(|| storage(&b)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_directory_passes_the_wal_contract() {
    let dir = tempfile::tempdir().unwrap();
    let b = blobs(&format!("file://{}", dir.path().display())).await;
    conformance::run_all(|| storage(&b)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seaweedfs_passes_the_wal_contract() {
    let dir = tempfile::tempdir().unwrap();
    let s3 = SeaweedFs::start(dir.path(), "walden").await.unwrap();
    let b = open(
        &s3.config("conformance"),
        StoreMetrics::new(&Registry::new()).unwrap(),
    )
    .await
    .unwrap();
    conformance::run_all(|| storage(&b)).await;
}

/// Two storages over one store stand for two processes with separate metastores: the
/// second open fences the first through the store alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_writer_on_the_same_prefix_fences_the_first_through_the_store() {
    let b = blobs("memory://").await;
    let (one, two) = (storage(&b), storage(&b));
    let first = one.open("p", Term(1)).await.unwrap();
    let mut acked = Vec::new();
    for i in 0..20u64 {
        acked.push(first.append(Bytes::from(format!("a{i}"))).await.unwrap());
    }
    // Appends in flight while the second writer opens: each is either acknowledged (and then
    // kept) or refused as superseded.
    let racing: Vec<_> = (0..50u64)
        .map(|i| first.append(Bytes::from(format!("r{i}"))))
        .collect();
    let second = two.open("p", Term(1)).await.unwrap();
    let mut superseded = 0;
    for f in racing {
        match f.await {
            Ok(id) => acked.push(id),
            Err(WalError::Superseded {
                epoch, by_epoch, ..
            }) => {
                assert!(by_epoch > epoch);
                superseded += 1;
            }
            Err(e) => panic!("unexpected {e:?}"),
        }
    }
    let err = first.append(Bytes::from_static(b"late")).await.unwrap_err();
    assert!(
        matches!(err, WalError::Superseded { .. }),
        "the first writer is fenced: {err:?}"
    );
    let id = second.append(Bytes::from_static(b"b0")).await.unwrap();
    let log = drain(&second, ReadFrom::Earliest).await.unwrap();
    let ids: Vec<_> = log.iter().map(|x| x.0).collect();
    assert_eq!(*ids.last().unwrap(), id);
    assert!(ids.windows(2).all(|w| w[1].0 == w[0].0 + 1), "dense ids");
    for a in &acked {
        assert!(ids.contains(a), "acknowledged {a} is in the log");
    }
    assert!(!log.iter().any(|x| x.1 == Bytes::from_static(b"late")));
    eprintln!("acked {} superseded {superseded}", acked.len());
}

/// Failures, delays (so uploads finish out of order) and lost responses: every acknowledged
/// record is read back once, at its id. When the store keeps failing, the handle fails (and
/// says so) instead of lying, and the log reopens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_records_survive_failed_reordered_and_lost_uploads() {
    let moderate = FaultPlan {
        fail_per_mille: 50,
        lose_response_per_mille: 100,
        max_delay: Duration::from_millis(3),
        seed: 7,
    };
    let inner = blobs("memory://").await;
    let faulty = Arc::new(Faulty::new(inner.clone(), moderate.clone()));
    let b: Arc<dyn Blobs> = faulty.clone();
    let store = ObjectWalStorage::new(
        b,
        ObjectWalConfig {
            fragment_bytes: 512,
            segment_max_fragments: 32,
            ..ObjectWalConfig::default()
        },
    );
    let mut acked: Vec<(MessageId, Bytes)> = Vec::new();
    let mut failed_handles = 0;
    let mut term = 0;
    for round in 0..6 {
        faulty.set_plan(moderate.clone());
        let wal = loop {
            term += 1;
            match store.open("faults", Term(term)).await {
                Ok(w) => break w,
                Err(e) => assert!(
                    matches!(e, WalError::Unavailable { .. }),
                    "an open fails only as unavailable: {e:?}"
                ),
            }
        };
        let target = acked.len() + 300;
        let mut harsh = false;
        loop {
            if acked.len() >= target && !harsh {
                // The store now fails nearly everything: the handle must give up.
                faulty.set_plan(FaultPlan {
                    fail_per_mille: 950,
                    seed: round,
                    ..moderate.clone()
                });
                harsh = true;
            }
            let batch: Vec<_> = (0..64)
                .map(|i| {
                    let rec = Bytes::from(format!("t{term}-{}-{i}", acked.len()));
                    (rec.clone(), wal.append(rec))
                })
                .collect();
            let mut failed = false;
            for (rec, f) in batch {
                match f.await {
                    Ok(id) => acked.push((id, rec)),
                    Err(e) => {
                        assert!(
                            matches!(e, WalError::Unavailable { .. }),
                            "a failed upload is reported as unavailable: {e:?}"
                        );
                        failed = true;
                    }
                }
            }
            if failed {
                failed_handles += 1;
                break;
            }
        }
    }
    assert_eq!(failed_handles, 6, "every harsh phase failed its handle");
    assert!(
        faulty
            .counts
            .lost_responses
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    );
    faulty.set_plan(FaultPlan::default());
    let wal = store.open("faults", Term(term + 1)).await.unwrap();
    let log = drain(&wal, ReadFrom::Earliest).await.unwrap();
    assert!(
        log.windows(2).all(|w| w[1].0.0 == w[0].0.0 + 1),
        "dense ids"
    );
    let by_id: std::collections::HashMap<_, _> = log.iter().cloned().collect();
    for (id, rec) in &acked {
        assert_eq!(by_id.get(id), Some(rec), "acknowledged record at {id}");
    }
    let mut seen = std::collections::HashSet::new();
    for (_, rec) in &log {
        assert!(seen.insert(rec.clone()), "{rec:?} appears twice");
    }
    eprintln!("acked {}; log {}", acked.len(), log.len());
}

/// A fragment missing from the middle of a segment is corruption, never skipped: in a sealed
/// segment the read fails with CORRUPTED at that point; in the segment the last writer was
/// filling, the open does (the fragments after it say it had been durable).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_fragment_is_refused_as_corruption_never_skipped() {
    let b = blobs("memory://").await;
    let s = ObjectWalStorage::new(
        b.clone(),
        ObjectWalConfig {
            fragment_bytes: 1,
            segment_max_fragments: 4,
            ..ObjectWalConfig::default()
        },
    );
    let is_corrupted =
        |e: &WalError| walden_common::HasErrorCode::code(e) == walden_common::ErrorCode::Corrupted;
    // One record per fragment, four per segment: segment 1 holds ids 4..8.
    let wal = s.open("sealed", Term(1)).await.unwrap();
    for i in 0..10u64 {
        wal.append(Bytes::from(format!("r{i}"))).await.unwrap();
    }
    wal.close().await.unwrap();
    b.delete(&Keys::new("sealed").fragment(1, 1)).await.unwrap();
    let wal = s.open("sealed", Term(2)).await.unwrap();
    let mut r = wal.read(ReadFrom::Earliest).unwrap();
    for i in 0..5 {
        assert_eq!(r.next().await.unwrap().unwrap().0, MessageId(i));
    }
    let err = r.next().await.unwrap_err();
    assert!(is_corrupted(&err), "{err:?}");
    // Reading on from past the hole works.
    assert_eq!(
        drain(&wal, ReadFrom::At(MessageId(6))).await.unwrap().len(),
        4
    );

    let wal = s.open("active", Term(1)).await.unwrap();
    for i in 0..3u64 {
        wal.append(Bytes::from(format!("r{i}"))).await.unwrap();
    }
    wal.close().await.unwrap();
    b.delete(&Keys::new("active").fragment(0, 1)).await.unwrap();
    let err = s.open("active", Term(2)).await.unwrap_err();
    assert!(is_corrupted(&err), "{err:?}");
}

/// An open lists only the segment markers and the segment the last writer was filling, and
/// reads one manifest per sealed segment: never the whole history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_lists_only_markers_and_the_active_segment() {
    let inner = blobs("memory://").await;
    let counting = Arc::new(Counting::new(inner));
    let b: Arc<dyn Blobs> = counting.clone();
    let s = ObjectWalStorage::new(
        b,
        ObjectWalConfig {
            fragment_bytes: 1,
            segment_max_fragments: 10,
            ..ObjectWalConfig::default()
        },
    );
    let wal = s.open("hist", Term(1)).await.unwrap();
    for i in 0..95u64 {
        wal.append(Bytes::from(format!("r{i}"))).await.unwrap();
    }
    wal.close().await.unwrap();
    counting.lists.lock().unwrap().clear();
    let wal = s.open("hist", Term(2)).await.unwrap();
    assert_eq!(wal.durable_end(), MessageId(95));
    let lists = counting.lists.lock().unwrap().clone();
    let k = Keys::new("hist");
    for l in &lists {
        assert!(
            *l == k.epochs() || *l == k.markers() || *l == k.segment(9),
            "listed {l}; only claims, markers and the active segment 9 may be listed: {lists:?}"
        );
    }
    assert_eq!(
        drain(&wal, ReadFrom::At(MessageId(42)))
            .await
            .unwrap()
            .len(),
        53
    );
}

/// Records the prefixes listed.
#[derive(Debug)]
struct Counting {
    inner: Arc<dyn Blobs>,
    lists: std::sync::Mutex<Vec<String>>,
}

impl Counting {
    fn new(inner: Arc<dyn Blobs>) -> Self {
        Self {
            inner,
            lists: Default::default(),
        }
    }
}

#[async_trait::async_trait]
impl Blobs for Counting {
    async fn put_if_absent(
        &self,
        key: &str,
        data: Bytes,
    ) -> Result<(), walden_object_store::ObjectStoreError> {
        self.inner.put_if_absent(key, data).await
    }
    async fn put(
        &self,
        key: &str,
        data: Bytes,
    ) -> Result<(), walden_object_store::ObjectStoreError> {
        self.inner.put(key, data).await
    }
    async fn get(&self, key: &str) -> Result<Bytes, walden_object_store::ObjectStoreError> {
        self.inner.get(key).await
    }
    async fn get_range(
        &self,
        key: &str,
        range: std::ops::Range<u64>,
    ) -> Result<Bytes, walden_object_store::ObjectStoreError> {
        self.inner.get_range(key, range).await
    }
    async fn list(
        &self,
        prefix: &str,
    ) -> Result<Vec<walden_object_store::ObjectInfo>, walden_object_store::ObjectStoreError> {
        self.lists.lock().unwrap().push(prefix.to_owned());
        self.inner.list(prefix).await
    }
    async fn delete(&self, key: &str) -> Result<(), walden_object_store::ObjectStoreError> {
        self.inner.delete(key).await
    }
}

/// A segment rolls by age even when nothing more is appended, so that truncation can free an
/// idle pchannel's log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_segment_rolls_by_age_and_can_then_be_truncated() {
    let b = blobs("memory://").await;
    let s = ObjectWalStorage::new(
        b.clone(),
        ObjectWalConfig {
            segment_max_age: Duration::from_millis(200),
            ..ObjectWalConfig::default()
        },
    );
    let wal = s.open("idle", Term(1)).await.unwrap();
    let id = wal.append(Bytes::from_static(b"only")).await.unwrap();
    let manifest = Keys::new("idle").manifest(0);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while b.get(&manifest).await.is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "the idle segment was never sealed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    wal.truncate(MessageId(id.0 + 1)).await.unwrap();
    assert_eq!(wal.first_id(), MessageId(id.0 + 1));
    let err = wal.read(ReadFrom::At(id)).unwrap_err();
    assert!(matches!(err, WalError::Truncated { .. }), "{err:?}");
}
