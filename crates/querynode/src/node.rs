//! What a query node holds, and how it follows the placement.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex, RwLock, RwLockReadGuard},
    time::{Duration, Instant},
};

use bytes::Bytes;
use prost::Message as _;
use tracing::{info, warn};
use walden_metastore_api::{MetaError, MetaStore, increment, keys};
use walden_object_store::Blobs;
use walden_proto::v1::{QueryNodeInfo, SegmentPlacement};
use walden_query::Segment;
use walden_schema::Schema;

use crate::{
    QueryNodeError,
    load::{self, HnswSpec},
};

/// How a query node runs.
#[derive(Clone, Debug)]
pub struct QueryNodeConfig {
    /// The address delegators reach it at.
    pub address: String,
    /// Its registration lease: the coordinator moves its segments away this long after it
    /// stops renewing.
    pub lease_ttl: Duration,
    /// How long a segment the placement no longer names stays searchable, for searches planned
    /// before the move or compaction.
    pub retire_grace: Duration,
}

/// A collection as a query node needs it.
#[derive(Debug)]
pub(crate) struct Collection {
    pub schema: Arc<Schema>,
    pub pk: String,
    pub hnsw: Option<HnswSpec>,
    /// The catalog's index specs `hnsw` was made from: a change rebuilds the graphs.
    pub indexes: Vec<walden_proto::v1::IndexSpec>,
}

/// One flushed segment held here.
#[derive(Debug)]
pub(crate) struct Held {
    pub collection_id: u64,
    pub vchannel: String,
    pub segment: RwLock<Segment>,
    pub key_filter: Bytes,
    /// When the placement stopped naming it.
    pub retired: Mutex<Option<Instant>>,
}

impl Held {
    pub fn read(&self) -> RwLockReadGuard<'_, Segment> {
        self.segment.read().unwrap_or_else(|e| e.into_inner())
    }
}

/// A query node.
#[derive(Debug)]
pub struct QueryNode {
    meta: Arc<dyn MetaStore>,
    blobs: Arc<dyn Blobs>,
    config: QueryNodeConfig,
    id: u64,
    incarnation: u64,
    /// By (collection id, segment id).
    held: RwLock<HashMap<(u64, u64), Arc<Held>>>,
    collections: Mutex<HashMap<u64, Arc<Collection>>>,
}

