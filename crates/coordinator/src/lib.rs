//! The streaming coordinator's collection catalog and DDL broadcaster.
//!
//! A collection's record in the metastore (`walden/coord/collection/{name}`, a `CollectionInfo`)
//! is also its DDL task: a create, drop or partition change is first persisted in the record
//! (`CREATING`, `DROPPING`, or a `pending_partition`), then appended to every shard's vchannel,
//! then marked done. Appends are idempotent per vchannel (a second CreateCollection on a vchannel
//! is refused with `COLLECTION_EXISTS`, which the broadcaster counts as done), so a task found
//! unfinished at start is simply run again: every shard ends up agreeing, even when the process
//! died half way. Records change only by compare-and-swap on their revision.
//!
//! Shards are placed on the least loaded pchannels (fewest live vchannels), and named
//! `{pchannel}_{collection_id}v{shard}`.

mod names;
pub mod placement;
pub mod service;

use std::{collections::HashMap, fmt::Debug, sync::Arc, time::Duration};

use async_trait::async_trait;
use bytes::Bytes;
use prost::Message as _;
use thiserror::Error;
use tokio::sync::{Mutex, OwnedMutexGuard};
use tracing::{info, warn};
use walden_common::{ErrorCode, HasErrorCode};
use walden_message::{DEFAULT_PARTITION, MessageType, MutableMessage};
use walden_metastore_api::{Compare, KeyValue, MetaError, MetaStore, Op, Txn};
use walden_proto::v1::{CollectionInfo, CollectionSchema, CollectionState, VChannelInfo};
use walden_schema::Schema;

/// Most shards a collection may have.
pub const MAX_SHARDS: u32 = 64;

use walden_metastore_api::keys::{self, COLLECTION_PREFIX};

fn collection_key(name: &str) -> String {
    keys::collection(name)
}

/// A refusal or failure from the node that owns a pchannel.
#[derive(Debug, Clone, Error)]
#[error("{message}")]
pub struct AppendError {
    pub code: ErrorCode,
    pub message: String,
}

/// Where the coordinator appends: the streaming nodes. In standalone it is the local node; a
/// distributed coordinator routes by the pchannel's assignment.
#[async_trait]
pub trait Appender: Send + Sync + Debug {
    /// The pchannels that can hold shards.
    fn pchannels(&self) -> Vec<String>;
    /// Appends `msg` to `pchannel`; returns its tick.
    async fn append(&self, pchannel: &str, msg: MutableMessage) -> Result<u64, AppendError>;
}

/// Errors of the coordinator, each with a stable code.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum CoordError {
    #[error("collection {0:?} not found")]
    NotFound(String),
    #[error("collection {0:?} already exists")]
    Exists(String),
    #[error("alias {0:?} not found")]
    AliasNotFound(String),
    /// A name held by an alias where a collection's is wanted, or the reverse.
    #[error("{0}")]
    NameTaken(String),
    #[error("collection {name:?} has no partition {partition:?}")]
    PartitionNotFound { name: String, partition: String },
    #[error("collection {name:?} already has partition {partition:?}")]
    PartitionExists { name: String, partition: String },
    #[error("invalid request: {0}")]
    InvalidArgument(String),
    #[error(transparent)]
    Schema(#[from] walden_schema::SchemaError),
    #[error("collection {0:?} is being created or dropped; retry shortly")]
    Busy(String),
    #[error(transparent)]
    Meta(#[from] MetaError),
    #[error("appending to {pchannel}: {source}")]
    Append {
        pchannel: String,
        source: AppendError,
    },
    #[error("catalog record {0} is corrupt")]
    Corrupt(String),
}

impl HasErrorCode for CoordError {
    fn code(&self) -> ErrorCode {
        match self {
            Self::NotFound(_) => ErrorCode::CollectionNotFound,
            Self::Exists(_) => ErrorCode::CollectionExists,
            Self::AliasNotFound(_) => ErrorCode::AliasNotFound,
            Self::NameTaken(_) => ErrorCode::AliasExists,
            Self::PartitionNotFound { .. } => ErrorCode::PartitionNotFound,
            Self::PartitionExists { .. } => ErrorCode::PartitionExists,
            Self::InvalidArgument(_) => ErrorCode::InvalidArgument,
            Self::Schema(e) => e.code(),
            Self::Busy(_) => ErrorCode::ResourceExhausted,
            Self::Meta(e) => e.code(),
            Self::Append { source, .. } => source.code,
            Self::Corrupt(_) => ErrorCode::Corrupted,
        }
    }
}

/// What a DDL did: its task id and the tick at which it took effect on each shard.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DdlResult {
    pub broadcast_id: u64,
    pub time_ticks: Vec<u64>,
}

