//! Collections: DDL through the coordinator's `Collections` service, and DML (insert, upsert,
//! delete) straight to the shards' pchannels through idempotent producers.
//!
//! Rows are routed to shards by primary key ([`walden_schema::shard_of_pk`]), so a delete goes
//! to the shard that holds the row. Large batches are cut so that each message stays well
//! under the node's message limit.

use std::{collections::HashMap, sync::Mutex};

use arrow_array::RecordBatch;
use bytes::Bytes;
use prost::Message as _;
use tonic::transport::Channel;
use walden_common::HasErrorCode as _;
use walden_message::{MessageType, MutableMessage};
use walden_proto::v1::{
    CollectionInfo, CollectionName, CreateCollectionRequest, DdlResponse, DeleteIds,
    ListCollectionsRequest, PartitionRequest, collections_client::CollectionsClient,
};
use walden_schema::Schema;

use crate::{Client, ClientError, Producer, ProducerOptions};

type CollectionsGrpc =
    CollectionsClient<tonic::service::interceptor::InterceptedService<Channel, crate::Auth>>;

fn collections_client(channel: Channel, auth: crate::Auth) -> CollectionsGrpc {
    CollectionsClient::with_interceptor(channel, auth)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20)
}

/// How long a DDL call follows leader changes (NOT_LEADER) before giving up.
const LEADER_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Payload bytes aimed at per insert message (the node refuses messages over its
/// `node.max_message_bytes`, 8 MiB by default).
const TARGET_MESSAGE_BYTES: usize = 2 << 20;

/// What a write did: rows (or keys) written and the highest tick they got.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriteResult {
    pub rows: u64,
    pub time_tick: u64,
}

/// What [`Collections::alias`] does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AliasOp {
    Create,
    Alter,
    Drop,
}

/// The collections API of one node. Cheap to create; producers are opened per pchannel on
/// first use and reused.
#[derive(Debug)]
pub struct Collections {
    /// The coordinator that runs the catalog (the leader, in a cluster; followed on NOT_LEADER).
    grpc: Mutex<CollectionsGrpc>,
    client: Client,
    producers: Mutex<HashMap<String, Producer>>,
    /// How the producers of writes retry (an outage ends a write's retries for all its
    /// messages at once: see [`ProducerOptions::retry_timeout`]).
    producer_options: ProducerOptions,
    /// Collections described lately, by name (or alias): writes route by them without a
    /// describe call each. An entry is used for [`crate::search::DESCRIBED_FOR`] (a rename or
    /// an alias moved elsewhere is seen within it); a write that finds the collection gone
    /// (dropped, or re-created under new shards) forgets it at once.
    described: Mutex<HashMap<String, (std::time::Instant, CollectionInfo, Schema)>>,
}

impl Collections {
    pub(crate) fn new(client: Client, channel: Channel, auth: crate::Auth) -> Self {
        Self {
            grpc: Mutex::new(collections_client(channel, auth)),
            client,
            producers: Mutex::new(HashMap::new()),
            producer_options: ProducerOptions::default(),
            described: Mutex::new(HashMap::new()),
        }
    }

    /// Writes (insert, upsert, delete) go through producers with these options.
    #[must_use]
    pub fn with_producer_options(mut self, options: ProducerOptions) -> Self {
        self.producer_options = options;
        self
    }

    /// Runs one catalog call on the coordinator that leads; a standby's NOT_LEADER (or an
    /// unreachable coordinator) moves the call to the leader, for up to [`LEADER_WAIT`].
    async fn ddl<T, F, Fut>(&self, call: F) -> Result<T, ClientError>
    where
        F: Fn(CollectionsGrpc) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let deadline = tokio::time::Instant::now() + LEADER_WAIT;
        let mut backoff = std::time::Duration::from_millis(100);
        loop {
            let g = self.grpc.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let err = match call(g).await {
                Ok(r) => return Ok(r.into_inner()),
                Err(s) => ClientError::from(s),
            };
            let follow = matches!(
                err.code(),
                walden_common::ErrorCode::NotLeader | walden_common::ErrorCode::Unavailable
            );
            if !follow || tokio::time::Instant::now() >= deadline {
                return Err(err);
            }
            if let Some((channel, auth)) = self.client.leader_channel().await {
                *self.grpc.lock().unwrap_or_else(|e| e.into_inner()) =
                    collections_client(channel, auth);
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(std::time::Duration::from_secs(1));
        }
    }

