//! The node's append and read paths on the in-memory WAL and metastore.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use tokio::sync::mpsc;
use walden_common::{MessageId, TimeTick};
use walden_message::{ImmutableMessage, MessageType, MutableMessage};
use walden_metastore_api::{MemoryMetaStore, MetaStore};
use walden_streaming_node::{
    NodeConfig, NodeError,
    channel::Channel,
    manager::WalManager,
    metrics::Metrics,
    scanner::{self, DeliverPolicy, Filters},
};
use walden_wal_api::{WalStorage, memory::MemoryWalStorage};

async fn manager(config: NodeConfig) -> (Arc<WalManager>, MemoryWalStorage, MemoryMetaStore) {
    let storage = MemoryWalStorage::new();
    let meta = MemoryMetaStore::new();
    let m = common::start(&storage, &meta, config).await;
    (m, storage, meta)
}

fn small() -> NodeConfig {
    NodeConfig {
        pchannels: 2,
        time_tick_interval_ms: 20,
        ..NodeConfig::default()
    }
}

fn insert(vc: &str, i: usize) -> MutableMessage {
    MutableMessage::new(MessageType::Data, vc, Bytes::from(format!("m{i}")))
}

async fn collect(
    channel: Arc<Channel>,
    policy: DeliverPolicy,
    filters: Filters,
    n: usize,
) -> Vec<ImmutableMessage> {
    let (tx, mut rx) = mpsc::channel(64);
    let task = tokio::spawn(scanner::scan(channel, policy, filters, tx));
    let mut out: Vec<ImmutableMessage> = Vec::new();
    // `n` counts inserts: TimeTicks interleave at their own pace.
    while out
        .iter()
        .filter(|m| m.message_type() == MessageType::Data)
        .count()
        < n
    {
        let m = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("messages in time")
            .expect("scanner open")
            .expect("no scan error");
        out.push(m);
    }
    task.abort();
    out
}

fn inserts(ms: &[ImmutableMessage]) -> Vec<String> {
    ms.iter()
        .filter(|m| m.message_type() == MessageType::Data)
        .map(|m| String::from_utf8(m.payload.to_vec()).unwrap())
        .collect()
}

#[tokio::test]
async fn concurrent_appends_become_visible_in_tick_order_with_ids_in_tick_order() {
    let (m, _, _) = manager(small()).await;
    let ch = m.get("walden-dml-0", 0).unwrap();
    let mut tasks = Vec::new();
    for t in 0..8 {
        let ch = ch.clone();
        tasks.push(tokio::spawn(async move {
            let mut r = Vec::new();
            for i in 0..50 {
                r.push(
                    ch.append(insert(&format!("v{t}"), t * 100 + i))
                        .await
                        .unwrap(),
                );
            }
            r
        }));
    }
    let mut results = Vec::new();
    for t in tasks {
        let r = t.await.unwrap();
        assert!(
            r.windows(2).all(|w| w[0].tick < w[1].tick),
            "one task's appends keep order"
        );
        results.extend(r);
    }
    results.sort_by_key(|r| r.id);
    assert!(
        results.windows(2).all(|w| w[0].tick < w[1].tick),
        "id order is tick order"
    );
    for r in &results {
        assert!(
            r.last_confirmed <= r.id,
            "last confirmed never points past the message"
        );
    }
    let all = collect(ch, DeliverPolicy::All, Filters::default(), 400).await;
    assert!(all.windows(2).all(|w| w[0].time_tick() < w[1].time_tick()));
    assert_eq!(inserts(&all).len(), 400);
}