/// The catalog and broadcaster.
#[derive(Debug)]
pub struct Coordinator {
    meta: Arc<dyn MetaStore>,
    appender: Arc<dyn Appender>,
    /// One DDL at a time per collection name.
    locks: std::sync::Mutex<HashMap<String, Arc<Mutex<()>>>>,
}

/// Names of collections and partitions: 1 to 255 of `[A-Za-z0-9_-]`.
fn validate_name(what: &str, name: &str) -> Result<(), CoordError> {
    walden_common::validate_object_name(what, name).map_err(CoordError::InvalidArgument)
}

/// The message types whose refusal means "already applied on this vchannel".
fn already_applied(t: MessageType, code: ErrorCode) -> bool {
    matches!(
        (t, code),
        (MessageType::CreateCollection, ErrorCode::CollectionExists)
            | (MessageType::DropCollection, ErrorCode::CollectionDropped)
            | (MessageType::CreatePartition, ErrorCode::PartitionExists)
            | (MessageType::DropPartition, ErrorCode::PartitionNotFound)
    )
}

impl Coordinator {
    /// Starts the coordinator and finishes every DDL task a previous run left unfinished.
    pub async fn start(
        meta: Arc<dyn MetaStore>,
        appender: Arc<dyn Appender>,
    ) -> Result<Arc<Self>, CoordError> {
        let coord = Arc::new(Self {
            meta,
            appender,
            locks: std::sync::Mutex::new(HashMap::new()),
        });
        let mut resumed = 0;
        for (kv, info) in coord.load_all().await? {
            if info.state() != CollectionState::Created || !info.pending_partition.is_empty() {
                let guard = coord.lock(&info.name).await;
                coord.finish(kv, info, guard).await?;
                resumed += 1;
            }
        }
        if resumed > 0 {
            info!(
                tasks = resumed,
                "finished DDL tasks left by the previous run"
            );
        }
        Ok(coord)
    }

    async fn lock(&self, name: &str) -> OwnedMutexGuard<()> {
        let m = self
            .locks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(name.to_owned())
            .or_default()
            .clone();
        m.lock_owned().await
    }

    async fn load_all(&self) -> Result<Vec<(KeyValue, CollectionInfo)>, CoordError> {
        let kvs = self.meta.range(COLLECTION_PREFIX).await?;
        kvs.into_iter()
            .map(|kv| {
                let info = CollectionInfo::decode(kv.value.as_ref())
                    .map_err(|_| CoordError::Corrupt(kv.key.clone()))?;
                Ok((kv, info))
            })
            .collect()
    }

    async fn load(&self, name: &str) -> Result<(KeyValue, CollectionInfo), CoordError> {
        // A name no collection can have is bad input, not "not found".
        validate_name("collection", name)?;
        let key = collection_key(name);
        let kv = self
            .meta
            .get(&key)
            .await?
            .ok_or_else(|| CoordError::NotFound(name.to_owned()))?;
        let info =
            CollectionInfo::decode(kv.value.as_ref()).map_err(|_| CoordError::Corrupt(key))?;
        Ok((kv, info))
    }

