//! The conformance suite every WAL backend runs (see the crate contract).
//!
//! `make` must return a storage over the *same* underlying data each time it is called, so the
//! suite can check what survives a reopen.

// Test support: a failed check panics with its message, like a test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use bytes::Bytes;
use walden_common::{MessageId, Term};

use crate::{ReadFrom, Wal, WalError, WalReader, WalStorage};

/// Runs every check, each on its own pchannel.
pub async fn run_all<F: Fn() -> Arc<dyn WalStorage>>(make: F) {
    appends_get_dense_ids_in_call_order(&make).await;
    reads_start_where_asked(&make).await;
    stale_terms_are_fenced(&make).await;
    truncation_is_reported_and_ids_never_restart(&make).await;
    reopen_keeps_acknowledged_records(&make).await;
    concurrent_appends_get_unique_dense_ids(&make).await;
    reader_sees_new_records_after_reaching_the_end(&make).await;
}

fn rec(i: u64) -> Bytes {
    Bytes::from(format!("record-{i}").into_bytes())
}

async fn drain(r: &mut Box<dyn WalReader>) -> Vec<(MessageId, Bytes)> {
    let mut out = Vec::new();
    while let Some(x) = r.next().await.expect("read") {
        out.push(x);
    }
    out
}

async fn append_n(wal: &Arc<dyn Wal>, n: u64) -> Vec<MessageId> {
    let futs: Vec<_> = (0..n).map(|i| wal.append(rec(i))).collect();
    let mut ids = Vec::new();
    for f in futs {
        ids.push(f.await.expect("append"));
    }
    ids
}

pub async fn appends_get_dense_ids_in_call_order<F: Fn() -> Arc<dyn WalStorage>>(make: &F) {
    let storage = make();
    let wal = storage.open("conf-order", Term(1)).await.expect("open");
    let start = wal.next_id();
    // Enqueue all before awaiting any: ids must follow call order, not poll order.
    let futs: Vec<_> = (0..50).map(|i| wal.append(rec(i))).collect();
    let mut ids = Vec::new();
    for f in futs.into_iter().rev() {
        ids.push(f.await.expect("append"));
    }
    ids.reverse();
    let expected: Vec<_> = (0..50).map(|i| MessageId(start.0 + i)).collect();
    assert_eq!(ids, expected, "ids must be dense and in call order");
    assert_eq!(wal.durable_end(), MessageId(start.0 + 50));
    let mut r = wal.read(ReadFrom::Earliest).expect("read");
    let got = drain(&mut r).await;
    assert_eq!(got.len(), 50);
    for (i, (id, data)) in got.iter().enumerate() {
        assert_eq!(*id, expected[i]);
        assert_eq!(*data, rec(i as u64));
    }
    assert!(wal.size_bytes() > 0);
    wal.close().await.expect("close");
}

pub async fn reads_start_where_asked<F: Fn() -> Arc<dyn WalStorage>>(make: &F) {
    let storage = make();
    let wal = storage.open("conf-read", Term(1)).await.expect("open");
    let ids = append_n(&wal, 10).await;
    let first = |r: Vec<(MessageId, Bytes)>| r.first().map(|x| x.0);

    let mut r = wal.read(ReadFrom::At(ids[3])).expect("read");
    let got = drain(&mut r).await;
    assert_eq!(first(got.clone()), Some(ids[3]));
    assert_eq!(got.len(), 7);

    let mut r = wal.read(ReadFrom::After(ids[3])).expect("read");
    let got = drain(&mut r).await;
    assert_eq!(first(got.clone()), Some(ids[4]));
    assert_eq!(got.len(), 6);

    let mut r = wal.read(ReadFrom::Latest).expect("read");
    assert!(
        r.next().await.expect("read").is_none(),
        "latest starts at the end"
    );
    let new = wal.append(rec(99)).await.expect("append");
    assert_eq!(
        r.next().await.expect("read").map(|x| x.0),
        Some(new),
        "latest sees what comes after it"
    );

    let mut r = wal.read(ReadFrom::After(ids[9])).expect("read");
    assert_eq!(r.next().await.expect("read").map(|x| x.0), Some(new));
    wal.close().await.expect("close");
}

pub async fn stale_terms_are_fenced<F: Fn() -> Arc<dyn WalStorage>>(make: &F) {
    let storage = make();
    let old = storage.open("conf-fence", Term(3)).await.expect("open");
    append_n(&old, 3).await;
    let new = storage
        .open("conf-fence", Term(4))
        .await
        .expect("newer term opens");
    let err = old
        .append(rec(1))
        .await
        .expect_err("a fenced handle must not append");
    assert!(
        matches!(
            err,
            WalError::Fenced {
                current: Term(4),
                ..
            } | WalError::Closed { .. }
        ),
        "a fenced handle names the term that fenced it; got {err:?}"
    );
    let end_before = new.durable_end();
    let id = new.append(rec(7)).await.expect("new owner appends");
    assert_eq!(id, end_before, "the fenced append wrote nothing");
    new.close().await.expect("close");
    drop(new);
    let err = storage
        .open("conf-fence", Term(2))
        .await
        .expect_err("stale term");
    assert!(
        matches!(
            err,
            WalError::Fenced {
                current: Term(4),
                ..
            }
        ),
        "got {err:?}"
    );
}

