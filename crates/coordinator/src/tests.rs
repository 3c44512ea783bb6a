//! The catalog and broadcaster against a fake node that applies DDL idempotently, as the real
//! node does (a second CreateCollection on a vchannel is `COLLECTION_EXISTS`, and so on).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{HashMap, HashSet};
use std::sync::Mutex as StdMutex;

use tokio::sync::Semaphore;
use walden_metastore_api::MemoryMetaStore;
use walden_proto::v1::{DataType, FieldSchema};

use super::*;

#[derive(Debug, Default)]
struct FakeNode {
    /// vchannel -> (dropped, partitions)
    vchannels: StdMutex<HashMap<String, (bool, HashSet<String>)>>,
    log: StdMutex<Vec<(String, MessageType)>>,
    /// Appends allowed before the node hangs (a crash half way); `None`: no limit.
    budget: Option<Semaphore>,
}

#[async_trait]
impl Appender for FakeNode {
    fn pchannels(&self) -> Vec<String> {
        (0..4).map(|i| format!("p{i}")).collect()
    }

    async fn append(&self, _pchannel: &str, msg: MutableMessage) -> Result<u64, AppendError> {
        if let Some(b) = &self.budget {
            b.acquire().await.unwrap().forget();
        }
        let err = |code: ErrorCode| {
            Err(AppendError {
                code,
                message: code.name().into(),
            })
        };
        let mut vcs = self.vchannels.lock().unwrap();
        let entry = vcs.get_mut(&msg.vchannel);
        match (msg.message_type, entry) {
            (MessageType::CreateCollection, Some(_)) => return err(ErrorCode::CollectionExists),
            (MessageType::CreateCollection, None) => {
                vcs.insert(
                    msg.vchannel.clone(),
                    (false, HashSet::from(["_default".into()])),
                );
            }
            (_, None) => return err(ErrorCode::CollectionNotFound),
            (_, Some((true, _))) => return err(ErrorCode::CollectionDropped),
            (MessageType::DropCollection, Some(e)) => e.0 = true,
            (MessageType::CreatePartition, Some(e)) => {
                let fresh = e.1.insert(msg.coll.partition.clone());
                if !fresh {
                    return err(ErrorCode::PartitionExists);
                }
            }
            (MessageType::DropPartition, Some(e)) => {
                let existed = e.1.remove(&msg.coll.partition);
                if !existed {
                    return err(ErrorCode::PartitionNotFound);
                }
            }
            _ => {}
        }
        let mut log = self.log.lock().unwrap();
        log.push((msg.vchannel.clone(), msg.message_type));
        Ok(log.len() as u64)
    }
}

fn schema() -> CollectionSchema {
    CollectionSchema {
        fields: vec![
            FieldSchema {
                name: "id".into(),
                data_type: DataType::Int64 as i32,
                primary_key: true,
                ..FieldSchema::default()
            },
            FieldSchema {
                name: "emb".into(),
                data_type: DataType::FloatVector as i32,
                dim: 4,
                ..FieldSchema::default()
            },
        ],
        ..Default::default()
    }
}

async fn coord(node: Arc<FakeNode>, meta: &MemoryMetaStore) -> Arc<Coordinator> {
    Coordinator::start(Arc::new(meta.clone()), node)
        .await
        .unwrap()
}

#[tokio::test]
async fn shards_go_to_the_least_loaded_pchannels() {
    let meta = MemoryMetaStore::new();
    let c = coord(Arc::new(FakeNode::default()), &meta).await;
    let a = c.create_collection("a", schema(), 3).await.unwrap();
    let pa: Vec<_> = a.vchannels.iter().map(|v| v.pchannel.as_str()).collect();
    assert_eq!(pa, ["p0", "p1", "p2"]);
    assert_eq!(a.vchannels[1].name, format!("p1_{}v1", a.collection_id));
    let b = c.create_collection("b", schema(), 2).await.unwrap();
    let pb: Vec<_> = b.vchannels.iter().map(|v| v.pchannel.as_str()).collect();
    assert_eq!(pb, ["p3", "p0"]);
    assert_eq!(a.state(), CollectionState::Created);
    assert_ne!(a.collection_id, b.collection_id);
}