    /// Replaces the record if it is still at `kv`'s revision; returns the new revision's record.
    async fn save(&self, kv: &KeyValue, info: &CollectionInfo) -> Result<KeyValue, CoordError> {
        let value = Bytes::from(info.encode_to_vec());
        let resp = self
            .meta
            .txn(Txn {
                compare: vec![Compare::mod_revision(&kv.key, kv.mod_revision)],
                success: vec![Op::Put {
                    key: kv.key.clone(),
                    value: value.clone(),
                    lease: None,
                }],
                failure: vec![],
            })
            .await?;
        if !resp.succeeded {
            return Err(CoordError::Busy(info.name.clone()));
        }
        Ok(KeyValue {
            value,
            mod_revision: resp.revision,
            ..kv.clone()
        })
    }

    /// Deletes `kv`'s key if it is still at `kv`'s revision (else `Busy(name)`).
    async fn delete_at(&self, kv: &KeyValue, name: &str) -> Result<(), CoordError> {
        let resp = self
            .meta
            .txn(Txn {
                compare: vec![Compare::mod_revision(&kv.key, kv.mod_revision)],
                success: vec![Op::Delete {
                    key: kv.key.clone(),
                }],
                failure: vec![],
            })
            .await?;
        if !resp.succeeded {
            return Err(CoordError::Busy(name.to_owned()));
        }
        Ok(())
    }

    /// A fresh id for collections and broadcast tasks (one counter for both).
    async fn next_id(&self) -> Result<u64, CoordError> {
        Ok(walden_metastore_api::increment(&*self.meta, keys::COORD_NEXT_ID).await?)
    }

    /// Creates a collection with `shards` shards and returns it once every shard has it.
    pub async fn create_collection(
        &self,
        name: &str,
        schema: CollectionSchema,
        shards: u32,
    ) -> Result<CollectionInfo, CoordError> {
        validate_name("collection", name)?;
        Schema::new(schema.clone())?;
        if shards == 0 || shards > MAX_SHARDS {
            return Err(CoordError::InvalidArgument(format!(
                "a collection has 1 to {MAX_SHARDS} shards, not {shards}"
            )));
        }
        let guard = self.lock(name).await;
        let key = collection_key(name);
        if self.meta.get(&key).await?.is_some() {
            return Err(CoordError::Exists(name.to_owned()));
        }
        self.check_not_alias(name).await?;
        let collection_id = self.next_id().await?;
        let broadcast_id = self.next_id().await?;
        let vchannels = self.place(collection_id, shards).await?;
        let info = CollectionInfo {
            collection_id,
            name: name.to_owned(),
            schema: Some(schema),
            vchannels,
            partitions: vec![DEFAULT_PARTITION.into()],
            state: CollectionState::Creating as i32,
            broadcast_id,
            ..CollectionInfo::default()
        };
        let value = Bytes::from(info.encode_to_vec());
        let resp = self
            .meta
            .txn(Txn {
                compare: vec![Compare::absent(&key), Compare::absent(keys::alias(name))],
                success: vec![Op::Put {
                    key: key.clone(),
                    value: value.clone(),
                    lease: None,
                }],
                failure: vec![],
            })
            .await?;
        if !resp.succeeded {
            return Err(CoordError::Exists(name.to_owned()));
        }
        let kv = self
            .meta
            .get(&key)
            .await?
            .ok_or_else(|| CoordError::Busy(name.to_owned()))?;
        info!(
            collection = name,
            collection_id, shards, "creating collection"
        );
        self.finish(kv, info, guard).await?;
        let (_, info) = self.load(name).await?;
        Ok(info)
    }

    /// Chooses a pchannel per shard: the least loaded first (ties by name), counting the
    /// shards of live collections and those placed so far.
    async fn place(
        &self,
        collection_id: u64,
        shards: u32,
    ) -> Result<Vec<VChannelInfo>, CoordError> {
        let mut load: HashMap<String, usize> = self
            .appender
            .pchannels()
            .into_iter()
            .map(|p| (p, 0))
            .collect();
        if load.is_empty() {
            return Err(CoordError::InvalidArgument(
                "no pchannels to place shards on".into(),
            ));
        }
        for (_, info) in self.load_all().await? {
            for v in &info.vchannels {
                if let Some(n) = load.get_mut(&v.pchannel) {
                    *n += 1;
                }
            }
        }
        let mut out = Vec::new();
        for shard in 0..shards {
            let pchannel = load
                .iter()
                .min_by(|a, b| a.1.cmp(b.1).then_with(|| a.0.cmp(b.0)))
                .map(|(p, _)| p.clone())
                .ok_or_else(|| CoordError::InvalidArgument("no pchannels".into()))?;
            *load.entry(pchannel.clone()).or_default() += 1;
            out.push(VChannelInfo {
                name: format!("{pchannel}_{collection_id}v{shard}"),
                pchannel,
            });
        }
        Ok(out)
    }

