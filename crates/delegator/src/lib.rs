//! The query delegator (docs/design.md §14).
//!
//! For every pchannel a node serves, one task reads the pchannel like any consumer and keeps,
//! per vchannel of a collection, a [`shard::Shard`]:
//!
//! * **Growing rows.** Rows of segments not yet in the manifest, as Arrow, searched exactly.
//! * **Flushed segments.** Loaded from the manifest's Parquet files (the standalone query node,
//!   in process), swapped in for the growing rows they replace once loaded, in one step under
//!   the shard's lock, so a search never sees a row twice or misses one.
//! * **Deletes.** Every delete read (and every delete log of the manifest) applies to every
//!   segment, growing or flushed, and to segments loaded later.
//! * **Served tick.** The tick of the last message read; a read at a consistency level waits
//!   until it reaches the level's guarantee tick.
//!
//! After a restart or a move it starts again from the manifests, like the flusher.

mod follow;
mod remote;
pub mod service;
mod shard;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use prost::Message as _;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tracing::{info, warn};
use walden_common::{ErrorCode, HasErrorCode};
use walden_metastore_api::{MetaError, MetaStore, keys};
use walden_object_store::{Blobs, ObjectStoreError};
use walden_query::QueryError;
use walden_streaming_node::{
    NodeError,
    channel::{Channel, Health},
    manager::WalManager,
    per_channel::{AbortOnDrop, PerChannel},
};

pub use shard::Shard;

/// `[query]`: reads over the delegators.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct QueryConfig {
    /// Longest a read waits for its shard to reach the consistency level's tick before it
    /// fails with LAG_TOO_LARGE (retryable). Default 10 000.
    pub max_wait_ms: u64,
    /// How stale a `bounded` read may be. Default 5 000.
    pub bounded_staleness_ms: u64,
    /// Most rows a query returns (its `limit` defaults to this). Default 16 384.
    pub max_rows: u64,
    /// Largest `top_k`. Default 16 384.
    pub max_top_k: u32,
    /// Most query vectors in one search. Default 1 024.
    pub max_vectors: usize,
    /// A growing segment of a field with an HNSW index gets an interim graph, grown in chunks
    /// of this many rows once that many are not in it (rows past the last chunk are searched
    /// exactly); 0: growing rows are always searched exactly. Default 10 000.
    pub interim_index_rows: u32,
}

impl Default for QueryConfig {
    fn default() -> Self {
        Self {
            max_wait_ms: 10_000,
            bounded_staleness_ms: 5_000,
            max_rows: 16_384,
            max_top_k: 16_384,
            max_vectors: 1_024,
            interim_index_rows: 10_000,
        }
    }
}