fn code<T: std::fmt::Debug>(r: Result<T, CoordError>) -> ErrorCode {
    r.unwrap_err().code()
}

#[tokio::test]
async fn ddl_errors_have_their_codes_and_change_nothing() {
    let meta = MemoryMetaStore::new();
    let node = Arc::new(FakeNode::default());
    let c = coord(node.clone(), &meta).await;
    c.create_collection("a", schema(), 2).await.unwrap();
    let appended = node.log.lock().unwrap().len();
    assert_eq!(
        code(c.create_collection("a", schema(), 1).await),
        ErrorCode::CollectionExists
    );
    assert_eq!(
        code(c.drop_collection("nope").await),
        ErrorCode::CollectionNotFound
    );
    assert_eq!(
        code(c.alter_partition("a", "_default", true).await),
        ErrorCode::PartitionExists
    );
    assert_eq!(
        code(c.alter_partition("a", "p", false).await),
        ErrorCode::PartitionNotFound
    );
    assert_eq!(
        code(c.alter_partition("a", "_default", false).await),
        ErrorCode::InvalidArgument
    );
    assert_eq!(
        code(c.create_collection("bad name", schema(), 1).await),
        ErrorCode::InvalidArgument
    );
    assert_eq!(
        code(
            c.create_collection("x", CollectionSchema::default(), 1)
                .await
        ),
        ErrorCode::InvalidArgument
    );
    assert_eq!(
        code(c.create_collection("x", schema(), MAX_SHARDS + 1).await),
        ErrorCode::InvalidArgument
    );
    assert_eq!(node.log.lock().unwrap().len(), appended);
    assert_eq!(c.list().await.unwrap().len(), 1);
}

#[tokio::test]
async fn a_create_interrupted_half_way_is_completed_on_every_shard_at_restart() {
    let meta = MemoryMetaStore::new();
    // The node takes 2 of the 4 shard appends, then hangs: the process dies there.
    let hanging = Arc::new(FakeNode {
        budget: Some(Semaphore::new(2)),
        ..FakeNode::default()
    });
    let c = coord(hanging.clone(), &meta).await;
    let task = tokio::spawn(async move { c.create_collection("a", schema(), 4).await });
    while hanging.log.lock().unwrap().len() < 2 {
        tokio::task::yield_now().await;
    }
    task.abort();
    let landed: Vec<_> = hanging.log.lock().unwrap().clone();
    assert_eq!(landed.len(), 2);

    // The restarted coordinator talks to the same node state.
    let node = Arc::new(FakeNode {
        vchannels: StdMutex::new(hanging.vchannels.lock().unwrap().clone()),
        ..FakeNode::default()
    });
    let c = coord(node.clone(), &meta).await;
    let info = c.describe("a").await.unwrap();
    assert_eq!(info.state(), CollectionState::Created);
    {
        let vcs = node.vchannels.lock().unwrap();
        for v in &info.vchannels {
            assert!(vcs.contains_key(&v.name), "shard {} never created", v.name);
        }
    }
    // Only the two missing shards were appended by the restart.
    assert_eq!(node.log.lock().unwrap().len(), 2);

    // Drop, partitions and flush reach every shard.
    c.alter_partition("a", "p1", true).await.unwrap();
    assert_eq!(
        c.describe("a").await.unwrap().partitions,
        ["_default", "p1"]
    );
    let r = c.drop_collection("a").await.unwrap();
    assert_eq!(r.time_ticks.len(), 4);
    assert!(c.list().await.unwrap().is_empty());
    assert!(
        node.vchannels
            .lock()
            .unwrap()
            .values()
            .all(|(dropped, _)| *dropped)
    );
}

