//! Each consistency level's meaning, pinned with a delegator made to lag: a read replica whose
//! reader (the `PChannelReader` seam, here the test's) holds back what the owner acknowledged.
//!
//! * `strong` waits for the owner's last acknowledged tick: it sees every acknowledged write,
//!   and fails with LAG_TOO_LARGE (retryable) while the reader is held past `max_wait_ms`;
//! * `session` waits only for the asking client's own writes: it answers at once with them and
//!   may miss others' writes;
//! * `bounded` sees everything older than `bounded_staleness_ms` and answers at once while the
//!   shard is within it, and fails with LAG_TOO_LARGE once the shard falls further behind;
//! * `eventually` answers at once, whatever the lag.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use prost::Message as _;
use tokio::sync::mpsc;
use tonic::Request;
use walden_common::{ErrorCode, MessageId, Term, TimeTick};
use walden_delegator::{Delegators, PChannelReader, QueryConfig, service::QueryService};
use walden_message::{Delivery, ImmutableMessage, MessageType, MutableMessage};
use walden_metastore_api::{MemoryMetaStore, MetaStore, keys};
use walden_proto::v1::{
    CollectionInfo, ConsistencyLevel, QueryRequest, ReadOptions, ReadReplica, ReadReplicas,
    VChannelInfo, query_server::Query,
};
use walden_schema::Schema;

const PCHANNEL: &str = "p0";
const VCHANNEL: &str = "p0_1v0";
const SCHEMA: &str = r#"{"fields":[
  {"name":"id","type":"int64","primary_key":true},
  {"name":"emb","type":"float_vector","dim":2}]}"#;

/// The owner's stream as the test releases it, and the owner's last acknowledged tick.
#[derive(Debug, Default)]
struct HeldReader {
    tx: Mutex<Option<mpsc::Sender<Result<Delivery, String>>>>,
    last_tick: AtomicU64,
}

impl PChannelReader for HeldReader {
    fn read(
        &self,
        _pchannel: &str,
        _from: Option<MessageId>,
    ) -> mpsc::Receiver<Result<Delivery, String>> {
        let (tx, rx) = mpsc::channel(64);
        *self.tx.lock().unwrap() = Some(tx);
        rx
    }

    fn last_tick<'a>(
        &'a self,
        _pchannel: &'a str,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<u64, String>> + Send + 'a>> {
        Box::pin(async move { Ok(self.last_tick.load(Ordering::SeqCst)) })
    }
}