    /// Runs the task a record describes to its end: the broadcast, then the record's update.
    async fn finish(
        &self,
        kv: KeyValue,
        mut info: CollectionInfo,
        _guard: OwnedMutexGuard<()>,
    ) -> Result<DdlResult, CoordError> {
        let (t, partition) = if !info.pending_partition.is_empty() {
            let t = if info.pending_partition_create {
                MessageType::CreatePartition
            } else {
                MessageType::DropPartition
            };
            (t, info.pending_partition.clone())
        } else {
            match info.state() {
                CollectionState::Creating => (MessageType::CreateCollection, String::new()),
                CollectionState::Dropping => (MessageType::DropCollection, String::new()),
                _ => return Ok(DdlResult::default()),
            }
        };
        let payload = if t == MessageType::CreateCollection {
            let mut created = info.clone();
            created.state = CollectionState::Created as i32;
            created.broadcast_id = 0;
            Bytes::from(created.encode_to_vec())
        } else {
            Bytes::new()
        };
        let ticks = self
            .broadcast(&info, t, &partition, payload, info.broadcast_id)
            .await;
        match t {
            MessageType::DropCollection => {
                self.delete_at(&kv, &info.name).await?;
                info!(collection = info.name, "collection dropped");
            }
            _ => {
                if t == MessageType::CreatePartition {
                    info.partitions.push(partition);
                } else if t == MessageType::DropPartition {
                    info.partitions.retain(|p| *p != partition);
                }
                info.state = CollectionState::Created as i32;
                info.pending_partition.clear();
                info.pending_partition_create = false;
                self.save(&kv, &info).await?;
            }
        }
        Ok(DdlResult {
            broadcast_id: info.broadcast_id,
            time_ticks: ticks,
        })
    }

    /// Appends one copy of a DDL message to every shard, retrying each until it lands (or is
    /// found already applied). Returns the tick on each shard (0 where it had already landed).
    async fn broadcast(
        &self,
        info: &CollectionInfo,
        t: MessageType,
        partition: &str,
        payload: Bytes,
        broadcast_id: u64,
    ) -> Vec<u64> {
        let sends = info.vchannels.iter().map(|v| {
            let mut msg = MutableMessage::new(t, v.name.clone(), payload.clone());
            msg.coll.partition = partition.to_owned();
            msg.coll.broadcast_id = broadcast_id;
            self.append_until_done(&v.pchannel, msg)
        });
        futures::future::join_all(sends).await
    }