#[tokio::test]
async fn an_alias_stands_for_its_collection_except_where_the_real_name_is_wanted() {
    let meta = MemoryMetaStore::new();
    let node = Arc::new(FakeNode::default());
    let c = coord(node.clone(), &meta).await;
    let a = c.create_collection("a", schema(), 2).await.unwrap();
    c.create_collection("b", schema(), 1).await.unwrap();
    c.create_alias("cur", "a").await.unwrap();
    let d = c.describe("cur").await.unwrap();
    assert_eq!((d.name.as_str(), d.collection_id), ("a", a.collection_id));
    assert_eq!(c.describe("a").await.unwrap().aliases, ["cur"]);
    // Partition DDL and flush through the alias reach the collection.
    c.alter_partition("cur", "p", true).await.unwrap();
    assert_eq!(c.describe("a").await.unwrap().partitions, ["_default", "p"]);
    // One namespace: no alias takes a collection's name, no collection an alias's.
    assert_eq!(code(c.create_alias("b", "a").await), ErrorCode::AliasExists);
    assert_eq!(
        code(c.create_collection("cur", schema(), 1).await),
        ErrorCode::AliasExists
    );
    assert_eq!(
        code(c.create_alias("cur", "b").await),
        ErrorCode::AliasExists
    );
    assert_eq!(
        code(c.create_alias("x", "cur").await),
        ErrorCode::InvalidArgument
    );
    assert_eq!(
        code(c.create_alias("x", "nope").await),
        ErrorCode::CollectionNotFound
    );
    assert_eq!(
        code(c.alter_alias("nope", "a").await),
        ErrorCode::AliasNotFound
    );
    // Neither the alias nor the collection it names is dropped while it stands.
    assert_eq!(code(c.drop_collection("cur").await), ErrorCode::AliasExists);
    assert_eq!(
        code(c.drop_collection("a").await),
        ErrorCode::InvalidArgument
    );
    assert_eq!(
        code(c.rename_collection("cur", "z").await),
        ErrorCode::InvalidArgument
    );
    c.alter_alias("cur", "b").await.unwrap();
    assert_eq!(c.describe("cur").await.unwrap().name, "b");
    assert!(c.describe("a").await.unwrap().aliases.is_empty());
    assert_eq!(c.drop_alias("cur").await.unwrap().collection, "b");
    assert_eq!(c.drop_alias("cur").await.unwrap().collection, "");
    assert_eq!(code(c.describe("cur").await), ErrorCode::CollectionNotFound);
    c.drop_collection("a").await.unwrap();
}

#[tokio::test]
async fn a_rename_moves_the_record_and_its_aliases_and_frees_the_old_name() {
    let meta = MemoryMetaStore::new();
    let node = Arc::new(FakeNode::default());
    let c = coord(node.clone(), &meta).await;
    let a = c.create_collection("a", schema(), 2).await.unwrap();
    c.create_collection("taken", schema(), 1).await.unwrap();
    c.create_alias("al", "a").await.unwrap();
    let appended = node.log.lock().unwrap().len();
    assert_eq!(
        code(c.rename_collection("a", "taken").await),
        ErrorCode::CollectionExists
    );
    assert_eq!(
        code(c.rename_collection("a", "al").await),
        ErrorCode::AliasExists
    );
    let r = c.rename_collection("a", "b").await.unwrap();
    // The same collection: id, shards and aliases; nothing was appended to any shard.
    assert_eq!(r.collection_id, a.collection_id);
    assert_eq!(r.vchannels, a.vchannels);
    assert_eq!(r.aliases, ["al"]);
    assert_eq!(c.describe("al").await.unwrap().name, "b");
    assert_eq!(node.log.lock().unwrap().len(), appended);
    assert_eq!(code(c.describe("a").await), ErrorCode::CollectionNotFound);
    let again = c.create_collection("a", schema(), 1).await.unwrap();
    assert_ne!(again.collection_id, a.collection_id);
    let names: Vec<_> = c
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.name)
        .collect();
    assert_eq!(names, ["a", "b", "taken"]);
}
