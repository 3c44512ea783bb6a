//! Collection invariants, segment lifecycle and state recovery on one pchannel (in-memory WAL
//! and metastore; the gRPC and CLI faces are tested in the `walden` crate).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::sync::Arc;

use bytes::Bytes;
use prost::Message as _;
use serde_json::json;
use walden_common::{ErrorCode, HasErrorCode, MessageId};
use walden_message::{ImmutableMessage, MessageType, MutableMessage, codec};
use walden_metastore_api::MemoryMetaStore;
use walden_proto::v1::{CollectionInfo, DeleteIds, FlushInfo};
use walden_schema::Schema;
use walden_streaming_node::{NodeConfig, NodeError, channel::Channel, manager::WalManager};
use walden_wal_api::{ReadFrom, memory::MemoryWalStorage};

const SCHEMA: &str = r#"{"fields":[{"name":"id","type":"int64","primary_key":true},{"name":"emb","type":"float_vector","dim":2}]}"#;
const VC: &str = "walden-dml-0_7v0";

fn config() -> NodeConfig {
    NodeConfig {
        pchannels: 1,
        time_tick_interval_ms: 20,
        segment_max_rows: 10,
        // Checkpoints only when a test asks for one.
        checkpoint_interval_ms: 3_600_000,
        checkpoint_max_dirty_messages: 1_000_000,
        ..NodeConfig::default()
    }
}

struct Node {
    storage: MemoryWalStorage,
    meta: MemoryMetaStore,
    manager: Arc<WalManager>,
}

impl Node {
    async fn start(config: NodeConfig) -> Self {
        Self::restart(MemoryWalStorage::new(), MemoryMetaStore::new(), config).await
    }

    async fn restart(storage: MemoryWalStorage, meta: MemoryMetaStore, config: NodeConfig) -> Self {
        let manager = common::start(&storage, &meta, config).await;
        Self {
            storage,
            meta,
            manager,
        }
    }

    fn channel(&self) -> Arc<Channel> {
        self.manager.get("walden-dml-0", 0).unwrap()
    }
}

fn schema() -> Schema {
    Schema::from_json(SCHEMA).unwrap()
}

fn create(vc: &str, id: u64) -> MutableMessage {
    let info = CollectionInfo {
        collection_id: id,
        name: format!("c{id}"),
        schema: Some(schema().proto().clone()),
        ..CollectionInfo::default()
    };
    MutableMessage::new(
        MessageType::CreateCollection,
        vc,
        Bytes::from(info.encode_to_vec()),
    )
}

fn insert(vc: &str, ids: std::ops::Range<i64>) -> MutableMessage {
    let s = schema();
    let rows: Vec<_> = ids.map(|i| json!({"id": i, "emb": [i, 0.5]})).collect();
    let payload = s.encode_ipc(&s.rows_from_json(&rows).unwrap()).unwrap();
    MutableMessage::new(MessageType::Insert, vc, payload)
}

fn ddl(t: MessageType, vc: &str, partition: &str) -> MutableMessage {
    MutableMessage::new(t, vc, Bytes::new()).with_partition(partition)
}

async fn log(ch: &Channel) -> Vec<ImmutableMessage> {
    let mut r = ch.wal().read(ReadFrom::At(ch.wal().first_id())).unwrap();
    let mut out = Vec::new();
    while let Some((id, rec)) = r.next().await.unwrap() {
        let m = codec::decode(id, rec).unwrap();
        if m.message_type() != MessageType::TimeTick {
            out.push(m);
        }
    }
    out
}

/// A Data message of idempotent producer `producer`, number `seq`, with payload `s{seq}`.
fn numbered(producer: u64, seq: u64) -> MutableMessage {
    let mut m = MutableMessage::new(MessageType::Data, "raw", Bytes::from(format!("s{seq}")));
    m.producer = Some((producer, seq));
    m
}

/// Appends `msg` and expects `code`, with nothing written.
async fn refused(ch: &Channel, msg: MutableMessage, code: ErrorCode) -> NodeError {
    let before = ch.wal().next_id();
    let e = ch.append(msg).await.expect_err("must be refused");
    assert_eq!(e.code(), code, "{e}");
    assert_eq!(
        ch.wal().next_id(),
        before,
        "a refused message wrote something"
    );
    e
}

