//! Transactions on the node: delivered whole at the commit tick or never; expiry, exclusive
//! messages and restarts roll them back; resuming consumers see them whole.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use tokio::sync::mpsc;
use walden_common::{ErrorCode, HasErrorCode, MessageId, TimeTick};
use walden_message::{ImmutableMessage, MessageType, MutableMessage, TxnContext, codec};
use walden_metastore_api::MemoryMetaStore;
use walden_streaming_node::{
    NodeConfig,
    channel::{AppendResult, Channel},
    scanner::{self, DeliverPolicy, Filters},
};
use walden_wal_api::{ReadFrom, memory::MemoryWalStorage};

fn config() -> NodeConfig {
    NodeConfig {
        pchannels: 1,
        time_tick_interval_ms: 20,
        ..NodeConfig::default()
    }
}

fn data(vc: &str, text: &str) -> MutableMessage {
    MutableMessage::new(MessageType::Data, vc, Bytes::from(text.to_owned()))
}

fn in_txn(mut m: MutableMessage, id: u64) -> MutableMessage {
    m.txn = Some(TxnContext {
        txn_id: id,
        keepalive_ms: 0,
    });
    m
}

async fn begin(ch: &Channel, vc: &str, keepalive_ms: u64) -> u64 {
    let mut m = MutableMessage::new(MessageType::BeginTxn, vc, Bytes::new());
    m.txn = Some(TxnContext {
        txn_id: 0,
        keepalive_ms,
    });
    ch.append(m).await.unwrap().tick.0
}

async fn end(ch: &Channel, vc: &str, id: u64, t: MessageType) -> Result<AppendResult, ErrorCode> {
    let m = in_txn(MutableMessage::new(t, vc, Bytes::new()), id);
    ch.append(m).await.map_err(|e| e.code())
}

/// Delivered messages (not TimeTicks) until `n` arrived.
async fn deliver(
    ch: Arc<Channel>,
    policy: DeliverPolicy,
    filters: Filters,
    n: usize,
) -> Vec<ImmutableMessage> {
    let (tx, mut rx) = mpsc::channel(64);
    let task = tokio::spawn(scanner::scan(ch, policy, filters, tx));
    let mut out = Vec::new();
    while out.len() < n {
        let m = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("in time")
            .unwrap()
            .unwrap();
        if m.message_type() != MessageType::TimeTick {
            out.push(m);
        }
    }
    task.abort();
    out
}

fn payloads(ms: &[ImmutableMessage]) -> Vec<String> {
    ms.iter()
        .filter(|m| m.message_type() == MessageType::Data)
        .map(|m| String::from_utf8(m.payload.to_vec()).unwrap())
        .collect()
}

#[tokio::test]
async fn a_committed_transaction_is_delivered_once_whole_at_its_commit_tick_and_a_rolled_back_one_never()
 {
    let (storage, meta) = (MemoryWalStorage::new(), MemoryMetaStore::new());
    let m = common::start(&storage, &meta, config()).await;
    let ch = m.get("walden-dml-0", 0).unwrap();
    let t1 = begin(&ch, "v", 0).await;
    ch.append(in_txn(data("v", "t1-a"), t1)).await.unwrap();
    let t2 = begin(&ch, "v", 0).await;
    ch.append(data("v", "plain-1")).await.unwrap();
    ch.append(in_txn(data("v", "t2-a"), t2)).await.unwrap();
    ch.append(in_txn(data("v", "t1-b"), t1)).await.unwrap();
    let c1 = end(&ch, "v", t1, MessageType::CommitTxn).await.unwrap();
    end(&ch, "v", t2, MessageType::RollbackTxn).await.unwrap();
    ch.append(data("v", "plain-2")).await.unwrap();
    // The transaction is closed: more body or a second commit is refused, nothing written.
    let before = ch.wal().next_id();
    assert_eq!(
        ch.append(in_txn(data("v", "late"), t1))
            .await
            .unwrap_err()
            .code(),
        ErrorCode::TxnExpired
    );
    assert_eq!(
        end(&ch, "v", t1, MessageType::CommitTxn).await.unwrap_err(),
        ErrorCode::TxnExpired
    );
    assert_eq!(ch.wal().next_id(), before);

    let got = deliver(ch.clone(), DeliverPolicy::All, Filters::default(), 3).await;
    assert_eq!(payloads(&got), ["plain-1", "plain-2"]);
    let txn = &got[1];
    assert_eq!(txn.message_type(), MessageType::Txn);
    assert_eq!((txn.id, txn.time_tick()), (c1.id, c1.tick));
    let inner = txn.txn_messages().unwrap();
    let kinds: Vec<_> = inner.iter().map(ImmutableMessage::message_type).collect();
    use MessageType::*;
    assert_eq!(kinds, [BeginTxn, Data, Data, CommitTxn]);
    assert_eq!(payloads(&inner), ["t1-a", "t1-b"]);
    assert!(got[0].time_tick() < txn.time_tick() && txn.time_tick() < got[2].time_tick());
}

