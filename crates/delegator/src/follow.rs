//! One pchannel's delegator task: reads the pchannel from the lowest checkpoint of its
//! vchannels' manifests, keeps each vchannel's growing rows and deletes, and swaps in flushed
//! segments as their manifests commit them.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use prost::Message as _;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};
use walden_common::MessageId;
use walden_message::{Delivery, ImmutableMessage, MessageType};
use walden_metastore_api::{EventKind, keys};
use walden_proto::v1::{CollectionInfo, DeleteIds, FlushedSegment, SegmentState, VChannelManifest};
use walden_query::Segment;
use walden_segment_format::{self as files, Deletes, Pk};
use walden_streaming_node::{
    channel::{Channel, Health},
    per_channel::AbortOnDrop,
    scanner::{self, DeliverPolicy, Filters, Frames},
};

use crate::{
    Ctx, DelegatorError, Shard,
    shard::{RemoteSegment, Tail},
};

/// Why a delegator task ended without an error.
#[derive(Debug)]
pub(crate) enum Exit {
    /// The channel stopped serving here.
    Stopped,
    /// A collection's catalog record changed what the delegator must hold (loaded or
    /// released, indexes): start again from the manifests with the new record.
    Restart,
}

/// Where a vchannel's reading must start.
enum Start {
    At(MessageId),
    FromFirst,
    /// Nothing to read (a released collection, or not a collection's vchannel).
    Nothing,
}

/// What the loader read for a manifest: the segments and delete logs not loaded before.
struct Loaded {
    vchannel: String,
    revision: i64,
    manifest: VChannelManifest,
    segments: Vec<Segment>,
    /// New segments held by query nodes.
    remote: Vec<(u64, RemoteSegment)>,
    deletes: Vec<(String, Deletes)>,
}

/// Longest a flush's growing rows stay in place waiting for their flushed copy on a query node.
const HANDOFF_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Where a delegator reads its pchannel.
#[derive(Debug, Clone)]
pub(crate) enum Source {
    /// This node serves the pchannel: its own scanner.
    Owner(Arc<Channel>),
    /// A read replica of some of the pchannel's vchannels (vchannel → collection name): the
    /// owner's stream, read like any consumer.
    Replica {
        pchannel: String,
        vchannels: crate::VChannelsOf,
        reader: Arc<dyn crate::PChannelReader>,
    },
}

impl Source {
    fn pchannel(&self) -> &str {
        match self {
            Self::Owner(ch) => ch.name(),
            Self::Replica { pchannel, .. } => pchannel,
        }
    }
}

/// The messages a delegator reads, in batches.
enum Feed {
    Scan(mpsc::Receiver<Result<Delivery, walden_streaming_node::NodeError>>),
    Remote(mpsc::Receiver<Result<Delivery, String>>),
}

impl Feed {
    async fn recv(&mut self) -> Option<Result<Delivery, DelegatorError>> {
        match self {
            Self::Scan(rx) => rx.recv().await.map(|r| r.map_err(Into::into)),
            Self::Remote(rx) => rx
                .recv()
                .await
                .map(|r| r.map_err(DelegatorError::Unavailable)),
        }
    }
}

struct Follower {
    source: Source,
    ctx: Arc<Ctx>,
    shards: HashMap<String, Arc<Shard>>,
    /// Vchannels that are not a collection's.
    others: HashSet<String>,
}

fn format(what: &str, e: impl std::fmt::Display) -> DelegatorError {
    DelegatorError::Format(format!("{what}: {e}"))
}