#[tokio::test]
async fn dml_before_create_after_drop_and_into_dropped_partitions_is_refused_and_writes_nothing() {
    let node = Node::start(config()).await;
    let ch = node.channel();
    refused(&ch, insert(VC, 0..2), ErrorCode::CollectionNotFound).await;
    refused(
        &ch,
        ddl(MessageType::DropCollection, VC, ""),
        ErrorCode::CollectionNotFound,
    )
    .await;

    ch.append(create(VC, 7)).await.unwrap();
    refused(&ch, create(VC, 7), ErrorCode::CollectionExists).await;
    ch.append(ddl(MessageType::CreatePartition, VC, "p1"))
        .await
        .unwrap();
    refused(
        &ch,
        ddl(MessageType::CreatePartition, VC, "p1"),
        ErrorCode::PartitionExists,
    )
    .await;
    ch.append(insert(VC, 0..2).with_partition("p1"))
        .await
        .unwrap();
    refused(
        &ch,
        insert(VC, 2..3).with_partition("nope"),
        ErrorCode::PartitionNotFound,
    )
    .await;
    ch.append(ddl(MessageType::DropPartition, VC, "p1"))
        .await
        .unwrap();
    refused(
        &ch,
        insert(VC, 2..3).with_partition("p1"),
        ErrorCode::PartitionNotFound,
    )
    .await;
    refused(
        &ch,
        ddl(MessageType::DropPartition, VC, "_default"),
        ErrorCode::InvalidArgument,
    )
    .await;

    // Schema and key checks happen before anything is written.
    let other = Schema::from_json(
        r#"{"fields":[{"name":"id","type":"int64","primary_key":true},{"name":"emb","type":"float_vector","dim":3}]}"#,
    )
    .unwrap();
    let wrong_dim = other
        .encode_ipc(
            &other
                .rows_from_json(&[json!({"id": 1, "emb": [1, 2, 3]})])
                .unwrap(),
        )
        .unwrap();
    refused(
        &ch,
        MutableMessage::new(MessageType::Insert, VC, wrong_dim),
        ErrorCode::SchemaMismatch,
    )
    .await;
    let garbage = MutableMessage::new(MessageType::Insert, VC, Bytes::from_static(b"not arrow"));
    refused(&ch, garbage, ErrorCode::InvalidArgument).await;
    let str_keys = DeleteIds {
        str_ids: vec!["a".into()],
        ..DeleteIds::default()
    };
    let bad_delete = MutableMessage::new(
        MessageType::Delete,
        VC,
        Bytes::from(str_keys.encode_to_vec()),
    );
    refused(&ch, bad_delete, ErrorCode::SchemaMismatch).await;
    refused(
        &ch,
        MutableMessage::new(MessageType::Data, VC, Bytes::from_static(b"x")),
        ErrorCode::InvalidArgument,
    )
    .await;

    ch.append(ddl(MessageType::DropCollection, VC, ""))
        .await
        .unwrap();
    refused(&ch, insert(VC, 5..6), ErrorCode::CollectionDropped).await;
    refused(
        &ch,
        ddl(MessageType::DropCollection, VC, ""),
        ErrorCode::CollectionDropped,
    )
    .await;
    refused(&ch, create(VC, 7), ErrorCode::CollectionExists).await;

    let types: Vec<_> = log(&ch)
        .await
        .iter()
        .map(ImmutableMessage::message_type)
        .collect();
    use MessageType::*;
    assert_eq!(
        types,
        [
            CreateCollection,
            CreatePartition,
            CreateSegment,
            Insert,
            DropPartition,
            DropCollection
        ]
    );
}