#[tokio::test]
async fn resuming_after_the_last_delivered_tick_delivers_each_message_once() {
    let (m, _, _) = manager(small()).await;
    let ch = m.get("walden-dml-0", 0).unwrap();
    for i in 0..30 {
        ch.append(insert("v", i)).await.unwrap();
    }
    let first = collect(ch.clone(), DeliverPolicy::All, Filters::default(), 12).await;
    let last = first.last().unwrap();
    // What the client does on reconnect: start from the last message's last-confirmed id and
    // keep only greater ticks.
    for i in 30..40 {
        ch.append(insert("v", i)).await.unwrap();
    }
    let filters = Filters {
        tick_gt: Some(last.time_tick()),
        ..Filters::default()
    };
    let rest_needed = 40 - inserts(&first).len();
    let mut rest = Vec::new();
    let (tx, mut rx) = mpsc::channel(64);
    let task = tokio::spawn(scanner::scan(
        ch.clone(),
        DeliverPolicy::StartFrom(last.last_confirmed()),
        filters,
        tx,
    ));
    while inserts(&rest).len() < rest_needed {
        rest.push(common::within(rx.recv()).await.unwrap().unwrap());
    }
    task.abort();
    let mut all = inserts(&first);
    all.extend(inserts(&rest));
    let expected: Vec<_> = (0..40).map(|i| format!("m{i}")).collect();
    assert_eq!(all, expected, "nothing lost, nothing twice");
}

#[tokio::test]
async fn a_consumer_behind_the_write_ahead_buffer_catches_up_from_storage() {
    let (m, _, _) = manager(NodeConfig {
        wab_capacity_bytes: 600,
        ..small()
    })
    .await;
    let ch = m.get("walden-dml-1", 0).unwrap();
    for i in 0..200 {
        ch.append(insert("v", i)).await.unwrap();
    }
    assert!(
        ch.wab.floor() > MessageId(100),
        "the buffer evicted most of the tail"
    );
    let got = collect(ch.clone(), DeliverPolicy::All, Filters::default(), 200).await;
    assert_eq!(
        inserts(&got),
        (0..200).map(|i| format!("m{i}")).collect::<Vec<_>>()
    );
    assert!(
        got.windows(2)
            .all(|w| w[0].id < w[1].id && w[0].time_tick() < w[1].time_tick())
    );
}

#[tokio::test]
async fn filters_select_by_vchannel_type_and_tick_and_latest_skips_the_past() {
    let (m, _, _) = manager(small()).await;
    let ch = m.get("walden-dml-0", 0).unwrap();
    let mut ticks = Vec::new();
    for i in 0..10 {
        let vc = if i % 2 == 0 { "even" } else { "odd" };
        ticks.push(ch.append(insert(vc, i)).await.unwrap().tick);
    }
    let only_even = Filters {
        vchannel: Some("even".into()),
        types: Some(vec![MessageType::Data]),
        ..Filters::default()
    };
    let got = collect(ch.clone(), DeliverPolicy::All, only_even, 5).await;
    assert_eq!(inserts(&got), ["m0", "m2", "m4", "m6", "m8"]);

    let after = Filters {
        tick_gt: Some(ticks[6]),
        types: Some(vec![MessageType::Data]),
        ..Filters::default()
    };
    let got = collect(ch.clone(), DeliverPolicy::All, after, 3).await;
    assert_eq!(inserts(&got), ["m7", "m8", "m9"]);

    let (tx, mut rx) = mpsc::channel(16);
    let latest = Filters {
        types: Some(vec![MessageType::Data]),
        ..Filters::default()
    };
    let task = tokio::spawn(scanner::scan(ch.clone(), DeliverPolicy::Latest, latest, tx));
    // No sleep to let the scan start: append until it delivers something, which must be
    // one of these (never m0..m9, written before it).
    let mut sent = Vec::new();
    let m = loop {
        let i = 99 + sent.len();
        ch.append(insert("v", i)).await.unwrap();
        sent.push(Bytes::from(format!("m{i}")));
        if let Ok(m) = tokio::time::timeout(Duration::from_millis(200), rx.recv()).await {
            break m.unwrap().unwrap();
        }
        assert!(sent.len() < 50, "the latest scan never delivered");
    };
    assert!(
        sent.contains(&m.payload),
        "latest sees only what came after it"
    );
    task.abort();
}

