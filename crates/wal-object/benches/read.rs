//! Catch-up read throughput of the object-storage WAL itself (no server, no network): a
//! pchannel written to `file://` in a temp dir, then read from the start. `cargo bench -p
//! walden-wal-object`; `WALDEN_BENCH_MIB` sets the size (default 256).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{sync::Arc, time::Instant};

use bytes::Bytes;
use walden_common::Term;
use walden_object_store::{ObjectStoreConfig, StoreMetrics};
use walden_wal_api::{ReadFrom, WalStorage};
use walden_wal_object::{ObjectWalConfig, ObjectWalStorage};

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mib: u64 = std::env::var("WALDEN_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    for fragment_bytes in [64 << 10, 4 << 20] {
        rt.block_on(one(mib, fragment_bytes));
    }
}

async fn one(mib: u64, fragment_bytes: usize) {
    let dir = tempfile::tempdir_in(".").unwrap();
    let config = ObjectStoreConfig {
        url: format!("file://{}", dir.path().canonicalize().unwrap().display()),
        ..ObjectStoreConfig::default()
    };
    let blobs = walden_object_store::open(
        &config,
        StoreMetrics::new(&prometheus::Registry::new()).unwrap(),
    )
    .await
    .unwrap();
    let storage = ObjectWalStorage::new(
        blobs,
        ObjectWalConfig {
            fragment_bytes,
            ..ObjectWalConfig::default()
        },
    );
    let wal = storage.open("bench", Term(1)).await.unwrap();
    let record = Bytes::from(vec![0x42u8; 1024]);
    let n = mib * 1024;
    let mut pending = std::collections::VecDeque::new();
    for _ in 0..n {
        pending.push_back(wal.append(record.clone()));
        if pending.len() >= 4096 {
            pending.pop_front().unwrap().await.unwrap();
        }
    }
    for p in pending {
        p.await.unwrap();
    }
    wal.close().await.unwrap();
    // A fresh open: the reader starts from the store, not from anything the writer held.
    let wal = Arc::new(storage).open("bench", Term(2)).await.unwrap();
    let started = Instant::now();
    let mut r = wal.read(ReadFrom::Earliest).unwrap();
    let (mut count, mut bytes) = (0u64, 0u64);
    while let Some((_, rec)) = r.next().await.unwrap() {
        count += 1;
        bytes += rec.len() as u64;
    }
    let s = started.elapsed().as_secs_f64();
    assert_eq!(count, n);
    println!(
        "object WAL catch-up from file://, {} KiB fragments: {:.0} MiB/s ({count} records of 1 KiB in {s:.3} s)",
        fragment_bytes >> 10,
        bytes as f64 / s / (1 << 20) as f64
    );
}