#[tokio::test]
async fn the_node_opens_segments_before_inserts_and_seals_them_when_full() {
    let node = Node::start(config()).await;
    let ch = node.channel();
    ch.append(create(VC, 7)).await.unwrap();
    // 10 rows per segment: 6 + 6 crosses the limit, so the second insert seals the segment.
    ch.append(insert(VC, 0..6)).await.unwrap();
    ch.append(insert(VC, 6..12)).await.unwrap();
    ch.append(insert(VC, 12..14)).await.unwrap();
    let msgs = log(&ch).await;
    let types: Vec<_> = msgs.iter().map(ImmutableMessage::message_type).collect();
    use MessageType::*;
    assert_eq!(
        types,
        [
            CreateCollection,
            CreateSegment,
            Insert,
            Insert,
            Flush,
            CreateSegment,
            Insert
        ]
    );
    let first = msgs[1].header.segment_id;
    let second = msgs[5].header.segment_id;
    assert_ne!(first, second);
    assert_eq!(msgs[2].header.segment_id, first);
    assert_eq!(msgs[3].header.segment_id, first);
    assert_eq!(msgs[6].header.segment_id, second);
    assert_eq!(msgs[2].header.rows, 6);
    assert!(msgs.iter().all(|m| m.header.collection_id == 7));
    let flush = FlushInfo::decode(msgs[4].payload.as_ref()).unwrap();
    assert_eq!(
        (flush.segment_ids, flush.reason.as_str()),
        (vec![first], "rows")
    );

    // An insert naming the sealed segment is refused; naming the growing one is accepted.
    let mut into_sealed = insert(VC, 20..21);
    into_sealed.coll.segment_id = first;
    refused(&ch, into_sealed, ErrorCode::SegmentSealed).await;
    let mut into_growing = insert(VC, 20..21);
    into_growing.coll.segment_id = second;
    ch.append(into_growing).await.unwrap();

    // A manual flush seals every growing segment of the vchannel.
    ch.append(ddl(MessageType::Flush, VC, "")).await.unwrap();
    let last = log(&ch).await.pop().unwrap();
    let flush = FlushInfo::decode(last.payload.as_ref()).unwrap();
    assert_eq!(
        (flush.segment_ids, flush.reason.as_str()),
        (vec![second], "manual")
    );
    ch.append(insert(VC, 30..31)).await.unwrap();
    let msgs = log(&ch).await;
    let n = msgs.len();
    assert_eq!(msgs[n - 2].message_type(), CreateSegment);
    assert_ne!(msgs[n - 1].header.segment_id, second);
}

