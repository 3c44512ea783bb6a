//! One vchannel's rows as a delegator holds them, and the reads over them.

use std::{
    collections::{BTreeMap, HashSet},
    sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard},
    time::{Duration, Instant},
};

use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;
use tokio::sync::watch;
use walden_common::TimeTick;
use walden_expr::Filter;
use walden_proto::v1::{ConsistencyLevel, IndexSpec, ReadOptions};
use walden_query::{Hits, Metric, SearchParams, Segment};
use walden_schema::{DataType, Schema};
use walden_segment_format::Deletes;
use walden_streaming_node::channel::Channel;

use crate::{DelegatorError, QueryConfig};

/// The rows of one vchannel.
#[derive(Debug, Default)]
pub(crate) struct State {
    /// Segments not (yet) in the manifest, from the WAL.
    pub growing: BTreeMap<u64, Segment>,
    /// Segments of the manifest, from their files.
    pub sealed: BTreeMap<u64, Segment>,
    /// Ids whose rows are in the manifest's files (or were, before compaction replaced them):
    /// their rows in the WAL are skipped.
    pub committed: HashSet<u64>,
    /// Every delete known (read from the WAL or from delete logs): applied to every segment,
    /// including those loaded later.
    pub deletes: Deletes,
    /// Delete logs already read.
    pub delta_keys: HashSet<String>,
    /// The manifest revision the sealed segments are from (0: none).
    pub revision: i64,
    /// Partitions dropped while this delegator read, with the tick of the drop: their rows
    /// written before it are gone (a segment still in a manifest is skipped).
    pub dropped_partitions: std::collections::HashMap<String, u64>,
    /// The collection's partitions when the delegator started: flushed segments of any other
    /// partition belong to one dropped before.
    pub partitions: Option<HashSet<String>>,
    pub dropped: bool,
    /// Segments of the manifest held by query nodes (when the collection is placed on them).
    pub remote: BTreeMap<u64, RemoteSegment>,
    /// Deletes read and not yet forwarded to query nodes.
    pub forward: Vec<(walden_segment_format::Pk, u64)>,
}

/// A flushed segment a query node holds.
#[derive(Clone, Debug)]
pub(crate) struct RemoteSegment {
    pub partition: String,
    pub rows: u64,
    pub max_tick: u64,
}

/// What the catalog and placement say a shard holds.
#[derive(Debug, Default)]
pub(crate) struct LoadState {
    pub released: bool,
    pub indexes: Vec<IndexSpec>,
    /// Query nodes hold the flushed segments.
    pub placed: bool,
}

/// What a strong read's guarantee tick comes from.
#[derive(Debug, Clone)]
pub(crate) enum Tail {
    /// The pchannel is served here: the WAL's last tick covers every acknowledged write.
    Local(Arc<Channel>),
    /// A read replica: the owner's last acknowledged tick, asked at request time (one call;
    /// an idle pchannel writes no TimeTick a fresh oracle tick could wait for).
    Owner(Arc<dyn crate::PChannelReader>),
}

/// A delegator's view of one vchannel.
#[derive(Debug)]
pub struct Shard {
    pub(crate) vchannel: String,
    pub(crate) collection: String,
    pub(crate) collection_id: u64,
    pub(crate) schema: Arc<Schema>,
    pub(crate) data_schema: SchemaRef,
    pub(crate) pk: String,
    /// From the catalog record the shard was started with (a change restarts the delegator).
    pub(crate) released: bool,
    pub(crate) indexes: Vec<IndexSpec>,
    /// Copies of the flushed segments on query nodes, when the coordinator placed the
    /// collection on them (else the shard holds its flushed segments itself).
    pub(crate) remote: Option<Arc<crate::remote::Replicas>>,
    pchannel: String,
    tail: Tail,
    state: RwLock<State>,
    served: watch::Sender<u64>,
}

/// A search as the shard runs it.
#[derive(Debug)]
pub struct SearchSpec<'a> {
    pub field: &'a str,
    pub queries: &'a [Vec<f32>],
    pub k: usize,
    pub metric: Metric,
    pub filter: Option<&'a Filter>,
    pub output_fields: &'a [String],
    pub partitions: &'a [String],
    pub ef: usize,
}

impl Shard {
    pub(crate) fn new(
        pchannel: &str,
        tail: Tail,
        vchannel: &str,
        collection: &str,
        collection_id: u64,
        schema: Arc<Schema>,
        load: LoadState,
    ) -> Self {
        Self {
            released: load.released,
            indexes: load.indexes,
            remote: load.placed.then(Default::default),
            vchannel: vchannel.to_owned(),
            collection: collection.to_owned(),
            collection_id,
            data_schema: walden_segment_format::data_schema(&schema),
            pk: schema.primary_key().name.clone(),
            schema,
            pchannel: pchannel.to_owned(),
            tail,
            state: RwLock::new(State::default()),
            served: watch::channel(0).0,
        }
    }