    async fn append_until_done(&self, pchannel: &str, msg: MutableMessage) -> u64 {
        let mut backoff = Duration::from_millis(10);
        loop {
            match self.appender.append(pchannel, msg.clone()).await {
                Ok(tick) => return tick,
                Err(e) if already_applied(msg.message_type, e.code) => return 0,
                Err(e) => {
                    // A refusal that a retry cannot fix would be a bug (the record was checked);
                    // the task holds its collection until an operator looks, as in Milvus.
                    warn!(pchannel, vchannel = msg.vchannel, error = %e, code = %e.code,
                        "broadcast append failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    }

    /// Drops a collection from every shard, then from the catalog.
    /// Refused for an alias, and for a collection that still has aliases (as in Milvus).
    pub async fn drop_collection(&self, name: &str) -> Result<DdlResult, CoordError> {
        let guard = self.lock(name).await;
        let (kv, mut info) = match self.load(name).await {
            Err(CoordError::NotFound(_)) => {
                self.check_not_alias(name).await?;
                return Err(CoordError::NotFound(name.to_owned()));
            }
            r => r?,
        };
        if info.state() != CollectionState::Created || !info.pending_partition.is_empty() {
            return Err(CoordError::Busy(name.to_owned()));
        }
        let aliases = self.list_aliases(name).await?;
        if !aliases.is_empty() {
            let names: Vec<_> = aliases.iter().map(|a| a.alias.as_str()).collect();
            return Err(CoordError::InvalidArgument(format!(
                "collection {name:?} still has aliases {names:?}; drop them first"
            )));
        }
        info.state = CollectionState::Dropping as i32;
        info.broadcast_id = self.next_id().await?;
        let kv = self.save(&kv, &info).await?;
        info!(collection = name, "dropping collection");
        self.finish(kv, info, guard).await
    }

    /// Creates (`create`) or drops a partition on every shard.
    pub async fn alter_partition(
        &self,
        name: &str,
        partition: &str,
        create: bool,
    ) -> Result<DdlResult, CoordError> {
        validate_name("partition", partition)?;
        let name = &self.resolve(name).await?;
        let guard = self.lock(name).await;
        let (kv, mut info) = self.load(name).await?;
        if info.state() != CollectionState::Created || !info.pending_partition.is_empty() {
            return Err(CoordError::Busy(name.to_owned()));
        }
        let exists = info.partitions.iter().any(|p| p == partition);
        if create && exists {
            return Err(CoordError::PartitionExists {
                name: name.into(),
                partition: partition.into(),
            });
        }
        if !create && !exists {
            return Err(CoordError::PartitionNotFound {
                name: name.into(),
                partition: partition.into(),
            });
        }
        if !create && partition == DEFAULT_PARTITION {
            return Err(CoordError::InvalidArgument(
                "the _default partition cannot be dropped".into(),
            ));
        }
        info.pending_partition = partition.to_owned();
        info.pending_partition_create = create;
        info.broadcast_id = self.next_id().await?;
        let kv = self.save(&kv, &info).await?;
        self.finish(kv, info, guard).await
    }

    /// Seals every growing segment of the collection on every shard.
    pub async fn flush(&self, name: &str) -> Result<DdlResult, CoordError> {
        let name = &self.resolve(name).await?;
        let _guard = self.lock(name).await;
        let (_, info) = self.load(name).await?;
        if info.state() != CollectionState::Created {
            return Err(CoordError::Busy(name.to_owned()));
        }
        let mut ticks = Vec::new();
        for v in &info.vchannels {
            let msg = MutableMessage::new(MessageType::Flush, v.name.clone(), Bytes::new());
            let tick = self
                .appender
                .append(&v.pchannel, msg)
                .await
                .map_err(|source| CoordError::Append {
                    pchannel: v.pchannel.clone(),
                    source,
                })?;
            ticks.push(tick);
        }
        Ok(DdlResult {
            broadcast_id: 0,
            time_ticks: ticks,
        })
    }

    /// The catalog record of a collection (also while it is being created or dropped), by
    /// its name or an alias, with its aliases and read replicas (placement.rs) filled in.
    pub async fn describe(&self, name: &str) -> Result<CollectionInfo, CoordError> {
        let mut info = match self.load(name).await {
            Err(CoordError::NotFound(_)) => match self.alias_target(name).await? {
                Some((_, target)) => self.load(&target).await?.1,
                None => return Err(CoordError::NotFound(name.to_owned())),
            },
            r => r?.1,
        };
        info.aliases = self
            .list_aliases(&info.name)
            .await?
            .into_iter()
            .map(|a| a.alias)
            .collect();
        if info.replicas > 1
            && let Some(kv) = self.meta.get(&keys::replicas(info.collection_id)).await?
            && let Ok(r) = walden_proto::v1::ReadReplicas::decode(kv.value.as_ref())
        {
            info.read_replicas = r.vchannels;
        }
        Ok(info)
    }

    /// Every collection, by name.
    pub async fn list(&self) -> Result<Vec<CollectionInfo>, CoordError> {
        let mut all: Vec<_> = self.load_all().await?.into_iter().map(|(_, i)| i).collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(all)
    }
}

mod index;

#[cfg(test)]
mod tests;