#[tokio::test]
async fn idle_segments_are_sealed_by_the_time_tick_task() {
    let node = Node::start(NodeConfig {
        segment_idle_ms: 50,
        ..config()
    })
    .await;
    let ch = node.channel();
    ch.append(create(VC, 7)).await.unwrap();
    ch.append(insert(VC, 0..3)).await.unwrap();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let msgs = log(&ch).await;
        if let Some(f) = msgs.iter().find(|m| m.message_type() == MessageType::Flush) {
            let info = FlushInfo::decode(f.payload.as_ref()).unwrap();
            assert_eq!(info.reason, "idle");
            assert_eq!(info.segment_ids, vec![msgs[1].header.segment_id]);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no idle seal in 5 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn state_survives_a_restart_and_replay_starts_at_the_checkpoint() {
    let node = Node::start(config()).await;
    let ch = node.channel();
    ch.append(create(VC, 7)).await.unwrap();
    ch.append(ddl(MessageType::CreatePartition, VC, "p1"))
        .await
        .unwrap();
    for i in 0..20 {
        ch.append(insert(VC, i * 3..i * 3 + 3)).await.unwrap();
    }
    let cp = ch.checkpoint().await.unwrap();
    ch.append(insert(VC, 100..101)).await.unwrap();
    ch.append(ddl(MessageType::DropPartition, VC, "p1"))
        .await
        .unwrap();
    let end = ch.wal().next_id();
    // No shutdown: as after kill -9, the last checkpoint is the one above.
    let (storage, meta) = (node.storage.clone(), node.meta.clone());
    drop(ch);
    drop(node);

    let node = Node::restart(storage, meta, config()).await;
    let ch = node.channel();
    let rec = ch.recovery();
    assert_eq!(rec.from, cp);
    // What followed the checkpoint (3 messages and perhaps a TimeTick), not the 33 before it.
    assert!(cp >= MessageId(33), "{cp}");
    assert!(
        rec.replayed >= end.0 - cp.0 && rec.replayed <= end.0 - cp.0 + 1,
        "{rec:?}, end {end}"
    );
    // The state is whole: the partition drop after the checkpoint and the collection before it.
    refused(
        &ch,
        insert(VC, 200..201).with_partition("p1"),
        ErrorCode::PartitionNotFound,
    )
    .await;
    refused(&ch, create(VC, 7), ErrorCode::CollectionExists).await;
    ch.append(insert(VC, 200..201)).await.unwrap();
    // Rows since the last seal are still counted: 61 rows were written, 10 per segment, so
    // the growing segment holds 1 + 1 and the next 8 rows seal it.
    ch.append(insert(VC, 300..308)).await.unwrap();
    let last = log(&ch).await.pop().unwrap();
    assert_eq!(last.message_type(), MessageType::Flush);
}

#[tokio::test]
async fn after_a_restart_a_resend_older_than_the_rebuilt_window_is_refused_not_written_twice() {
    let cfg = NodeConfig {
        dedup_rebuild_messages: 10,
        ..config()
    };
    let node = Node::start(cfg.clone()).await;
    let ch = node.channel();
    let numbered = |seq| numbered(42, seq);
    for seq in 1..=5 {
        ch.append(numbered(seq)).await.unwrap();
    }
    ch.checkpoint().await.unwrap();
    // Other traffic pushes producer 42 out of the WAL tail that the restart reads.
    for i in 0..50 {
        ch.append(MutableMessage::new(
            MessageType::Data,
            "other",
            Bytes::from(vec![i]),
        ))
        .await
        .unwrap();
    }
    let (storage, meta) = (node.storage.clone(), node.meta.clone());
    drop(ch);
    drop(node);

    let node = Node::restart(storage, meta, cfg).await;
    let ch = node.channel();
    let before = ch.wal().next_id();
    let e = ch
        .append(numbered(3))
        .await
        .expect_err("a resend of a written message");
    assert_eq!(e.code(), ErrorCode::InvalidArgument, "{e}");
    assert_eq!(ch.wal().next_id(), before, "written twice");
    ch.append(numbered(6)).await.unwrap();
}

/// A resend that arrives while its original is still in flight waits for the original and gets
/// its place; a resend after a failed original would write it (the window forgets failures).
/// On a current-thread runtime nothing completes between the two submits, so the second one
/// finds the first in flight.
#[tokio::test(flavor = "current_thread")]
async fn a_resend_while_the_original_is_in_flight_gets_its_place_and_is_written_once() {
    let node = Node::start(config()).await;
    let ch = node.channel();
    let numbered = |seq| numbered(7, seq);
    let before = ch.wal().next_id();
    let original = ch.submit(numbered(1)).await.unwrap();
    let resend = ch.submit(numbered(1)).await.unwrap();
    let other = ch.submit(numbered(2)).await.unwrap();
    let (a, b) = (original.wait().await.unwrap(), resend.wait().await.unwrap());
    assert_eq!(a, b, "the resend got another place");
    assert_eq!(a.id, before);
    assert_eq!(other.wait().await.unwrap().id, before.next());
    // And once durable, a resend is answered from the window.
    assert_eq!(ch.append(numbered(1)).await.unwrap(), a);
    // Written once each (TimeTicks may come in between: the log, not the id count, says so).
    let payloads: Vec<Bytes> = log(&ch).await.into_iter().map(|m| m.payload).collect();
    assert_eq!(payloads, [Bytes::from("s1"), Bytes::from("s2")]);
}

#[tokio::test]
async fn closing_a_pchannel_takes_its_growing_segments_out_of_the_node_total() {
    let node = Node::start(config()).await;
    let ch = node.channel();
    ch.append(create(VC, 7)).await.unwrap();
    ch.append(insert(VC, 0..3)).await.unwrap();
    let growing = ch.metrics().growing_bytes.get();
    assert!(growing > 0);
    // A reopen (as after a storage failure) counts the same segments again; the closed
    // incarnation must not still count them, or the memory policy seals too early.
    ch.close().await;
    ch.close().await;
    assert_eq!(ch.metrics().growing_bytes.get(), 0);
}