/// Reads the segments and delete logs of `manifest` that `have` does not hold. When query
/// nodes hold the collection's flushed segments, the new ones are not read here: with
/// `handoff` (growing rows may hold them), the loader waits (at most [`HANDOFF_WAIT`]) until a
/// query node has each synced, so growing rows are replaced only once their flushed copy
/// answers. A shard starting from its manifest holds no growing rows yet, and its segments are
/// synced only once it is findable: it does not wait (reads wait for synced copies).
async fn load(
    ctx: &Ctx,
    shard: &Shard,
    manifest: VChannelManifest,
    revision: i64,
    have: &HashSet<u64>,
    have_deltas: &HashSet<String>,
    handoff: bool,
) -> Result<Loaded, DelegatorError> {
    let new: Vec<FlushedSegment> = manifest
        .segments
        .iter()
        .filter(|s| !have.contains(&s.segment_id))
        .cloned()
        .collect();
    let (segments, remote) = match &shard.remote {
        None => (
            walden_querynode::load::segments(&*ctx.blobs, new, &shard.pk, shard.hnsw()).await?,
            Vec::new(),
        ),
        Some(replicas) => {
            // What the coordinator places: flushed segments with rows.
            let remote: Vec<(u64, RemoteSegment)> = new
                .iter()
                .filter(|s| {
                    s.rows > 0
                        && matches!(s.state(), SegmentState::Flushed | SegmentState::Compacted)
                })
                .map(|s| {
                    (
                        s.segment_id,
                        RemoteSegment {
                            partition: s.partition.clone(),
                            rows: s.rows,
                            max_tick: s.max_tick,
                        },
                    )
                })
                .collect();
            let ids: Vec<u64> = remote.iter().map(|(id, _)| *id).collect();
            if handoff && !replicas.ready(&ids, HANDOFF_WAIT).await {
                warn!(
                    vchannel = shard.vchannel,
                    "flushed segments not synced on a query node in time; reads wait for them"
                );
            }
            (Vec::new(), remote)
        }
    };
    let logs = manifest
        .deltas
        .iter()
        .filter_map(|d| d.file.as_ref().map(|f| f.key.clone()))
        .filter(|k| !have_deltas.contains(k))
        .collect();
    let deletes = walden_querynode::load::delete_logs(&*ctx.blobs, logs).await?;
    Ok(Loaded {
        vchannel: shard.vchannel.clone(),
        revision,
        manifest,
        segments,
        remote,
        deletes,
    })
}

/// Makes `loaded` the shard's flushed data in one step: new segments in (with every known
/// delete applied), replaced ones and the growing rows they hold out.
fn install(shard: &Shard, loaded: Loaded) {
    let mut st = shard.write();
    if loaded.revision <= st.revision {
        return;
    }
    st.revision = loaded.revision;
    // Deletes read from the WAL reached every segment when read; only the new delete logs'
    // are new to the segments already held.
    let mut fresh = Deletes::new();
    for (key, d) in loaded.deletes {
        for (pk, t) in d {
            let e = st.deletes.entry(pk.clone()).or_insert(0);
            *e = (*e).max(t);
            let f = fresh.entry(pk).or_insert(0);
            *f = (*f).max(t);
        }
        st.delta_keys.insert(key);
    }
    if !fresh.is_empty() {
        for seg in st.sealed.values_mut() {
            seg.apply(&fresh);
        }
    }
    let m = &loaded.manifest;
    let mut committed: HashSet<u64> = m.segments.iter().map(|s| s.segment_id).collect();
    committed.extend(m.retired.iter().map(|r| r.segment_id));
    committed.extend(
        m.segments
            .iter()
            .flat_map(|s| s.compacted_from.iter().copied()),
    );
    let live: HashSet<u64> = m.segments.iter().map(|s| s.segment_id).collect();
    st.sealed.retain(|id, _| live.contains(id));
    st.remote.retain(|id, _| live.contains(id));
    for (id, r) in loaded.remote {
        let dropped = st
            .dropped_partitions
            .get(&r.partition)
            .is_some_and(|t| r.max_tick < *t)
            || st
                .partitions
                .as_ref()
                .is_some_and(|live| !live.contains(&r.partition));
        if !dropped {
            st.remote.insert(id, r);
        }
    }
    for mut seg in loaded.segments {
        // A dropped partition's rows stay out, even while its segments are in a manifest.
        let dropped = st
            .dropped_partitions
            .get(seg.partition())
            .is_some_and(|t| seg.max_tick() < *t)
            || st
                .partitions
                .as_ref()
                .is_some_and(|live| !live.contains(seg.partition()));
        if dropped {
            continue;
        }
        seg.apply(&st.deletes);
        st.sealed.insert(seg.id(), seg);
    }
    st.growing.retain(|id, _| !committed.contains(id));
    st.committed = committed;
    st.dropped |= m.dropped;
    debug!(
        vchannel = shard.vchannel,
        revision = st.revision,
        sealed = st.sealed.len(),
        growing = st.growing.len(),
        "flushed segments swapped in"
    );
}