impl HeldReader {
    /// Hands `d` to the replica.
    async fn release(&self, d: Delivery) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let tx = self.tx.lock().unwrap().clone();
            if let Some(tx) = tx {
                tx.send(Ok(d)).await.unwrap();
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the replica never started reading"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// A tick at the wall clock now (what the owner's oracle would hand out).
fn now_tick() -> TimeTick {
    TimeTick::compose(walden_tso::now_ms(), 0)
}

/// Rows `ids` as the owner would have stored them, at `tick` (id `id`).
fn insert(schema: &Schema, id: u64, tick: TimeTick, ids: &[i64]) -> ImmutableMessage {
    let rows: Vec<serde_json::Value> = ids
        .iter()
        .map(|i| serde_json::json!({"id": i, "emb": [*i as f32, 0.0]}))
        .collect();
    let batch = schema.rows_from_json(&rows).unwrap();
    let mut m = MutableMessage::new(
        MessageType::Insert,
        VCHANNEL,
        schema.encode_ipc(&batch).unwrap(),
    );
    m.coll.segment_id = 7;
    m.coll.partition = walden_message::DEFAULT_PARTITION.into();
    m.coll.collection_id = 1;
    m.coll.rows = ids.len() as u64;
    ImmutableMessage {
        id: MessageId(id),
        header: m.header(tick, Term(1), MessageId(id)),
        payload: m.payload,
    }
}

fn segment(id: u64, tick: TimeTick) -> ImmutableMessage {
    let mut m = MutableMessage::new(MessageType::CreateSegment, VCHANNEL, Bytes::new());
    m.coll.segment_id = 7;
    m.coll.partition = walden_message::DEFAULT_PARTITION.into();
    m.coll.collection_id = 1;
    ImmutableMessage {
        id: MessageId(id),
        header: m.header(tick, Term(1), MessageId(id)),
        payload: m.payload,
    }
}

/// A count at `level` (session: waiting for `session_tick`): the count, or the error code,
/// and how long it took.
async fn count(
    service: &QueryService,
    level: ConsistencyLevel,
    session_tick: u64,
) -> (Result<u64, ErrorCode>, Duration) {
    let started = Instant::now();
    let r = service
        .query(Request::new(QueryRequest {
            collection: "c".into(),
            vchannels: vec![VCHANNEL.into()],
            count_only: true,
            options: Some(ReadOptions {
                consistency: level as i32,
                guarantee_tick: session_tick,
                partitions: vec![],
            }),
            ..Default::default()
        }))
        .await;
    let r = r.map(|r| r.into_inner().count).map_err(|s| {
        let e = walden_proto::v1::Error::decode(s.details()).unwrap();
        ErrorCode::from_u32(e.code).unwrap()
    });
    (r, started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_consistency_level_means_what_it_says_on_a_lagging_replica() {
    let meta: Arc<dyn MetaStore> = Arc::new(MemoryMetaStore::new());
    let schema = Schema::from_json(SCHEMA).unwrap();
    let info = CollectionInfo {
        name: "c".into(),
        collection_id: 1,
        schema: Some(schema.proto().clone()),
        vchannels: vec![VChannelInfo {
            name: VCHANNEL.into(),
            pchannel: PCHANNEL.into(),
        }],
        partitions: vec![walden_message::DEFAULT_PARTITION.into()],
        ..Default::default()
    };
    meta.put(&keys::collection("c"), info.encode_to_vec().into(), None)
        .await
        .unwrap();
    let replicas = ReadReplicas {
        collection_id: 1,
        collection: "c".into(),
        vchannels: vec![ReadReplica {
            vchannel: VCHANNEL.into(),
            pchannel: PCHANNEL.into(),
            nodes: vec![1],
            ..Default::default()
        }],
    };
    meta.put(&keys::replicas(1), replicas.encode_to_vec().into(), None)
        .await
        .unwrap();
    let blobs = walden_object_store::open(
        &walden_object_store::ObjectStoreConfig {
            url: "memory://".into(),
            ..Default::default()
        },
        walden_object_store::StoreMetrics::new(&prometheus::Registry::new()).unwrap(),
    )
    .await
    .unwrap();
    let config = QueryConfig {
        max_wait_ms: 300,
        bounded_staleness_ms: 1000,
        ..QueryConfig::default()
    };
    let delegators = Delegators::new(meta, blobs, config, Default::default());
    let reader = Arc::new(HeldReader::default());
    let _replicas = delegators.follow_replicas(|| 1, reader.clone());
    let service = QueryService::new(delegators.clone());

    // The owner acknowledged rows 0..10 (this client's write) and the replica read them.
    let t1 = now_tick();
    reader.last_tick.store(t1.0 + 1, Ordering::SeqCst);
    reader
        .release(Delivery::Messages(vec![
            segment(1, t1),
            insert(&schema, 2, TimeTick(t1.0 + 1), &(0..10).collect::<Vec<_>>()),
        ]))
        .await;
    let (r, _) = count(&service, ConsistencyLevel::Eventually, 0).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut r = r;
    while r != Ok(10) {
        assert!(Instant::now() < deadline, "the replica never served: {r:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
        r = count(&service, ConsistencyLevel::Eventually, 0).await.0;
    }
    let mine = t1.0 + 1;

    // Another client's rows 10..20 are acknowledged by the owner; the reader holds them back.
    let t2 = TimeTick(now_tick().0.max(mine + 1));
    let theirs = insert(&schema, 3, t2, &(10..20).collect::<Vec<_>>());
    reader.last_tick.store(t2.0, Ordering::SeqCst);

    // Strong must see them: it waits, and fails with LAG_TOO_LARGE (retryable) past max_wait.
    let (r, took) = count(&service, ConsistencyLevel::Strong, 0).await;
    assert_eq!(
        r,
        Err(ErrorCode::LagTooLarge),
        "strong while the replica lags"
    );
    assert!(ErrorCode::LagTooLarge.is_retryable());
    assert!(took >= Duration::from_millis(300), "strong waited {took:?}");
    // Session sees this client's own write at once, and not the other client's.
    let (r, took) = count(&service, ConsistencyLevel::Session, mine).await;
    assert_eq!(r, Ok(10), "session: own writes only");
    assert!(took < Duration::from_millis(200), "session took {took:?}");
    // Eventually answers at once with what was read.
    let (r, took) = count(&service, ConsistencyLevel::Eventually, 0).await;
    assert_eq!(r, Ok(10));
    assert!(
        took < Duration::from_millis(200),
        "eventually took {took:?}"
    );
    // Bounded: the shard is within 1 s of the clock, so it answers at once; what it misses
    // is newer than its staleness.
    let (r, took) = count(&service, ConsistencyLevel::Bounded, 0).await;
    assert_eq!(r, Ok(10), "bounded within its staleness");
    assert!(took < Duration::from_millis(200), "bounded took {took:?}");
    // Once the shard falls more than 1 s behind, bounded fails with LAG_TOO_LARGE...
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let (r, _) = count(&service, ConsistencyLevel::Bounded, 0).await;
    assert_eq!(r, Err(ErrorCode::LagTooLarge), "bounded past its staleness");
    // ...while eventually still answers.
    assert_eq!(
        count(&service, ConsistencyLevel::Eventually, 0).await.0,
        Ok(10)
    );

    // The reader catches up: strong sees every acknowledged write; an idle tick (no message)
    // brings bounded back within its staleness.
    reader.release(Delivery::Messages(vec![theirs])).await;
    let (r, took) = count(&service, ConsistencyLevel::Strong, 0).await;
    assert_eq!(r, Ok(20), "strong after the catch-up");
    assert!(took < Duration::from_millis(300));
    reader.release(Delivery::CompleteThrough(now_tick())).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match count(&service, ConsistencyLevel::Bounded, 0).await.0 {
            Ok(n) => {
                assert_eq!(n, 20);
                break;
            }
            Err(e) => assert!(
                e == ErrorCode::LagTooLarge && Instant::now() < deadline,
                "bounded after an idle tick: {e:?}"
            ),
        }
    }
}