    /// Creates a collection with `shards` shards (at least one).
    pub async fn create(
        &self,
        name: &str,
        schema: &Schema,
        shards: u32,
    ) -> Result<CollectionInfo, ClientError> {
        check_name("collection", name)?;
        if shards == 0 {
            return Err(ClientError::InvalidArgument(
                "a collection needs at least one shard".into(),
            ));
        }
        let req = CreateCollectionRequest {
            name: name.into(),
            schema: Some(schema.proto().clone()),
            shards,
        };
        // A collection of this name described before (since dropped) is not this one.
        self.forget(name);
        self.ddl(|mut g| {
            let r = req.clone();
            async move { g.create_collection(r).await }
        })
        .await
    }

    pub async fn describe(&self, name: &str) -> Result<CollectionInfo, ClientError> {
        check_name("collection", name)?;
        let req = CollectionName { name: name.into() };
        self.ddl(|mut g| {
            let r = req.clone();
            async move { g.describe_collection(r).await }
        })
        .await
    }

    pub async fn list(&self) -> Result<Vec<CollectionInfo>, ClientError> {
        let req = ListCollectionsRequest {};
        Ok(self
            .ddl(|mut g| async move { g.list_collections(req).await })
            .await?
            .collections)
    }

    pub async fn drop_collection(&self, name: &str) -> Result<DdlResponse, ClientError> {
        check_name("collection", name)?;
        self.forget(name);
        let req = CollectionName { name: name.into() };
        self.ddl(|mut g| {
            let r = req.clone();
            async move { g.drop_collection(r).await }
        })
        .await
    }

    pub async fn create_partition(
        &self,
        collection: &str,
        partition: &str,
    ) -> Result<DdlResponse, ClientError> {
        check_name("collection", collection)?;
        check_name("partition", partition)?;
        let req = PartitionRequest {
            collection: collection.into(),
            partition: partition.into(),
        };
        self.ddl(|mut g| {
            let r = req.clone();
            async move { g.create_partition(r).await }
        })
        .await
    }

    pub async fn drop_partition(
        &self,
        collection: &str,
        partition: &str,
    ) -> Result<DdlResponse, ClientError> {
        check_name("collection", collection)?;
        check_name("partition", partition)?;
        let req = PartitionRequest {
            collection: collection.into(),
            partition: partition.into(),
        };
        self.ddl(|mut g| {
            let r = req.clone();
            async move { g.drop_partition(r).await }
        })
        .await
    }

    /// Seals every growing segment of the collection.
    pub async fn flush(&self, name: &str) -> Result<DdlResponse, ClientError> {
        let req = CollectionName { name: name.into() };
        self.ddl(|mut g| {
            let r = req.clone();
            async move { g.flush(r).await }
        })
        .await
    }

    /// Adds an index spec (see `walden_schema::check_index`); returns the record.
    pub async fn create_index(
        &self,
        name: &str,
        spec: walden_proto::v1::IndexSpec,
    ) -> Result<CollectionInfo, ClientError> {
        let req = walden_proto::v1::IndexRequest {
            collection: name.into(),
            index: Some(spec),
        };
        self.ddl(|mut g| {
            let r = req.clone();
            async move { g.create_index(r).await }
        })
        .await
    }

    pub async fn drop_index(&self, name: &str, field: &str) -> Result<CollectionInfo, ClientError> {
        let req = walden_proto::v1::DropIndexRequest {
            collection: name.into(),
            field: field.into(),
        };
        self.ddl(|mut g| {
            let r = req.clone();
            async move { g.drop_index(r).await }
        })
        .await
    }