/// Runs the delegator of `source` until the channel stops serving here (Ok) or something
/// fails.
pub(crate) async fn run(source: Source, ctx: Arc<Ctx>) -> Result<Exit, DelegatorError> {
    // Watch before the first read, so no commit or catalog change between the two is missed.
    let mut manifests = ctx.meta.watch(keys::MANIFESTS).await?;
    let mut catalog = ctx.meta.watch(keys::COLLECTION_PREFIX).await?;
    let mut placements = ctx.meta.watch(keys::PLACEMENT_PREFIX).await?;
    let mut f = Follower {
        source: source.clone(),
        ctx: ctx.clone(),
        shards: HashMap::new(),
        others: HashSet::new(),
    };
    let vchannels: Vec<String> = match &source {
        Source::Owner(ch) => ch
            .collections()
            .into_iter()
            .filter(|c| !c.dropped)
            .map(|c| c.vchannel)
            .collect(),
        Source::Replica { vchannels, .. } => vchannels.keys().cloned().collect(),
    };
    // None: from the first retained message.
    let mut start: Option<Option<MessageId>> = None;
    for v in &vchannels {
        let at = match f.add(v).await? {
            Start::At(at) => Some(at),
            Start::FromFirst => None,
            Start::Nothing => continue,
        };
        start = Some(match start {
            None => at,
            Some(s) => s.zip(at).map(|(a, b)| a.min(b)),
        });
    }
    let start = start.flatten();
    info!(pchannel = source.pchannel(), from = ?start, shards = f.shards.len(), replica = matches!(source, Source::Replica { .. }), "delegator started");

    let mut _scan = None;
    let mut rx = match &source {
        Source::Owner(ch) => {
            let first = ch.wal().first_id();
            let (frames, rx) = Frames::channel(4);
            _scan = Some(AbortOnDrop(tokio::spawn(scanner::scan(
                ch.clone(),
                DeliverPolicy::StartFrom(start.unwrap_or(first).max(first)),
                Filters::default(),
                frames,
            ))));
            Feed::Scan(rx)
        }
        Source::Replica {
            pchannel, reader, ..
        } => Feed::Remote(reader.read(pchannel, start)),
    };
    // One loader at a time, in manifest order.
    let (load_tx, mut load_rx) = mpsc::unbounded_channel::<(Arc<Shard>, VChannelManifest, i64)>();
    let (done_tx, mut done_rx) = mpsc::channel::<Result<Loaded, DelegatorError>>(4);
    let loader = {
        let ctx = ctx.clone();
        tokio::spawn(async move {
            while let Some((shard, m, rev)) = load_rx.recv().await {
                let (have, have_deltas) = {
                    let st = shard.read();
                    (
                        st.sealed
                            .keys()
                            .chain(st.remote.keys())
                            .copied()
                            .collect::<HashSet<u64>>(),
                        st.delta_keys.clone(),
                    )
                };
                let r = load(&ctx, &shard, m, rev, &have, &have_deltas, true).await;
                if done_tx.send(r).await.is_err() {
                    return;
                }
            }
        })
    };
    let _loader = AbortOnDrop(loader);
    loop {
        tokio::select! {
            frame = rx.recv() => match frame {
                Some(Ok(Delivery::CompleteThrough(t))) => {
                    // Caught up with an idle pchannel: nothing is left to read through `t`
                    // (every delete before it was forwarded with its batch).
                    for s in f.shards.values() {
                        s.set_served(t.0);
                    }
                }
                Some(Ok(Delivery::Messages(msgs))) => {
                    let last = msgs.last().map(|m| m.time_tick().0);
                    for m in msgs {
                        f.handle(m).await?;
                    }
                    // Deletes reach the query nodes before the served tick passes them.
                    for s in f.shards.values() {
                        if let Some(r) = &s.remote {
                            let pending = std::mem::take(&mut s.write().forward);
                            if !pending.is_empty() {
                                r.forward(s, &ctx, &pending).await;
                            }
                        }
                    }
                    for s in f.shards.values() {
                        interim_index(s, ctx.config.interim_index_rows);
                    }
                    if let Some(t) = last {
                        for s in f.shards.values() {
                            s.set_served(t);
                        }
                    }
                }
                Some(Err(e)) => {
                    if let Source::Owner(ch) = &source
                        && *ch.health().borrow() != Health::Serving
                    {
                        return Ok(Exit::Stopped);
                    }
                    return Err(e);
                }
                None => return Ok(Exit::Stopped),
            },
            event = catalog.recv() => {
                let Some(event) = event else {
                    return Err(DelegatorError::Format("the catalog watch ended".into()));
                };
                if event.kind != EventKind::Put {
                    continue;
                }
                let info = CollectionInfo::decode(event.kv.value.as_ref())
                    .map_err(|e| format("catalog record", e))?;
                let changed = f.shards.values().any(|s| {
                    s.collection_id == info.collection_id
                        && (s.released != info.released || s.indexes != info.indexes)
                });
                if changed {
                    return Ok(Exit::Restart);
                }
            }
            event = placements.recv() => {
                let Some(event) = event else {
                    return Err(DelegatorError::Format("the placement watch ended".into()));
                };
                // Query nodes took a collection's flushed segments, or gave them back.
                let placed = event.kind == EventKind::Put;
                let flipped = f.shards.values().any(|s| {
                    event.kv.key == keys::placement(s.collection_id)
                        && s.remote.is_some() != placed
                        && !s.released
                });
                if flipped {
                    return Ok(Exit::Restart);
                }
            }
            event = manifests.recv() => {
                let Some(event) = event else {
                    return Err(DelegatorError::Format("the manifest watch ended".into()));
                };
                if event.kind != EventKind::Put {
                    continue;
                }
                let Some(shard) = f.shards.values().find(|s| {
                    event.kv.key == keys::manifest(s.collection_id, &s.vchannel)
                }) else {
                    continue;
                };
                let m = VChannelManifest::decode(event.kv.value.as_ref())
                    .map_err(|e| format("manifest", e))?;
                let _ = load_tx.send((shard.clone(), m, event.kv.mod_revision));
            }
            Some(loaded) = done_rx.recv() => {
                let loaded = loaded?;
                if let Some(shard) = f.shards.get(&loaded.vchannel) {
                    install(shard, loaded);
                }
            }
        }
    }
}