#[tokio::test]
async fn time_ticks_are_written_only_after_real_messages() {
    let (m, storage, _) = manager(small()).await;
    let ch = m.get("walden-dml-0", 0).unwrap();
    let wal = storage.open("walden-dml-0", ch.term()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let idle_end = wal.durable_end();
    assert_eq!(
        idle_end,
        MessageId(1),
        "only the first (fence) TimeTick while idle"
    );
    ch.append(insert("v", 0)).await.unwrap();
    // A TimeTick follows the real message within a few intervals.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while wal.durable_end() < MessageId(3) {
        assert!(
            std::time::Instant::now() < deadline,
            "no TimeTick after a real message"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let got = collect(ch.clone(), DeliverPolicy::All, Filters::default(), 1).await;
    let mut got = got;
    let (tx, mut rx) = mpsc::channel(4);
    let task = tokio::spawn(scanner::scan(
        ch.clone(),
        DeliverPolicy::StartAfter(got[1].id),
        Filters::default(),
        tx,
    ));
    got.push(common::within(rx.recv()).await.unwrap().unwrap());
    task.abort();
    let types: Vec<_> = got.iter().map(|m| m.message_type()).collect();
    assert_eq!(
        types,
        [
            MessageType::TimeTick,
            MessageType::Data,
            MessageType::TimeTick
        ]
    );
    assert_eq!(
        wal.durable_end(),
        MessageId(3),
        "no further ticks while idle again"
    );
}

#[tokio::test]
async fn reopening_takes_a_higher_term_and_ticks_keep_growing() {
    let storage = MemoryWalStorage::new();
    let meta = MemoryMetaStore::new();
    let start = || common::start(&storage, &meta, small());
    let m1 = start().await;
    let ch1 = m1.get("walden-dml-0", 0).unwrap();
    let last = ch1.append(insert("v", 0)).await.unwrap().tick;
    let term1 = ch1.term();
    m1.shutdown().await;
    let m2 = start().await;
    let ch2 = m2.get("walden-dml-0", 0).unwrap();
    assert!(ch2.term() > term1);
    assert!(matches!(
        m2.get("walden-dml-0", term1.0),
        Err(NodeError::TermMismatch { .. })
    ));
    let next = ch2.append(insert("v", 1)).await.unwrap().tick;
    assert!(next > last);
    assert!(next > TimeTick(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storage_failure_reopens_the_pchannel_under_a_new_term_and_keeps_acknowledged_data() {
    use walden_common::{ErrorCode, HasErrorCode};
    use walden_wal_local::{
        LocalWalConfig, LocalWalStorage,
        fs::{FaultFs, FaultPlan},
    };

    let fs = FaultFs::new();
    let storage = LocalWalStorage::with_fs("/wal", Arc::new(fs.clone()), LocalWalConfig::default());
    let m = WalManager::start(
        Arc::new(storage) as Arc<dyn WalStorage>,
        Arc::new(MemoryMetaStore::new()) as Arc<dyn MetaStore>,
        NodeConfig {
            pchannels: 1,
            ..small()
        },
        Metrics::new(),
    )
    .await
    .unwrap();
    let ch = m.get("walden-dml-0", 0).unwrap();
    let term = ch.term();
    let before = ch.append(insert("v", 0)).await.unwrap();

    // The next fsync fails: the append gets a retryable storage error.
    fs.set_plan(FaultPlan {
        fail_sync_at: Some(0),
        ..FaultPlan::default()
    });
    let err = ch.append(insert("v", 1)).await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::StorageUnavailable, "{err}");
    assert!(err.is_retryable());

    // The manager reopens it under a higher term; appends work again.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let reopened = loop {
        if let Ok(c) = m.get("walden-dml-0", 0)
            && c.term() > term
        {
            break c;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the pchannel was not reopened"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let after = reopened.append(insert("v", 2)).await.unwrap();
    assert!(after.tick > before.tick && after.id > before.id);
    // m1 failed: its bytes may or may not have reached the file, so it is there whole or not
    // at all (recovery syncs what it keeps). m0 and m2 were acknowledged.
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    let task = tokio::spawn(scanner::scan(
        reopened,
        DeliverPolicy::All,
        Filters::default(),
        tx,
    ));
    let mut payloads = Vec::new();
    while payloads.last().map(String::as_str) != Some("m2") {
        let m = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        payloads.extend(inserts(&[m]));
    }
    task.abort();
    assert!(
        payloads == ["m0", "m2"] || payloads == ["m0", "m1", "m2"],
        "got {payloads:?}"
    );
}

/// The first scan error, within 5 s.
async fn scan_error(channel: Arc<Channel>, policy: DeliverPolicy) -> NodeError {
    let (tx, mut rx) = mpsc::channel(64);
    let task = tokio::spawn(scanner::scan(channel, policy, Filters::default(), tx));
    loop {
        let r = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("an answer in time")
            .expect("the scan reports before it ends");
        if let Err(e) = r {
            task.abort();
            return e;
        }
    }
}

#[tokio::test]
async fn a_consumer_starting_below_the_truncation_point_gets_truncated() {
    use walden_common::HasErrorCode;
    let (m, _, _) = manager(small()).await;
    let ch = m.get("walden-dml-0", 0).unwrap();
    for i in 0..20 {
        ch.append(insert("v", i)).await.unwrap();
    }
    ch.wal().truncate(MessageId(10)).await.unwrap();
    let first = ch.wal().first_id();
    assert!(first > MessageId(0));
    let e = scan_error(ch.clone(), DeliverPolicy::StartFrom(MessageId(0))).await;
    assert_eq!(e.code(), walden_common::ErrorCode::Truncated, "{e}");
    assert!(!e.is_retryable());
    // From the first retained id on, it reads.
    let got = collect(ch, DeliverPolicy::StartFrom(first), Filters::default(), 1).await;
    assert!(got[0].id >= first);
}

#[tokio::test]
async fn appends_and_scans_during_a_shutdown_get_on_shutdown_and_a_retry_hint() {
    use walden_common::HasErrorCode;
    let (m, _, _) = manager(small()).await;
    let ch = m.get("walden-dml-0", 0).unwrap();
    ch.append(insert("v", 0)).await.unwrap();
    let (tx, mut rx) = mpsc::channel(64);
    let scan = tokio::spawn(scanner::scan(
        ch.clone(),
        DeliverPolicy::All,
        Filters::default(),
        tx,
    ));
    m.shutdown().await;
    let e = ch.append(insert("v", 1)).await.unwrap_err();
    assert_eq!(e.code(), walden_common::ErrorCode::OnShutdown, "{e}");
    assert!(
        e.is_retryable(),
        "ON_SHUTDOWN sends the caller to the next owner"
    );
    let e = m.get("walden-dml-0", 0).unwrap_err();
    assert_eq!(e.code(), walden_common::ErrorCode::OnShutdown, "{e}");
    // The tailing scan ends with ON_SHUTDOWN after what it held.
    let end = loop {
        match tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(e))) => break e,
            other => panic!("the scan ended without saying why: {other:?}"),
        }
    };
    assert_eq!(end.code(), walden_common::ErrorCode::OnShutdown, "{end}");
    scan.abort();
}

/// A WAL whose acknowledgements wait until the test opens the gate (records are enqueued, and
/// get their ids, at once).
mod gated {
    use std::sync::Arc;

    use bytes::Bytes;
    use futures::{FutureExt, future::BoxFuture};
    use tokio::sync::watch;
    use walden_common::{MessageId, Term};
    use walden_wal_api::{ReadFrom, Wal, WalError, WalReader, WalStorage};

    #[derive(Debug, Clone)]
    pub struct Gated {
        pub inner: walden_wal_api::memory::MemoryWalStorage,
        pub open: watch::Sender<bool>,
    }

    #[derive(Debug)]
    struct GatedWal(Arc<dyn Wal>, watch::Receiver<bool>);

    impl WalStorage for Gated {
        fn name(&self) -> &'static str {
            "gated"
        }
        fn open<'a>(
            &'a self,
            pchannel: &'a str,
            term: Term,
        ) -> BoxFuture<'a, Result<Arc<dyn Wal>, WalError>> {
            async move {
                let w = self.inner.open(pchannel, term).await?;
                Ok(Arc::new(GatedWal(w, self.open.subscribe())) as Arc<dyn Wal>)
            }
            .boxed()
        }
    }

    impl Wal for GatedWal {
        fn pchannel(&self) -> &str {
            self.0.pchannel()
        }
        fn term(&self) -> Term {
            self.0.term()
        }
        fn append(&self, record: Bytes) -> BoxFuture<'static, Result<MessageId, WalError>> {
            let done = self.0.append(record);
            let mut gate = self.1.clone();
            async move {
                let _ = gate.wait_for(|open| *open).await;
                done.await
            }
            .boxed()
        }
        fn next_id(&self) -> MessageId {
            self.0.next_id()
        }
        fn first_id(&self) -> MessageId {
            self.0.first_id()
        }
        fn durable_end(&self) -> MessageId {
            self.0.durable_end()
        }
        fn size_bytes(&self) -> u64 {
            self.0.size_bytes()
        }
        fn read(&self, from: ReadFrom) -> Result<Box<dyn WalReader>, WalError> {
            self.0.read(from)
        }
        fn truncate(&self, below: MessageId) -> BoxFuture<'_, Result<(), WalError>> {
            self.0.truncate(below)
        }
        fn close(&self) -> BoxFuture<'_, Result<(), WalError>> {
            self.0.close()
        }
    }
}