#[tokio::test]
async fn resuming_after_a_message_appended_mid_transaction_still_delivers_the_transaction_whole() {
    let (storage, meta) = (MemoryWalStorage::new(), MemoryMetaStore::new());
    let m = common::start(&storage, &meta, config()).await;
    let ch = m.get("walden-dml-0", 0).unwrap();
    let t = begin(&ch, "v", 0).await;
    ch.append(in_txn(data("v", "body"), t)).await.unwrap();
    let mid = ch.append(data("v", "mid")).await.unwrap();
    ch.append(end_msg(t)).await.unwrap();
    // A consumer that delivered "mid" resumes from its last-confirmed id, after its tick.
    assert!(
        mid.last_confirmed < mid.id,
        "held back to the open transaction's begin"
    );
    let filters = Filters {
        tick_gt: Some(mid.tick),
        ..Filters::default()
    };
    let got = deliver(
        ch.clone(),
        DeliverPolicy::StartFrom(mid.last_confirmed),
        filters,
        1,
    )
    .await;
    assert_eq!(got[0].message_type(), MessageType::Txn);
    assert_eq!(payloads(&got[0].txn_messages().unwrap()), ["body"]);
    // The buffer shortcut for a tick filter starts early enough too.
    let filters = Filters {
        tick_gt: Some(mid.tick),
        ..Filters::default()
    };
    let got = deliver(ch, DeliverPolicy::All, filters, 1).await;
    assert_eq!(got[0].message_type(), MessageType::Txn);
}

fn end_msg(t: u64) -> MutableMessage {
    in_txn(
        MutableMessage::new(MessageType::CommitTxn, "v", Bytes::new()),
        t,
    )
}