/// Starts the next chunk of each growing segment's interim index that is due, off the
/// reading loop (docs/design.md §14.1).
fn interim_index(shard: &Arc<Shard>, min_rows: u32) {
    if min_rows == 0 {
        return;
    }
    let Some((field, metric, params)) = shard.hnsw() else {
        return;
    };
    let mut st = shard.write();
    for (id, seg) in &mut st.growing {
        let job = match seg.interim_job(&field, metric, &params, min_rows) {
            Ok(Some(job)) => job,
            Ok(None) => continue,
            Err(e) => {
                warn!(vchannel = shard.vchannel, segment = id, error = %e, "interim index");
                continue;
            }
        };
        let (shard, id) = (shard.clone(), *id);
        tokio::task::spawn_blocking(move || {
            let upto = job
                .run()
                .inspect_err(|e| warn!(segment = id, error = %e, "interim index chunk failed"))
                .ok();
            if let Some(seg) = shard.write().growing.get_mut(&id) {
                seg.finish_interim(job.ann(), upto);
            }
        });
    }
}

impl Follower {
    /// The collection of `vchannel`: from the node's own collection state when it serves the
    /// pchannel, else from the catalog (a replica holds only the vchannels it was given).
    async fn collection_of(
        &self,
        vchannel: &str,
    ) -> Result<Option<walden_streaming_node::shard::CollectionOf>, DelegatorError> {
        match &self.source {
            Source::Owner(ch) => Ok(ch
                .collections()
                .into_iter()
                .find(|c| c.vchannel == vchannel)),
            Source::Replica { vchannels, .. } => {
                let Some((name, id)) = vchannels.get(vchannel) else {
                    return Ok(None);
                };
                let Some(info) =
                    walden_querynode::load::catalog_record(&*self.ctx.meta, name, *id).await?
                else {
                    return Ok(None);
                };
                if !info.vchannels.iter().any(|v| v.name == vchannel) {
                    return Ok(None);
                }
                let schema = Arc::new(walden_schema::Schema::new(
                    info.schema.clone().unwrap_or_default(),
                )?);
                Ok(Some(walden_streaming_node::shard::CollectionOf {
                    vchannel: vchannel.to_owned(),
                    dropped: info.state() == walden_proto::v1::CollectionState::Dropping,
                    info,
                    schema,
                }))
            }
        }
    }