pub async fn truncation_is_reported_and_ids_never_restart<F: Fn() -> Arc<dyn WalStorage>>(
    make: &F,
) {
    let storage = make();
    let wal = storage.open("conf-trunc", Term(1)).await.expect("open");
    let mut ids = append_n(&wal, 20).await;
    // Backends truncate at their own granularity (whole segments, say): append 256 KiB
    // records until a truncation removes something, so the TRUNCATED check always runs. A
    // backend that removes nothing below 80 MiB of records fails here.
    let big = Bytes::from(vec![7u8; 256 << 10]);
    let below = loop {
        let below = ids[ids.len() - 10];
        wal.truncate(below).await.expect("truncate");
        if wal.first_id() > ids[0] {
            break below;
        }
        assert!(
            ids.len() < 20 + 320,
            "80 MiB of records and nothing truncated"
        );
        ids.push(wal.append(big.clone()).await.expect("append"));
    };
    let first = wal.first_id();
    assert!(first <= below, "truncate must keep the record at `below`");
    assert!(first > ids[0], "something was truncated");
    let err = wal.read(ReadFrom::At(ids[0])).expect_err("truncated read");
    assert!(matches!(err, WalError::Truncated { .. }), "got {err:?}");
    let err = wal
        .read(ReadFrom::At(MessageId(first.0 - 1)))
        .expect_err("a read just below the first id");
    assert!(matches!(err, WalError::Truncated { .. }), "got {err:?}");
    let mut r = wal.read(ReadFrom::At(below)).expect("read");
    let kept = ids.iter().filter(|id| **id >= below).count();
    assert_eq!(drain(&mut r).await.len(), kept);
    let last = *ids.last().expect("ids");
    let next = wal.append(rec(1)).await.expect("append");
    assert_eq!(next, MessageId(last.0 + 1), "ids continue after truncation");
    wal.close().await.expect("close");
}

pub async fn reopen_keeps_acknowledged_records<F: Fn() -> Arc<dyn WalStorage>>(make: &F) {
    let ids = {
        let storage = make();
        let wal = storage.open("conf-reopen", Term(1)).await.expect("open");
        let ids = append_n(&wal, 25).await;
        wal.close().await.expect("close");
        ids
    };
    let storage = make();
    let wal = storage.open("conf-reopen", Term(2)).await.expect("reopen");
    assert_eq!(wal.durable_end(), MessageId(ids[24].0 + 1));
    let mut r = wal.read(ReadFrom::Earliest).expect("read");
    let got = drain(&mut r).await;
    assert_eq!(got.iter().map(|x| x.0).collect::<Vec<_>>(), ids);
    assert_eq!(got[24].1, rec(24));
    let id = wal.append(rec(25)).await.expect("append after reopen");
    assert_eq!(id, MessageId(ids[24].0 + 1), "ids never restart");
    wal.close().await.expect("close");
}

pub async fn concurrent_appends_get_unique_dense_ids<F: Fn() -> Arc<dyn WalStorage>>(make: &F) {
    let storage = make();
    let wal = storage
        .open("conf-concurrent", Term(1))
        .await
        .expect("open");
    let start = wal.next_id();
    let mut tasks = Vec::new();
    for t in 0..8u64 {
        let wal = wal.clone();
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in 0..25u64 {
                ids.push((
                    wal.append(rec(t * 1000 + i)).await.expect("append"),
                    t * 1000 + i,
                ));
            }
            ids
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("task"));
    }
    all.sort();
    let ids: Vec<_> = all.iter().map(|x| x.0).collect();
    let expected: Vec<_> = (0..200).map(|i| MessageId(start.0 + i)).collect();
    assert_eq!(ids, expected);
    let mut r = wal.read(ReadFrom::At(start)).expect("read");
    for (id, data) in drain(&mut r).await {
        let want = all.iter().find(|x| x.0 == id).expect("id").1;
        assert_eq!(
            data,
            rec(want),
            "record at {id} is the one acknowledged there"
        );
    }
    wal.close().await.expect("close");
}

pub async fn reader_sees_new_records_after_reaching_the_end<F: Fn() -> Arc<dyn WalStorage>>(
    make: &F,
) {
    let storage = make();
    let wal = storage.open("conf-tail", Term(1)).await.expect("open");
    let mut r = wal.read(ReadFrom::Earliest).expect("read");
    assert!(r.next().await.expect("read").is_none());
    for round in 0..3u64 {
        let ids = append_n(&wal, 5).await;
        let got = drain(&mut r).await;
        assert_eq!(
            got.iter().map(|x| x.0).collect::<Vec<_>>(),
            ids,
            "round {round}"
        );
    }
    wal.close().await.expect("close");
}