/// Errors of the delegator.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum DelegatorError {
    #[error(transparent)]
    Node(#[from] NodeError),
    #[error(transparent)]
    Meta(#[from] MetaError),
    #[error(transparent)]
    Store(#[from] ObjectStoreError),
    #[error(transparent)]
    Query(#[from] QueryError),
    /// Loading flushed data, or a query node's refusal.
    #[error(transparent)]
    QueryNode(#[from] walden_querynode::QueryNodeError),
    #[error(transparent)]
    File(#[from] walden_segment_format::FormatError),
    #[error(transparent)]
    Schema(#[from] walden_schema::SchemaError),
    /// A manifest or payload that cannot be read.
    #[error("{0}")]
    Format(String),
    #[error("{0}")]
    InvalidArgument(String),
    /// No delegator here holds the vchannel.
    #[error("vchannel {0:?} is not served by this node")]
    NotServed(String),
    #[error("collection {0:?} was dropped")]
    Dropped(String),
    #[error("collection {0:?} is released; load it first (walden collection load)")]
    NotLoaded(String),
    /// The vchannel holds another collection (the asker's view is stale: dropped or
    /// re-created).
    #[error(
        "vchannel {vchannel:?} does not hold collection {collection:?} (dropped or re-created?)"
    )]
    WrongCollection {
        vchannel: String,
        collection: String,
    },
    /// No query node could serve the sealed part of a read (retryable).
    #[error("{0}")]
    Unavailable(String),
    #[error(
        "vchannel {vchannel}: waited {waited_ms} ms for tick {want}, served {served}; the shard \
         is behind (retry later or with a weaker consistency level)"
    )]
    LagTooLarge {
        vchannel: String,
        want: u64,
        served: u64,
        waited_ms: u64,
    },
}

impl HasErrorCode for DelegatorError {
    fn code(&self) -> ErrorCode {
        match self {
            Self::Node(e) => e.code(),
            Self::Meta(e) => e.code(),
            Self::Store(e) => e.code(),
            Self::Query(e) => e.code(),
            Self::QueryNode(e) => e.code(),
            Self::File(e) => e.code(),
            Self::Schema(e) => e.code(),
            Self::Format(_) => ErrorCode::Corrupted,
            Self::InvalidArgument(_) => ErrorCode::InvalidArgument,
            Self::NotServed(_) => ErrorCode::ChannelNotFound,
            Self::Dropped(_) => ErrorCode::CollectionDropped,
            Self::NotLoaded(_) => ErrorCode::NotLoaded,
            Self::WrongCollection { .. } => ErrorCode::CollectionNotFound,
            Self::LagTooLarge { .. } => ErrorCode::LagTooLarge,
            Self::Unavailable(_) => ErrorCode::Unavailable,
        }
    }
}

impl From<walden_expr::ExprError> for DelegatorError {
    fn from(e: walden_expr::ExprError) -> Self {
        Self::Query(e.into())
    }
}

/// How a read replica reads a pchannel another node serves (the binary implements it over the
/// client, which follows the owner as it moves).
pub trait PChannelReader: Send + Sync + std::fmt::Debug {
    /// The messages of `pchannel` from `from` on (from its first retained message when
    /// `None`), in batches, and how far the pchannel is complete when the stream is caught up
    /// (its idle TimeTicks); an error or the end of the stream ends the reading.
    fn read(
        &self,
        pchannel: &str,
        from: Option<walden_common::MessageId>,
    ) -> tokio::sync::mpsc::Receiver<Result<walden_message::Delivery, String>>;

    /// The tick of the last message the owner of `pchannel` acknowledged: what a strong read
    /// on a replica waits for.
    fn last_tick<'a>(
        &'a self,
        pchannel: &'a str,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<u64, String>> + Send + 'a>>;
}

/// What every pchannel's delegator task shares.
#[derive(Debug)]
pub(crate) struct Ctx {
    pub meta: Arc<dyn MetaStore>,
    pub blobs: Arc<dyn Blobs>,
    pub config: QueryConfig,
    /// Shards by vchannel, for the service.
    pub shards: Mutex<HashMap<String, Arc<Shard>>>,
    /// The query nodes of the cluster (none in standalone).
    pub query_nodes: remote::QueryNodes,
    /// How calls to query nodes connect (TLS, token).
    pub connect: walden_connect::ConnectOptions,
}

/// The delegators of one node's pchannels.
#[derive(Debug)]
pub struct Delegators {
    ctx: Arc<Ctx>,
    /// The delegators of the pchannels served here.
    running: Arc<PerChannel<()>>,
    /// Read replicas by pchannel: the vchannels held (→ collection) and the task.
    replicas: Mutex<HashMap<String, (VChannelsOf, tokio::task::AbortHandle)>>,
}

/// A read replica's vchannels, each with its collection's name and id.
type VChannelsOf = HashMap<String, (String, u64)>;

impl Delegators {
    /// Delegators reading with `meta` and `blobs`; `connect` is how calls to query nodes
    /// connect (the cluster's CA and token).
    pub fn new(
        meta: Arc<dyn MetaStore>,
        blobs: Arc<dyn Blobs>,
        config: QueryConfig,
        connect: walden_connect::ConnectOptions,
    ) -> Arc<Self> {
        Arc::new(Self {
            ctx: Arc::new(Ctx {
                meta,
                blobs,
                config,
                shards: Mutex::new(HashMap::new()),
                query_nodes: remote::QueryNodes::default(),
                connect,
            }),
            running: Arc::default(),
            replicas: Mutex::new(HashMap::new()),
        })
    }

    /// Runs the read replicas the leader coordinator places on this node (`node()`: its
    /// current id), reading each pchannel from its owner through `reader` (docs/design.md
    /// §14.7).
    pub fn follow_replicas(
        self: &Arc<Self>,
        node: impl Fn() -> u64 + Send + 'static,
        reader: Arc<dyn PChannelReader>,
    ) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                let mut watch = match this.ctx.meta.watch(keys::REPLICAS_PREFIX).await {
                    Ok(w) => w,
                    Err(e) => {
                        warn!(error = %e, "watching read replicas failed; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                };
                loop {
                    if let Err(e) = this.reconcile_replicas(node(), &reader).await {
                        warn!(error = %e, "read replicas: reconcile failed");
                    }
                    tokio::select! {
                        e = watch.recv() => if e.is_none() { break },
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                    while watch.try_recv().is_ok() {}
                }
            }
        })
    }

    async fn reconcile_replicas(
        &self,
        me: u64,
        reader: &Arc<dyn PChannelReader>,
    ) -> Result<(), DelegatorError> {
        let mut wanted: HashMap<String, VChannelsOf> = HashMap::new();
        for kv in self.ctx.meta.range(keys::REPLICAS_PREFIX).await? {
            let Ok(r) = walden_proto::v1::ReadReplicas::decode(kv.value.as_ref()) else {
                continue;
            };
            for v in r.vchannels.iter().filter(|v| v.nodes.contains(&me)) {
                // The owner's delegator serves it here already.
                if self.serves(&v.pchannel) {
                    continue;
                }
                wanted
                    .entry(v.pchannel.clone())
                    .or_default()
                    .insert(v.vchannel.clone(), (r.collection.clone(), r.collection_id));
            }
        }
        let mut running = self.replicas.lock().unwrap_or_else(|e| e.into_inner());
        running.retain(|pchannel, (vchannels, task)| {
            let keep = wanted.get(pchannel) == Some(vchannels) && !task.is_finished();
            if !keep {
                task.abort();
                self.ctx
                    .shards
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .retain(|_, s| s.pchannel() != pchannel || !s.is_replica());
            }
            keep
        });
        for (pchannel, vchannels) in wanted {
            if running.contains_key(&pchannel) {
                continue;
            }
            info!(
                pchannel,
                vchannels = vchannels.len(),
                "read replica starting"
            );
            let source = follow::Source::Replica {
                pchannel: pchannel.clone(),
                vchannels: vchannels.clone(),
                reader: reader.clone(),
            };
            let task = tokio::spawn(supervise_replica(source, self.ctx.clone()));
            running.insert(pchannel, (vchannels, task.abort_handle()));
        }
        Ok(())
    }

    pub(crate) fn ctx(&self) -> &Ctx {
        &self.ctx
    }

    pub fn config(&self) -> &QueryConfig {
        &self.ctx.config
    }

    /// Follows `manager`: a delegator task for every pchannel it serves, under the term it
    /// serves it with (and the sync of copies on query nodes). Ends when the manager's change
    /// feed does.
    pub fn follow(self: &Arc<Self>, manager: Arc<WalManager>) -> tokio::task::JoinHandle<()> {
        let sync = AbortOnDrop(tokio::spawn(sync_replicas(Arc::downgrade(&self.ctx))));
        let (ctx, forget_ctx) = (self.ctx.clone(), self.ctx.clone());
        let follow = self.running.follow(
            manager,
            move |ch| ((), tokio::spawn(supervise(ch.clone(), ctx.clone()))),
            move |pchannel| forget(&forget_ctx, pchannel),
        );
        tokio::spawn(async move {
            let _sync = sync;
            let _ = follow.await;
        })
    }

    /// The shard of `vchannel`, if a delegator here holds it.
    pub fn shard(&self, vchannel: &str) -> Result<Arc<Shard>, DelegatorError> {
        self.ctx
            .shards
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(vchannel)
            .cloned()
            .ok_or_else(|| DelegatorError::NotServed(vchannel.to_owned()))
    }

    /// Whether a delegator here follows `pchannel`.
    pub fn serves(&self, pchannel: &str) -> bool {
        self.running.serves(pchannel)
    }
}

/// Drops the shards of `pchannel` from what the service can find.
fn forget(ctx: &Ctx, pchannel: &str) {
    ctx.shards
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|_, s| s.pchannel() != pchannel);
}

/// Keeps every shard's copies on query nodes synced (docs/design.md §14.6).
async fn sync_replicas(ctx: std::sync::Weak<Ctx>) {
    loop {
        tokio::time::sleep(remote::SYNC_INTERVAL).await;
        let Some(ctx) = ctx.upgrade() else { return };
        let shards: Vec<Arc<Shard>> = ctx
            .shards
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter(|s| s.remote.is_some())
            .cloned()
            .collect();
        if shards.is_empty() {
            continue;
        }
        if let Err(e) = ctx.query_nodes.refresh(&ctx).await {
            warn!(error = %e, "listing query nodes failed");
            continue;
        }
        for s in shards {
            if let Some(r) = &s.remote {
                r.sync(&s, &ctx).await;
            }
        }
    }
}

/// Runs a pchannel's delegator while the channel serves, starting it again (from the
/// manifests) after a failure, with backoff.
async fn supervise(ch: Arc<Channel>, ctx: Arc<Ctx>) {
    let mut backoff = Duration::from_millis(200);
    loop {
        if *ch.health().borrow() != Health::Serving {
            return;
        }
        match follow::run(follow::Source::Owner(ch.clone()), ctx.clone()).await {
            Ok(follow::Exit::Stopped) => return,
            Ok(follow::Exit::Restart) => {
                info!(
                    pchannel = ch.name(),
                    "catalog changed; delegator starting again"
                );
                backoff = Duration::from_millis(200);
                ctx.shards
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .retain(|_, s| s.pchannel() != ch.name());
                continue;
            }
            Err(e) => {
                warn!(pchannel = ch.name(), error = %e, retry_in = ?backoff, "delegator failed; starting again from the manifests");
            }
        }
        ctx.shards
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, s| s.pchannel() != ch.name());
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(10));
        info!(pchannel = ch.name(), "delegator starting again");
    }
}

/// Runs a read replica's delegator, starting it again (from the manifests) whenever it ends,
/// with backoff after a failure.
async fn supervise_replica(source: follow::Source, ctx: Arc<Ctx>) {
    let pchannel = match &source {
        follow::Source::Replica { pchannel, .. } => pchannel.clone(),
        follow::Source::Owner(ch) => ch.name().to_owned(),
    };
    let mut backoff = Duration::from_millis(200);
    loop {
        match follow::run(source.clone(), ctx.clone()).await {
            Ok(_) => backoff = Duration::from_millis(200),
            Err(e) => {
                warn!(pchannel, error = %e, retry_in = ?backoff, "read replica failed; starting again");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
        ctx.shards
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, s| s.pchannel() != pchannel || !s.is_replica());
    }
}