    /// Starts holding `vchannel` if it is a collection's: loads its manifest's segments and
    /// makes it findable. Returns where its reading must start.
    async fn add(&mut self, vchannel: &str) -> Result<Start, DelegatorError> {
        if self.shards.contains_key(vchannel) || self.others.contains(vchannel) {
            return Ok(Start::Nothing);
        }
        let Some(c) = self.collection_of(vchannel).await? else {
            self.others.insert(vchannel.to_owned());
            return Ok(Start::Nothing);
        };
        // Load state and indexes come from the catalog (the WAL's copy is the creation's).
        let record = walden_querynode::load::catalog_record(
            &*self.ctx.meta,
            &c.info.name,
            c.info.collection_id,
        )
        .await?;
        let (released, indexes) = record.map_or((false, Vec::new()), |r| (r.released, r.indexes));
        let placed = self
            .ctx
            .meta
            .get(&keys::placement(c.info.collection_id))
            .await?
            .is_some();
        let tail = match &self.source {
            Source::Owner(ch) => Tail::Local(ch.clone()),
            Source::Replica { reader, .. } => Tail::Owner(reader.clone()),
        };
        let shard = Arc::new(Shard::new(
            self.source.pchannel(),
            tail,
            vchannel,
            &c.info.name,
            c.info.collection_id,
            c.schema.clone(),
            crate::shard::LoadState {
                released,
                indexes,
                placed,
            },
        ));
        shard.write().partitions = Some(c.info.partitions.iter().cloned().collect());
        let mut start = Start::FromFirst;
        if released {
            start = Start::Nothing;
        } else if let Some((m, rev)) =
            walden_querynode::load::read_manifest(&*self.ctx.meta, c.info.collection_id, vchannel)
                .await?
        {
            start = Start::At(MessageId(m.checkpoint_id));
            let (no_segments, no_logs) = (HashSet::new(), HashSet::new());
            let loaded = load(&self.ctx, &shard, m, rev, &no_segments, &no_logs, false).await?;
            install(&shard, loaded);
        }
        if c.dropped {
            shard.write().dropped = true;
        }
        self.ctx
            .shards
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(vchannel.to_owned(), shard.clone());
        self.shards.insert(vchannel.to_owned(), shard);
        Ok(start)
    }