impl QueryNode {
    /// Registers under a fresh id and lease and starts following the placement.
    pub async fn start(
        meta: Arc<dyn MetaStore>,
        blobs: Arc<dyn Blobs>,
        config: QueryNodeConfig,
    ) -> Result<Arc<Self>, QueryNodeError> {
        let id = increment(&*meta, keys::QUERY_NODE_NEXT_ID).await?;
        let node = Arc::new(Self {
            meta,
            blobs,
            config,
            id,
            // Never 0: 0 means "any" in requests.
            incarnation: rand::random::<u64>() | 1,
            held: RwLock::new(HashMap::new()),
            collections: Mutex::new(HashMap::new()),
        });
        // Watch before registering, so no placement written for this node is missed.
        let watch = node.meta.watch(keys::PLACEMENT_PREFIX).await?;
        let lease = node.register().await?;
        info!(id, address = node.config.address, "query node registered");
        tokio::spawn(keep_registered(Arc::downgrade(&node), lease));
        tokio::spawn(follow(Arc::downgrade(&node), watch));
        Ok(node)
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    async fn register(&self) -> Result<i64, MetaError> {
        let lease = self.meta.grant_lease(self.config.lease_ttl).await?;
        let info = QueryNodeInfo {
            id: self.id,
            address: self.config.address.clone(),
            incarnation: self.incarnation,
        };
        self.meta
            .put(
                &keys::query_node(self.id),
                Bytes::from(info.encode_to_vec()),
                Some(lease),
            )
            .await?;
        Ok(lease)
    }

    /// Leaves the cluster: its segments move to other query nodes.
    pub async fn leave(&self) {
        let _ = self.meta.delete(&keys::query_node(self.id)).await;
    }

    pub(crate) fn collection(&self, id: u64) -> Option<Arc<Collection>> {
        self.collections
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .cloned()
    }

    /// The segments `ids` of `vchannel` (all of its segments when `ids` is empty); an error
    /// when one is not held.
    pub(crate) fn segments(
        &self,
        collection_id: u64,
        vchannel: &str,
        ids: &[u64],
    ) -> Result<Vec<Arc<Held>>, QueryNodeError> {
        let held = self.held.read().unwrap_or_else(|e| e.into_inner());
        if ids.is_empty() {
            return Ok(held
                .values()
                .filter(|h| h.collection_id == collection_id && h.vchannel == vchannel)
                .cloned()
                .collect());
        }
        ids.iter()
            .map(|id| {
                held.get(&(collection_id, *id))
                    .filter(|h| h.vchannel == vchannel)
                    .cloned()
                    .ok_or_else(|| {
                        QueryNodeError::NotHeld(format!(
                            "query node {} does not hold segment {id} of {vchannel}",
                            self.id
                        ))
                    })
            })
            .collect()
    }

    /// How many segments are held (retired ones in their grace included).
    pub fn held_segments(&self) -> usize {
        self.held.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Every segment held, including those retired but still in their grace: a delegator may
    /// use a copy until the new one is ready.
    pub(crate) fn all(&self) -> Vec<Arc<Held>> {
        self.held
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Makes what is held match the placement: loads what is placed here and missing, retires
    /// what is no longer placed, drops what was retired longer than the grace.
    async fn reconcile(&self) -> Result<(), QueryNodeError> {
        let mut wanted: HashMap<(u64, String), (String, Vec<u64>)> = HashMap::new();
        let mut placed_here: HashSet<(u64, u64)> = HashSet::new();
        for kv in self.meta.range(keys::PLACEMENT_PREFIX).await? {
            let p = SegmentPlacement::decode(kv.value.as_ref())
                .map_err(|e| QueryNodeError::Format(format!("placement {}: {e}", kv.key)))?;
            for s in p.segments.iter().filter(|s| s.nodes.contains(&self.id)) {
                placed_here.insert((p.collection_id, s.segment_id));
                wanted
                    .entry((p.collection_id, s.vchannel.clone()))
                    .or_insert_with(|| (p.collection.clone(), Vec::new()))
                    .1
                    .push(s.segment_id);
            }
        }
        {
            let mut held = self.held.write().unwrap_or_else(|e| e.into_inner());
            let grace = self.config.retire_grace;
            held.retain(|key, h| {
                let mut retired = h.retired.lock().unwrap_or_else(|e| e.into_inner());
                if placed_here.contains(key) {
                    *retired = None;
                    return true;
                }
                let since = *retired.get_or_insert_with(Instant::now);
                since.elapsed() < grace
            });
        }
        let mut checked = HashSet::new();
        for ((collection_id, vchannel), (name, ids)) in wanted {
            // The catalog's index specs, once a round: segments held under others are indexed
            // again (an index created or dropped after they were loaded).
            if checked.insert(collection_id) {
                self.reindex(collection_id, &name).await?;
            }
            let missing: Vec<u64> = {
                let held = self.held.read().unwrap_or_else(|e| e.into_inner());
                ids.into_iter()
                    .filter(|id| !held.contains_key(&(collection_id, *id)))
                    .collect()
            };
            if missing.is_empty() {
                continue;
            }
            if let Err(e) = self.load(collection_id, &name, &vchannel, &missing).await {
                warn!(collection = name, vchannel, error = %e, "loading segments failed; trying again");
                return Err(e);
            }
        }
        Ok(())
    }

    async fn load(
        &self,
        collection_id: u64,
        name: &str,
        vchannel: &str,
        ids: &[u64],
    ) -> Result<(), QueryNodeError> {
        let coll = self.load_collection(collection_id, name).await?;
        let Some((manifest, _)) = load::read_manifest(&*self.meta, collection_id, vchannel).await?
        else {
            return Ok(());
        };
        let segments: Vec<_> = manifest
            .segments
            .iter()
            .filter(|s| ids.contains(&s.segment_id))
            .cloned()
            .collect();
        let started = Instant::now();
        let mut loaded =
            load::segments(&*self.blobs, segments, &coll.pk, coll.hnsw.clone()).await?;
        // The delete logs committed with the segments; later deletes come from the delegator.
        let logs = manifest
            .deltas
            .iter()
            .filter_map(|d| d.file.as_ref().map(|f| f.key.clone()))
            .collect();
        for (_, deletes) in load::delete_logs(&*self.blobs, logs).await? {
            for seg in &mut loaded {
                seg.apply(&deletes);
            }
        }
        let n = loaded.len();
        let mut held = self.held.write().unwrap_or_else(|e| e.into_inner());
        for seg in loaded {
            let key_filter = Bytes::from(seg.key_filter().to_bytes());
            held.insert(
                (collection_id, seg.id()),
                Arc::new(Held {
                    collection_id,
                    vchannel: vchannel.to_owned(),
                    segment: RwLock::new(seg),
                    key_filter,
                    retired: Mutex::new(None),
                }),
            );
        }
        info!(collection = name, vchannel, segments = n, took = ?started.elapsed(), "segments loaded");
        Ok(())
    }

    /// Rebuilds the graphs of the segments of `collection_id` held here when the catalog's
    /// index specs are no longer those they were built with. Each graph is built off the
    /// segment's lock and swapped in, so the copy keeps answering (exactly, or with its old
    /// graph) and keeps the deletes forwarded to it.
    async fn reindex(&self, collection_id: u64, name: &str) -> Result<(), QueryNodeError> {
        let Some(old) = self.collection(collection_id) else {
            return Ok(());
        };
        let fresh = match self.read_collection(collection_id, name).await {
            Ok(c) => c,
            // Dropped or re-created: the placement will say so.
            Err(QueryNodeError::Format(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        if fresh.indexes == old.indexes {
            return Ok(());
        }
        self.collections
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(collection_id, fresh.clone());
        let held: Vec<Arc<Held>> = self
            .held
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter(|h| h.collection_id == collection_id)
            .cloned()
            .collect();
        let started = Instant::now();
        let hnsw = fresh.hnsw.clone();
        let n = held.len();
        tokio::task::spawn_blocking(move || {
            let threads = std::thread::available_parallelism().map_or(1, usize::from);
            for h in held {
                match &hnsw {
                    Some((field, metric, params)) => {
                        let job = h.read().graph_job(field);
                        let rows = job.rows;
                        let ann = job.build(*metric, params, threads)?;
                        h.segment
                            .write()
                            .unwrap_or_else(|e| e.into_inner())
                            .install_index(ann, rows);
                    }
                    None => h
                        .segment
                        .write()
                        .unwrap_or_else(|e| e.into_inner())
                        .drop_index(),
                }
            }
            Ok::<_, QueryNodeError>(())
        })
        .await
        .map_err(|e| QueryNodeError::Format(format!("indexing segments: {e}")))??;
        info!(collection = name, segments = n, took = ?started.elapsed(), "segments indexed again for new index specs");
        Ok(())
    }

    async fn load_collection(
        &self,
        collection_id: u64,
        name: &str,
    ) -> Result<Arc<Collection>, QueryNodeError> {
        if let Some(c) = self.collection(collection_id) {
            return Ok(c);
        }
        let c = self.read_collection(collection_id, name).await?;
        self.collections
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(collection_id, c.clone());
        Ok(c)
    }

    /// The collection as the catalog has it now.
    async fn read_collection(
        &self,
        collection_id: u64,
        name: &str,
    ) -> Result<Arc<Collection>, QueryNodeError> {
        let info = load::catalog_record(&*self.meta, name, collection_id)
            .await?
            .ok_or_else(|| {
                QueryNodeError::Format(format!(
                    "no catalog record for collection {collection_id} ({name:?})"
                ))
            })?;
        let schema = Arc::new(Schema::new(info.schema.unwrap_or_default())?);
        Ok(Arc::new(Collection {
            pk: schema.primary_key().name.clone(),
            hnsw: load::hnsw(&schema, &info.indexes),
            indexes: info.indexes,
            schema,
        }))
    }
}

/// Keeps the registration's lease alive; registers again (same id and incarnation: what is
/// held is still right) when the lease was lost.
async fn keep_registered(node: std::sync::Weak<QueryNode>, mut lease: i64) {
    loop {
        let Some(n) = node.upgrade() else { return };
        let ttl = n.config.lease_ttl;
        drop(n);
        tokio::time::sleep(ttl / 3).await;
        let Some(n) = node.upgrade() else { return };
        match n.meta.keep_alive(lease).await {
            Ok(()) => {}
            Err(MetaError::LeaseNotFound(_)) => match n.register().await {
                Ok(l) => {
                    warn!(id = n.id, "registration lease lost; registered again");
                    lease = l;
                }
                Err(e) => warn!(error = %e, "registering again failed"),
            },
            Err(e) => warn!(error = %e, "query node keep-alive failed"),
        }
    }
}

/// Reconciles at start, on every placement change, and every second (to drop retired
/// segments and retry failed loads).
async fn follow(node: std::sync::Weak<QueryNode>, mut watch: walden_metastore_api::WatchReceiver) {
    loop {
        let Some(n) = node.upgrade() else { return };
        if let Err(e) = n.reconcile().await {
            warn!(error = %e, "query node reconcile failed");
        }
        drop(n);
        tokio::select! {
            e = watch.recv() => {
                if e.is_none() {
                    warn!("the placement watch ended; watching again");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    let Some(n) = node.upgrade() else { return };
                    match n.meta.watch(keys::PLACEMENT_PREFIX).await {
                        Ok(w) => watch = w,
                        Err(e) => warn!(error = %e, "watching the placement failed"),
                    }
                    continue;
                }
                // Coalesce a burst of changes into one reconcile.
                while watch.try_recv().is_ok() {}
            }
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}