/// Past `node.max_inflight_bytes` of appends not yet durable, a submit waits (the service
/// then stops reading the producer's stream) until earlier appends complete; none is lost.
#[tokio::test]
async fn appends_past_the_in_flight_byte_limit_wait_for_earlier_ones_to_complete() {
    let gate = gated::Gated {
        inner: MemoryWalStorage::new(),
        open: tokio::sync::watch::channel(true).0,
    };
    let meta = MemoryMetaStore::new();
    let m = WalManager::start(
        Arc::new(gate.clone()) as Arc<dyn WalStorage>,
        Arc::new(meta) as Arc<dyn MetaStore>,
        NodeConfig {
            pchannels: 1,
            max_message_bytes: 1024,
            max_inflight_bytes: 2048,
            ..NodeConfig::default()
        },
        Metrics::new(),
    )
    .await
    .unwrap();
    let ch = m.get("walden-dml-0", 0).unwrap();
    gate.open.send_replace(false);
    let big = |i: u8| MutableMessage::new(MessageType::Data, "v", Bytes::from(vec![i; 1000]));
    let first = ch.submit(big(1)).await.unwrap();
    let second = ch.submit(big(2)).await.unwrap();
    // 2 000 bytes in flight: a third does not fit and waits.
    // (The task ends when the submit returns, i.e. once the message is enqueued.)
    let third = tokio::spawn({
        let ch = ch.clone();
        async move { ch.submit(big(3)).await.unwrap() }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !third.is_finished(),
        "a submit past the in-flight limit did not wait"
    );
    gate.open.send_replace(true);
    let a = first.wait().await.unwrap();
    let b = second.wait().await.unwrap();
    let c = common::within(third).await.unwrap().wait().await.unwrap();
    assert!(a.id < b.id && b.id < c.id, "in order, none lost");
}