    pub fn pchannel(&self) -> &str {
        &self.pchannel
    }

    pub fn collection(&self) -> &str {
        &self.collection
    }

    pub fn schema(&self) -> &Arc<Schema> {
        &self.schema
    }

    pub(crate) fn read(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn set_served(&self, tick: u64) {
        self.served.send_if_modified(|t| {
            let newer = tick > *t;
            if newer {
                *t = tick;
            }
            newer
        });
    }

    /// The tick of the last message read.
    pub fn served_tick(&self) -> u64 {
        *self.served.borrow()
    }

    /// Whether this shard is a read replica (its pchannel is served by another node).
    pub fn is_replica(&self) -> bool {
        matches!(self.tail, Tail::Owner(_))
    }

    /// The tick a read at `options` must see (0: none).
    pub async fn guarantee_tick(
        &self,
        options: &ReadOptions,
        config: &QueryConfig,
    ) -> Result<u64, DelegatorError> {
        Ok(match options.consistency() {
            // The WAL is on this node: its last tick covers every acknowledged write, and is
            // often well below a fresh TSO tick (no wait for the next TimeTick).
            ConsistencyLevel::Strong => match &self.tail {
                Tail::Local(ch) => ch.last_tick().0,
                Tail::Owner(reader) => reader.last_tick(&self.pchannel).await.map_err(|e| {
                    DelegatorError::Unavailable(format!("the owner of {}: {e}", self.pchannel))
                })?,
            },
            ConsistencyLevel::Session => options.guarantee_tick,
            ConsistencyLevel::Eventually => 0,
            // Within the staleness bound, and never older than the caller's own last write
            // (clients send it with every read): the default level reads your writes.
            ConsistencyLevel::Bounded | ConsistencyLevel::Unspecified => TimeTick::compose(
                walden_tso::now_ms().saturating_sub(config.bounded_staleness_ms),
                0,
            )
            .0
            .max(options.guarantee_tick),
        })
    }

    /// Waits until the shard has read through the tick `options` asks for.
    pub async fn wait(
        &self,
        options: &ReadOptions,
        config: &QueryConfig,
    ) -> Result<(), DelegatorError> {
        if self.released {
            return Err(DelegatorError::NotLoaded(self.collection.clone()));
        }
        let want = self.guarantee_tick(options, config).await?;
        let start = Instant::now();
        let mut rx = self.served.subscribe();
        let reached = tokio::time::timeout(
            Duration::from_millis(config.max_wait_ms),
            rx.wait_for(|t| *t >= want),
        )
        .await;
        match reached {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err(DelegatorError::NotServed(self.vchannel.clone())),
            Err(_) => Err(DelegatorError::LagTooLarge {
                vchannel: self.vchannel.clone(),
                want,
                served: self.served_tick(),
                waited_ms: start.elapsed().as_millis() as u64,
            }),
        }
    }

    /// The metric a search of `field` uses when it names none: its index's, else L2.
    pub fn default_metric(&self, field: &str) -> Metric {
        walden_querynode::load::default_metric(&self.indexes, field)
    }

    /// The HNSW spec of the collection, if a field has one: what flushed segments are built
    /// with (one indexed field per segment).
    pub(crate) fn hnsw(&self) -> Option<walden_querynode::load::HnswSpec> {
        walden_querynode::load::hnsw(&self.schema, &self.indexes)
    }

    /// What the shard holds, for `walden collection load` and `walden index describe`.
    pub fn state(&self) -> walden_proto::v1::ShardState {
        let usable = self.remote.as_ref().map(|r| r.usable()).unwrap_or_default();
        let st = self.read();
        // A segment on query nodes counts once a copy is synced.
        let remote: Vec<(u64, u64)> = st
            .remote
            .iter()
            .filter_map(|(id, r)| usable.get(id).map(|indexed| (r.rows, *indexed)))
            .collect();
        walden_proto::v1::ShardState {
            vchannel: self.vchannel.clone(),
            loaded: !self.released,
            served_tick: self.served_tick(),
            growing_segments: st.growing.len() as u64,
            growing_rows: st.growing.values().map(|s| u64::from(s.rows())).sum(),
            sealed_segments: (st.sealed.len() + remote.len()) as u64,
            sealed_rows: st.sealed.values().map(|s| u64::from(s.rows())).sum::<u64>()
                + remote.iter().map(|(rows, _)| rows).sum::<u64>(),
            indexed_rows: st
                .sealed
                .values()
                .map(|s| s.indexed_rows() as u64)
                .sum::<u64>()
                + remote.iter().map(|(_, i)| i).sum::<u64>(),
            indexes: self.indexes.clone(),
            growing_indexed_rows: st.growing.values().map(|s| s.indexed_rows() as u64).sum(),
        }
    }

    /// The vector field `name` names (or the only one, when empty).
    /// The primary key's name.
    pub fn pk(&self) -> &str {
        &self.pk
    }

    pub fn vector_field(&self, name: &str) -> Result<String, DelegatorError> {
        let vectors: Vec<&str> = self
            .schema
            .proto()
            .fields
            .iter()
            .filter(|f| f.data_type() == DataType::FloatVector)
            .map(|f| f.name.as_str())
            .collect();
        if name.is_empty() {
            return match vectors.as_slice() {
                [one] => Ok((*one).to_owned()),
                _ => Err(DelegatorError::InvalidArgument(format!(
                    "the collection has {} vector fields ({}): name one",
                    vectors.len(),
                    vectors.join(", ")
                ))),
            };
        }
        if vectors.contains(&name) {
            Ok(name.to_owned())
        } else {
            Err(DelegatorError::InvalidArgument(format!(
                "{name:?} is not a vector field of the collection"
            )))
        }
    }

    /// Checks output field names; the primary key always comes first.
    pub fn output_fields(&self, asked: &[String]) -> Result<Vec<String>, DelegatorError> {
        let mut out = vec![self.pk.clone()];
        for name in asked {
            if name == "*" {
                for f in &self.schema.proto().fields {
                    if !out.contains(&f.name) {
                        out.push(f.name.clone());
                    }
                }
                continue;
            }
            if !self.schema.proto().fields.iter().any(|f| &f.name == name) {
                return Err(DelegatorError::InvalidArgument(format!(
                    "no field {name:?} to output"
                )));
            }
            if !out.contains(name) {
                out.push(name.clone());
            }
        }
        Ok(out)
    }

    /// The `k` nearest live rows per query vector over the segments this shard holds itself,
    /// and the visible segments query nodes hold (searched by the caller).
    pub fn search(&self, spec: &SearchSpec<'_>) -> Result<(Vec<Hits>, Vec<u64>), DelegatorError> {
        let st = self.read();
        if st.dropped {
            return Err(DelegatorError::Dropped(self.collection.clone()));
        }
        let params = SearchParams {
            field: spec.field,
            queries: spec.queries,
            k: spec.k,
            metric: spec.metric,
            filter: spec.filter,
            ef: spec.ef,
        };
        let hits = walden_query::search(
            &self.visible(&st, spec.partitions),
            &params,
            spec.output_fields,
            &self.pk,
        )?;
        Ok((hits, self.visible_remote(&st, spec.partitions)))
    }

    /// The live rows matching `filter` (the output fields, primary key first), chosen as
    /// `shape` says, and whether more matched, over the segments held here; and the visible
    /// segments query nodes hold.
    pub fn query(
        &self,
        filter: Option<&Filter>,
        output_fields: &[String],
        partitions: &[String],
        shape: walden_query::QueryShape,
    ) -> Result<(Option<RecordBatch>, bool, Vec<u64>), DelegatorError> {
        let st = self.read();
        if st.dropped {
            return Err(DelegatorError::Dropped(self.collection.clone()));
        }
        let (rows, more) = walden_query::query(
            &self.visible(&st, partitions),
            filter,
            output_fields,
            &self.pk,
            shape,
        )?;
        Ok((rows, more, self.visible_remote(&st, partitions)))
    }

    /// How many live rows match `filter` here; and the visible segments query nodes hold.
    pub fn count(
        &self,
        filter: Option<&Filter>,
        partitions: &[String],
    ) -> Result<(u64, Vec<u64>), DelegatorError> {
        let st = self.read();
        if st.dropped {
            return Err(DelegatorError::Dropped(self.collection.clone()));
        }
        let n = walden_query::count(&self.visible(&st, partitions), filter)?;
        Ok((n, self.visible_remote(&st, partitions)))
    }

    fn visible_remote(&self, st: &State, partitions: &[String]) -> Vec<u64> {
        st.remote
            .iter()
            .filter(|(_, r)| partitions.is_empty() || partitions.contains(&r.partition))
            .map(|(id, _)| *id)
            .collect()
    }

    fn visible<'a>(&self, st: &'a State, partitions: &[String]) -> Vec<&'a Segment> {
        st.sealed
            .values()
            .chain(st.growing.values())
            .filter(|s| partitions.is_empty() || partitions.iter().any(|p| p == s.partition()))
            .collect()
    }
}