#[tokio::test]
async fn idle_transactions_expire_and_exclusive_messages_roll_back_those_on_their_vchannel() {
    let (storage, meta) = (MemoryWalStorage::new(), MemoryMetaStore::new());
    let m = common::start(&storage, &meta, config()).await;
    let ch = m.get("walden-dml-0", 0).unwrap();
    let short = begin(&ch, "v", 30).await;
    // Wait for the node's own RollbackTxn (expiry is checked every TimeTick round), not a
    // fixed while.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    'expired: loop {
        let mut r = ch.wal().read(walden_wal_api::ReadFrom::Earliest).unwrap();
        while let Some((id, rec)) = r.next().await.unwrap() {
            let m = walden_message::codec::decode(id, rec).unwrap();
            if m.message_type() == MessageType::RollbackTxn
                && m.header.txn.as_ref().map(|c| c.txn_id) == Some(short)
            {
                break 'expired;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the transaction never expired"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        end(&ch, "v", short, MessageType::CommitTxn)
            .await
            .unwrap_err(),
        ErrorCode::TxnExpired
    );

    // A collection vchannel: a manual flush is exclusive.
    let schema = walden_schema::Schema::from_json(
        r#"{"fields":[{"name":"id","type":"int64","primary_key":true},{"name":"e","type":"float_vector","dim":2}]}"#,
    )
    .unwrap();
    let info = walden_proto::v1::CollectionInfo {
        collection_id: 3,
        name: "c".into(),
        schema: Some(schema.proto().clone()),
        ..Default::default()
    };
    use prost::Message as _;
    let vc = "walden-dml-0_3v0";
    ch.append(MutableMessage::new(
        MessageType::CreateCollection,
        vc,
        Bytes::from(info.encode_to_vec()),
    ))
    .await
    .unwrap();
    let t = begin(&ch, vc, 0).await;
    let rows = schema
        .encode_ipc(
            &schema
                .rows_from_json(&[serde_json::json!({"id": 1, "e": [1, 2]})])
                .unwrap(),
        )
        .unwrap();
    ch.append(in_txn(
        MutableMessage::new(MessageType::Insert, vc, rows),
        t,
    ))
    .await
    .unwrap();
    let other = begin(&ch, "v", 0).await;
    ch.append(MutableMessage::new(MessageType::Flush, vc, Bytes::new()))
        .await
        .unwrap();
    assert_eq!(
        end(&ch, vc, t, MessageType::CommitTxn).await.unwrap_err(),
        ErrorCode::TxnExpired
    );
    // Other vchannels' transactions are untouched.
    end(&ch, "v", other, MessageType::CommitTxn).await.unwrap();

    let mut r = ch.wal().read(ReadFrom::At(MessageId(0))).unwrap();
    let mut rollbacks = Vec::new();
    while let Some((id, rec)) = r.next().await.unwrap() {
        let m = codec::decode(id, rec).unwrap();
        if m.message_type() == MessageType::RollbackTxn {
            rollbacks.push((
                m.header.txn.unwrap().txn_id,
                m.header.properties["reason"].clone(),
            ));
        }
    }
    assert_eq!(
        rollbacks,
        [
            (short, "expired".to_owned()),
            (t, "exclusive_message".to_owned())
        ]
    );
}

#[tokio::test]
async fn a_transaction_open_at_a_crash_is_rolled_back_when_the_pchannel_reopens() {
    let (storage, meta) = (MemoryWalStorage::new(), MemoryMetaStore::new());
    let m = common::start(&storage, &meta, config()).await;
    let ch = m.get("walden-dml-0", 0).unwrap();
    let t = begin(&ch, "v", 0).await;
    ch.append(in_txn(data("v", "never"), t)).await.unwrap();
    let cp_txn = begin(&ch, "v", 0).await;
    // One transaction is in the checkpoint, the other only in the replay.
    ch.checkpoint().await.unwrap();
    ch.append(in_txn(data("v", "never-either"), cp_txn))
        .await
        .unwrap();
    let t3 = begin(&ch, "v", 0).await;
    drop(ch);
    drop(m);

    let m = common::start(&storage, &meta, config()).await;
    let ch = m.get("walden-dml-0", 0).unwrap();
    // The reopen wrote a RollbackTxn for each of the three (a node that forgot open
    // transactions would write none, and consumers would buffer them forever).
    let mut r = ch.wal().read(walden_wal_api::ReadFrom::Earliest).unwrap();
    let mut rolled_back = Vec::new();
    while let Some((id, rec)) = r.next().await.unwrap() {
        let msg = walden_message::codec::decode(id, rec).unwrap();
        if msg.message_type() == MessageType::RollbackTxn {
            rolled_back.push(msg.header.txn.map(|c| c.txn_id));
        }
    }
    rolled_back.sort();
    assert_eq!(rolled_back, [Some(t), Some(cp_txn), Some(t3)]);
    for id in [t, cp_txn, t3] {
        assert_eq!(
            end(&ch, "v", id, MessageType::CommitTxn).await.unwrap_err(),
            ErrorCode::TxnExpired
        );
    }
    ch.append(data("v", "after")).await.unwrap();
    let got = deliver(ch, DeliverPolicy::All, Filters::default(), 1).await;
    assert_eq!(payloads(&got), ["after"]);
    assert!(got[0].time_tick() > TimeTick(t3));
}

#[tokio::test]
async fn a_body_message_past_the_transaction_byte_limit_is_refused_and_the_rest_commits() {
    let (storage, meta) = (MemoryWalStorage::new(), MemoryMetaStore::new());
    let m = common::start(
        &storage,
        &meta,
        NodeConfig {
            txn_max_bytes: 10,
            ..config()
        },
    )
    .await;
    let ch = m.get("walden-dml-0", 0).unwrap();
    let t = begin(&ch, "v", 0).await;
    ch.append(in_txn(data("v", "123456"), t)).await.unwrap();
    let before = ch.wal().next_id();
    let e = ch.append(in_txn(data("v", "12345"), t)).await.unwrap_err();
    assert_eq!(e.code(), ErrorCode::MessageTooLarge, "{e}");
    assert_eq!(ch.wal().next_id(), before, "nothing written");
    end(&ch, "v", t, MessageType::CommitTxn).await.unwrap();
    let got = deliver(ch, DeliverPolicy::All, Filters::default(), 1).await;
    assert_eq!(payloads(&got[0].txn_messages().unwrap()), ["123456"]);
}