    async fn handle(&mut self, m: ImmutableMessage) -> Result<(), DelegatorError> {
        let t = m.message_type();
        if t == MessageType::TimeTick || m.vchannel().is_empty() {
            return Ok(());
        }
        let vchannel = m.vchannel().to_owned();
        if !self.shards.contains_key(&vchannel) {
            self.add(&vchannel).await?;
        }
        let Some(shard) = self.shards.get(&vchannel) else {
            return Ok(());
        };
        if shard.released {
            return Ok(());
        }
        let tick = m.time_tick().0;
        match t {
            MessageType::CreateSegment => {
                let mut st = shard.write();
                let id = m.header.segment_id;
                if !st.committed.contains(&id) {
                    st.growing
                        .entry(id)
                        .or_insert_with(|| Segment::new(id, &m.header.partition, &shard.pk));
                }
            }
            MessageType::Insert | MessageType::Upsert | MessageType::Delete => {
                dml(shard, &m, tick)?;
            }
            MessageType::Txn => {
                let bodies = m
                    .txn_messages()
                    .map_err(|e| format("transaction payload", e))?;
                for body in bodies {
                    if matches!(
                        body.message_type(),
                        MessageType::Insert | MessageType::Upsert | MessageType::Delete
                    ) {
                        // A transaction's rows and deletes take effect at its commit.
                        dml(shard, &body, tick)?;
                    }
                }
            }
            MessageType::DropPartition => {
                let mut st = shard.write();
                let p = m.header.partition.clone();
                st.growing.retain(|_, s| s.partition() != p);
                st.sealed
                    .retain(|_, s| s.partition() != p || s.max_tick() >= tick);
                st.remote
                    .retain(|_, r| r.partition != p || r.max_tick >= tick);
                st.dropped_partitions.insert(p, tick);
            }
            MessageType::CreatePartition => {
                let mut st = shard.write();
                if let Some(live) = st.partitions.as_mut() {
                    live.insert(m.header.partition.clone());
                }
            }
            MessageType::DropCollection => {
                let mut st = shard.write();
                st.dropped = true;
                st.growing.clear();
                st.sealed.clear();
                st.remote.clear();
                st.deletes.clear();
            }
            _ => {}
        }
        Ok(())
    }
}

fn dml(shard: &Shard, m: &ImmutableMessage, tick: u64) -> Result<(), DelegatorError> {
    let t = m.message_type();
    let mut st = shard.write();
    if st.dropped {
        return Ok(());
    }
    let remote = shard.remote.is_some();
    let delete = |st: &mut crate::shard::State, keys: Vec<Pk>| {
        for k in keys {
            for seg in st.growing.values_mut().chain(st.sealed.values_mut()) {
                seg.delete(&k, tick);
            }
            if remote {
                st.forward.push((k.clone(), tick));
            }
            let e = st.deletes.entry(k).or_insert(0);
            *e = (*e).max(tick);
        }
    };
    match t {
        MessageType::Delete => {
            let ids =
                DeleteIds::decode(m.payload.as_ref()).map_err(|e| format("delete payload", e))?;
            delete(&mut st, files::delete_keys(&ids).collect());
        }
        MessageType::Insert | MessageType::Upsert => {
            let batches = walden_schema::decode_ipc(&m.payload)?;
            if t == MessageType::Upsert {
                let mut keys = Vec::new();
                for b in &batches {
                    keys.extend(files::keys_of(b, &shard.pk)?);
                }
                delete(&mut st, keys);
            }
            let id = m.header.segment_id;
            if st.committed.contains(&id) {
                return Ok(());
            }
            let st = &mut *st;
            let seg = st
                .growing
                .entry(id)
                .or_insert_with(|| Segment::new(id, &m.header.partition, &shard.pk));
            for b in &batches {
                let b = files::data_batch(&shard.schema, &shard.data_schema, b, tick)?;
                seg.append(b, &st.deletes)?;
            }
        }
        _ => {}
    }
    Ok(())
}