    /// Marks the collection loaded with `replicas` copies; see [`crate::Client::load`] for
    /// the call that also waits until it serves.
    pub async fn load(&self, name: &str, replicas: u32) -> Result<CollectionInfo, ClientError> {
        let req = walden_proto::v1::LoadRequest {
            collection: name.into(),
            replicas,
        };
        self.ddl(|mut g| {
            let r = req.clone();
            async move { g.load_collection(r).await }
        })
        .await
    }

    pub async fn release(&self, name: &str) -> Result<CollectionInfo, ClientError> {
        let req = CollectionName { name: name.into() };
        self.ddl(|mut g| {
            let r = req.clone();
            async move { g.release_collection(r).await }
        })
        .await
    }

    /// The collection and its checked schema (cached; see [`Collections`]).
    pub async fn schema(&self, name: &str) -> Result<(CollectionInfo, Schema), ClientError> {
        if let Some((at, info, schema)) = self.cache().get(name)
            && at.elapsed() < crate::search::DESCRIBED_FOR
        {
            return Ok((info.clone(), schema.clone()));
        }
        let info = self.describe(name).await?;
        let schema = Schema::new(info.schema.clone().unwrap_or_default())
            .map_err(|e| ClientError::InvalidArgument(e.to_string()))?;
        if info.state() == walden_proto::v1::CollectionState::Created {
            self.cache().insert(
                name.to_owned(),
                (std::time::Instant::now(), info.clone(), schema.clone()),
            );
        }
        Ok((info, schema))
    }

    /// Forgets what this handle and its client know of `name` (after a rename or an alias
    /// change made here, so the next call describes it afresh).
    pub fn forget(&self, name: &str) {
        self.cache().remove(name);
        self.client.forget_described(name);
    }

    /// Renames a collection (its shards, rows and aliases stay with it).
    pub async fn rename(&self, name: &str, new_name: &str) -> Result<CollectionInfo, ClientError> {
        check_name("collection", name)?;
        check_name("collection", new_name)?;
        let req = walden_proto::v1::RenameCollectionRequest {
            name: name.into(),
            new_name: new_name.into(),
        };
        let r = self
            .ddl(|mut g| {
                let r = req.clone();
                async move { g.rename_collection(r).await }
            })
            .await;
        self.forget(name);
        r
    }

    /// Sets and removes keys of the schema's properties (opaque to Walden).
    pub async fn alter_properties(
        &self,
        name: &str,
        set: HashMap<String, Bytes>,
        delete: Vec<String>,
    ) -> Result<CollectionInfo, ClientError> {
        let req = walden_proto::v1::AlterPropertiesRequest {
            collection: name.into(),
            set,
            delete,
        };
        let r = self
            .ddl(|mut g| {
                let r = req.clone();
                async move { g.alter_properties(r).await }
            })
            .await;
        self.forget(name);
        r
    }

    /// Creates (`Create`), re-points (`Alter`) or drops (`Drop`, `collection` unused) an alias.
    pub async fn alias(
        &self,
        op: AliasOp,
        alias: &str,
        collection: &str,
    ) -> Result<walden_proto::v1::Alias, ClientError> {
        check_name("alias", alias)?;
        if op != AliasOp::Drop {
            check_name("collection", collection)?;
        }
        let req = walden_proto::v1::AliasRequest {
            alias: alias.into(),
            collection: collection.into(),
        };
        let r = self
            .ddl(|mut g| {
                let r = req.clone();
                async move {
                    match op {
                        AliasOp::Create => g.create_alias(r).await,
                        AliasOp::Alter => g.alter_alias(r).await,
                        AliasOp::Drop => g.drop_alias(r).await,
                    }
                }
            })
            .await;
        self.forget(alias);
        r
    }

    /// The aliases of `collection` (every alias when empty).
    pub async fn list_aliases(
        &self,
        collection: &str,
    ) -> Result<Vec<walden_proto::v1::Alias>, ClientError> {
        let req = walden_proto::v1::ListAliasesRequest {
            collection: collection.into(),
        };
        Ok(self
            .ddl(|mut g| {
                let r = req.clone();
                async move { g.list_aliases(r).await }
            })
            .await?
            .aliases)
    }

    fn cache(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, (std::time::Instant, CollectionInfo, Schema)>>
    {
        self.described.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Forgets `name` if `e` says its collection is not what the cache describes.
    fn forget_if_gone<T>(&self, name: &str, r: Result<T, ClientError>) -> Result<T, ClientError> {
        use walden_common::{ErrorCode, HasErrorCode};
        if let Err(e) = &r
            && matches!(
                e.code(),
                ErrorCode::CollectionNotFound | ErrorCode::CollectionDropped
            )
        {
            self.cache().remove(name);
        }
        r
    }

    /// Inserts rows (`partition` None: `_default`).
    pub async fn insert(
        &self,
        collection: &str,
        partition: Option<&str>,
        batches: &[RecordBatch],
    ) -> Result<WriteResult, ClientError> {
        self.write_rows(MessageType::Insert, collection, partition, batches)
            .await
    }

    /// Inserts rows, replacing any row with the same primary key.
    pub async fn upsert(
        &self,
        collection: &str,
        partition: Option<&str>,
        batches: &[RecordBatch],
    ) -> Result<WriteResult, ClientError> {
        self.write_rows(MessageType::Upsert, collection, partition, batches)
            .await
    }

    /// Deletes rows by primary key.
    pub async fn delete(
        &self,
        collection: &str,
        partition: Option<&str>,
        ids: &DeleteIds,
    ) -> Result<WriteResult, ClientError> {
        let (info, schema) = self.schema(collection).await?;
        let rows = schema
            .check_delete(ids)
            .map_err(|e| ClientError::InvalidArgument(e.to_string()))?;
        let mut messages = Vec::new();
        for (shard, part) in walden_schema::split_ids(ids, info.vchannels.len())
            .into_iter()
            .enumerate()
        {
            if part.int_ids.is_empty() && part.str_ids.is_empty() {
                continue;
            }
            let keys: Vec<String> = part
                .int_ids
                .iter()
                .map(ToString::to_string)
                .chain(part.str_ids.iter().cloned())
                .collect();
            messages.push(Outgoing {
                shard,
                payload: Bytes::from(part.encode_to_vec()),
                keys,
            });
        }
        let sent = self
            .send_all(&info, MessageType::Delete, partition, messages)
            .await;
        let tick = self.forget_if_gone(collection, sent)?;
        self.client.note_write(tick);
        Ok(WriteResult {
            rows,
            time_tick: tick,
        })
    }

    async fn write_rows(
        &self,
        t: MessageType,
        collection: &str,
        partition: Option<&str>,
        batches: &[RecordBatch],
    ) -> Result<WriteResult, ClientError> {
        let (info, schema) = self.schema(collection).await?;
        let invalid = |e: walden_schema::SchemaError| ClientError::InvalidArgument(e.to_string());
        let mut messages = Vec::new();
        let mut rows = 0;
        // Each chunk is checked against the schema as it is encoded, before anything is sent.
        for batch in batches {
            rows += batch.num_rows() as u64;
            for (shard, part) in schema
                .split_by_shard(batch, info.vchannels.len())
                .map_err(invalid)?
                .into_iter()
                .enumerate()
            {
                let Some(part) = part else { continue };
                for chunk in chunks(&part) {
                    messages.push(Outgoing {
                        shard,
                        payload: schema.encode_ipc(&chunk).map_err(invalid)?,
                        keys: primary_keys(&schema, &chunk),
                    });
                }
            }
        }
        if rows == 0 {
            return Err(ClientError::InvalidArgument("no rows to write".into()));
        }
        let sent = self.send_all(&info, t, partition, messages).await;
        let tick = self.forget_if_gone(collection, sent)?;
        self.client.note_write(tick);
        Ok(WriteResult {
            rows,
            time_tick: tick,
        })
    }

    /// Sends every message pipelined and waits for all; returns the highest tick. When some
    /// fail, the error says exactly which keys were not written (the others were): a write cut
    /// into several messages is not atomic, and the caller must know what to resend.
    async fn send_all(
        &self,
        info: &CollectionInfo,
        t: MessageType,
        partition: Option<&str>,
        messages: Vec<Outgoing>,
    ) -> Result<u64, ClientError> {
        let total: usize = messages.iter().map(|m| m.keys.len()).sum();
        let mut pending = Vec::with_capacity(messages.len());
        let mut failed: Vec<(Vec<String>, ClientError)> = Vec::new();
        for m in messages {
            let v = &info.vchannels[m.shard];
            let mut msg = MutableMessage::new(t, v.name.clone(), m.payload);
            if let Some(p) = partition {
                msg.coll.partition = p.to_owned();
            }
            let producer = self.producer(&v.pchannel);
            match producer.send(msg).await {
                Ok(fut) => pending.push((m.keys, v.name.as_str(), fut)),
                Err(e) => failed.push((m.keys, e)),
            }
        }
        let mut tick = 0;
        for (keys, vchannel, p) in pending {
            match p.await {
                Ok(r) => {
                    self.client.note_write_on(vchannel, r.tick.0);
                    tick = tick.max(r.tick.0);
                }
                Err(e) => failed.push((keys, e)),
            }
        }
        let Some((_, first)) = failed.first() else {
            return Ok(tick);
        };
        let cause = Box::new(match first {
            ClientError::Unconfirmed(e) => (**e).clone(),
            e => e.clone(),
        });
        let mut not_written = Vec::new();
        let mut in_doubt = Vec::new();
        for (keys, e) in failed {
            match e {
                ClientError::Unconfirmed(_) => in_doubt.extend(keys),
                _ => not_written.extend(keys),
            }
        }
        if not_written.len() == total {
            return Err(*cause);
        }
        Err(ClientError::PartialWrite {
            written: (total - not_written.len() - in_doubt.len()) as u64,
            not_written,
            in_doubt,
            cause,
        })
    }

    fn producer(&self, pchannel: &str) -> Producer {
        self.producers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(pchannel.to_owned())
            .or_insert_with(|| {
                self.client
                    .producer(pchannel, self.producer_options.clone())
            })
            .clone()
    }
}

/// Names are checked before sending: the node refuses the same, and a huge one would only
/// travel to be refused.
fn check_name(what: &str, name: &str) -> Result<(), ClientError> {
    walden_common::validate_object_name(what, name).map_err(ClientError::InvalidArgument)
}

/// One message of a write: its shard, payload, and the primary keys it carries.
struct Outgoing {
    shard: usize,
    payload: Bytes,
    keys: Vec<String>,
}

/// The primary keys of a batch's rows, as text.
fn primary_keys(schema: &Schema, batch: &RecordBatch) -> Vec<String> {
    use arrow_array::{Array as _, Int64Array, StringArray};
    let Some(col) = batch.column_by_name(&schema.primary_key().name) else {
        return Vec::new();
    };
    if let Some(a) = col.as_any().downcast_ref::<Int64Array>() {
        return a
            .iter()
            .map(|v| v.unwrap_or_default().to_string())
            .collect();
    }
    if let Some(a) = col.as_any().downcast_ref::<StringArray>() {
        return a.iter().map(|v| v.unwrap_or_default().to_owned()).collect();
    }
    (0..batch.num_rows()).map(|i| format!("row {i}")).collect()
}

/// Cuts a batch into slices of about [`TARGET_MESSAGE_BYTES`].
fn chunks(batch: &RecordBatch) -> Vec<RecordBatch> {
    let rows = batch.num_rows();
    let bytes = batch.get_array_memory_size().max(1);
    let per_row = bytes.div_ceil(rows.max(1)).max(1);
    let step = (TARGET_MESSAGE_BYTES / per_row).clamp(1, rows.max(1));
    (0..rows)
        .step_by(step)
        .map(|start| batch.slice(start, step.min(rows - start)))
        .collect()
}
