//! One pchannel's flusher: reads the pchannel like any consumer (never on the append path),
//! holds the rows of its growing segments and its deletes, and at each Flush writes the sealed
//! segments' rows and the buffered deletes as Parquet, then commits them to the vchannel's
//! manifest. Between reads it saves flushed-through positions, truncates the WAL behind them,
//! deletes unreferenced files and compacts.
//!
//! After a restart or a move it starts again from the manifests: it re-reads from the lowest
//! flushed-through position, skips segments the manifest holds and deletes at or below its
//! delete tick, and so flushes every row exactly once.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;
use bytes::Bytes;
use prost::Message as _;
use tracing::{debug, info};
use walden_common::{MessageId, TimeTick};
use walden_message::{ImmutableMessage, MessageType};
use walden_metastore_api::MetaStore;
use walden_object_store::Blobs;
use walden_proto::v1::{
    DeleteIds, DeltaLog, FileKind, FlushInfo, FlushedSegment, SegmentFile, SegmentInfo,
    SegmentState, VChannelManifest,
};
use walden_schema::Schema;
use walden_streaming_node::{
    NodeError,
    channel::{Channel, Health},
    scanner::{self, DeliverPolicy, Filters, Frames},
};
use walden_tso::now_ms;

use crate::{
    FlushConfig, FlushError, Metrics, RetentionConfig,
    files::{self, Pk},
    manifest::{self, Stored},
    retention::Samples,
};

/// What every pchannel's flusher shares.
#[derive(Debug)]
pub(crate) struct Ctx {
    pub meta: Arc<dyn MetaStore>,
    pub blobs: Arc<dyn Blobs>,
    pub config: FlushConfig,
    pub retention: RetentionConfig,
    pub metrics: Metrics,
}

/// What the flusher knows of its vchannels, for [`crate::service`]: the committed manifest
/// and the segments it holds.
#[derive(Debug, Default)]
pub(crate) struct View {
    pub vchannels: Mutex<HashMap<String, (VChannelManifest, Vec<SegmentInfo>)>>,
}

/// Where objects of a vchannel live: `segments/{collection_id}/{vchannel}/`.
pub fn vchannel_prefix(collection_id: u64, vchannel: &str) -> String {
    format!("segments/{collection_id:020}/{vchannel}/")
}

/// Rows of one segment the flusher holds (growing, or sealed and being written).
#[derive(Debug)]
pub(crate) struct Pending {
    pub(crate) partition: String,
    pub(crate) create_id: MessageId,
    /// Re-reading from here sees every row of the segment (transactions included).
    pub(crate) start_lc: MessageId,
    pub(crate) rows: u64,
    pub(crate) batches: Vec<RecordBatch>,
    pub(crate) min_tick: u64,
    pub(crate) max_tick: u64,
    /// The tick of the Flush that sealed it.
    pub(crate) sealed: Option<TimeTick>,
}

#[derive(Debug)]
pub(crate) struct VState {
    pub(crate) schema: Arc<Schema>,
    pub(crate) data_schema: SchemaRef,
    pub(crate) delta_schema: SchemaRef,
    pub(crate) pk: String,
    pub(crate) stored: Stored,
    pub(crate) pending: BTreeMap<u64, Pending>,
    pub(crate) deletes: Vec<(Pk, u64)>,
    pub(crate) deletes_lc: Option<MessageId>,
    pub(crate) deletes_since: Option<Instant>,
    pub(crate) last_checkpoint: Option<Instant>,
}

impl VState {
    pub(crate) fn dropped(&self) -> bool {
        self.stored.manifest.dropped
    }

    /// Whether the manifest already holds segment `id` (flushed, or replaced by compaction).
    fn committed(&self, id: u64) -> bool {
        let m = &self.stored.manifest;
        m.segments.iter().any(|s| s.segment_id == id)
            || m.retired.iter().any(|r| r.segment_id == id)
    }

    /// The flushed-through position: re-reading from it sees every row and delete not yet in
    /// the files.
    fn checkpoint(&self, position: MessageId) -> MessageId {
        self.pending
            .values()
            .map(|p| p.start_lc)
            .chain(self.deletes_lc)
            .fold(position, MessageId::min)
    }

    fn infos(&self, vchannel: &str) -> Vec<SegmentInfo> {
        self.pending
            .iter()
            .map(|(id, p)| SegmentInfo {
                segment_id: *id,
                vchannel: vchannel.to_owned(),
                partition: p.partition.clone(),
                state: if p.sealed.is_some() {
                    SegmentState::Sealed
                } else {
                    SegmentState::Growing
                } as i32,
                rows: p.rows,
                ..Default::default()
            })
            .collect()
    }
}

pub(crate) struct Flusher {
    pub(crate) ch: Arc<Channel>,
    pub(crate) ctx: Arc<Ctx>,
    pub(crate) view: Arc<View>,
    pub(crate) vchannels: BTreeMap<String, VState>,
    /// Vchannels that are not a collection's (or whose collection is unknown here).
    pub(crate) others: HashSet<String>,
    /// The last-confirmed id of the last message read: nothing below it is needed again by
    /// what was read so far.
    pub(crate) position: MessageId,
    pub(crate) samples: Samples,
    pub(crate) unreferenced: HashMap<String, Instant>,
    pub(crate) last_gc: Option<Instant>,
    pub(crate) last_compaction: Instant,
    pub(crate) last_checkpoint_request: Option<Instant>,
}

impl std::fmt::Debug for Flusher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Flusher")
            .field("pchannel", &self.ch.name())
            .field("position", &self.position)
            .finish()
    }
}

/// Runs the flusher of `ch` until the channel stops serving (Ok) or something fails.
pub(crate) async fn run(
    ch: Arc<Channel>,
    ctx: Arc<Ctx>,
    view: Arc<View>,
) -> Result<(), FlushError> {
    let mut f = Flusher::start(ch.clone(), ctx, view).await?;
    info!(pchannel = ch.name(), from = %f.position, "flusher started");
    let (frames, mut rx) = Frames::channel(4);
    let scan = tokio::spawn(scanner::scan(
        ch.clone(),
        DeliverPolicy::StartFrom(f.position),
        Filters::default(),
        frames,
    ));
    let _scan = walden_streaming_node::per_channel::AbortOnDrop(scan);
    let mut tick = tokio::time::interval(Duration::from_millis(
        f.ctx.config.checkpoint_interval_ms.min(1_000),
    ));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            frame = rx.recv() => match frame {
                Some(Ok(walden_message::Delivery::Messages(msgs))) => {
                    for m in msgs {
                        f.handle(m).await?;
                    }
                }
                // Idle TimeTicks: a flush waits for stored messages only.
                Some(Ok(walden_message::Delivery::CompleteThrough(_))) => {}
                Some(Err(e)) => {
                    if *ch.health().borrow() != Health::Serving {
                        return Ok(());
                    }
                    return Err(e.into());
                }
                None => return Ok(()),
            },
            _ = tick.tick() => f.housekeeping().await?,
        }
    }
}

impl Flusher {
    async fn start(ch: Arc<Channel>, ctx: Arc<Ctx>, view: Arc<View>) -> Result<Self, FlushError> {
        let first = ch.wal().first_id();
        let mut f = Self {
            ch,
            ctx,
            view,
            vchannels: BTreeMap::new(),
            others: HashSet::new(),
            position: first,
            samples: Samples::default(),
            unreferenced: HashMap::new(),
            last_gc: None,
            last_compaction: Instant::now(),
            last_checkpoint_request: None,
        };
        f.view
            .vchannels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        // Start where the least flushed vchannel is; one never flushed is read from the start
        // of the log (the WAL is truncated only once every live vchannel has a manifest).
        let mut start: Option<MessageId> = None;
        for c in f.ch.collections() {
            if c.dropped {
                continue;
            }
            f.load(&c.vchannel).await?;
            if let Some(v) = f.vchannels.get(&c.vchannel)
                && !v.dropped()
            {
                let at = if v.stored.exists() {
                    MessageId(v.stored.manifest.checkpoint_id)
                } else {
                    first
                };
                start = Some(start.map_or(at, |s| s.min(at)));
            }
        }
        let start = start.unwrap_or(first);
        if start < first {
            // Truncation never passes a vchannel's checkpoint; this is damage, not a race.
            return Err(FlushError::Format(format!(
                "{}: a manifest's flushed-through position {start} is below the log's start \
                 {first}",
                f.ch.name()
            )));
        }
        f.position = start;
        f.publish_all();
        Ok(f)
    }

    /// Makes the state of `vchannel` known: its collection (from the channel's state) and
    /// its manifest. A vchannel without a collection is remembered as such.
    async fn load(&mut self, vchannel: &str) -> Result<(), FlushError> {
        if self.vchannels.contains_key(vchannel) || self.others.contains(vchannel) {
            return Ok(());
        }
        let Some(c) = self
            .ch
            .collections()
            .into_iter()
            .find(|c| c.vchannel == vchannel)
        else {
            self.others.insert(vchannel.to_owned());
            return Ok(());
        };
        let mut stored =
            manifest::load(self.ctx.meta.as_ref(), c.info.collection_id, vchannel).await?;
        if !stored.exists() {
            stored.manifest = VChannelManifest {
                collection_id: c.info.collection_id,
                vchannel: vchannel.to_owned(),
                pchannel: self.ch.name().to_owned(),
                ..Default::default()
            };
        }
        let pk = c.schema.primary_key().name.clone();
        self.vchannels.insert(
            vchannel.to_owned(),
            VState {
                data_schema: files::data_schema(&c.schema),
                delta_schema: files::delta_schema(&c.schema),
                schema: c.schema,
                pk,
                stored,
                pending: BTreeMap::new(),
                deletes: Vec::new(),
                deletes_lc: None,
                deletes_since: None,
                last_checkpoint: None,
            },
        );
        Ok(())
    }

    async fn handle(&mut self, m: ImmutableMessage) -> Result<(), FlushError> {
        self.samples
            .read(m.id, m.time_tick(), m.payload.len() as u64 + 64);
        self.position = self.position.max(m.last_confirmed().min(m.id));
        let t = m.message_type();
        if t == MessageType::TimeTick || m.vchannel().is_empty() {
            return Ok(());
        }
        let vchannel = m.vchannel().to_owned();
        self.load(&vchannel).await?;
        let Some(v) = self.vchannels.get_mut(&vchannel) else {
            return Ok(());
        };
        if v.dropped() {
            return Ok(());
        }
        let tick = m.time_tick();
        let lc = m.last_confirmed();
        match t {
            MessageType::CreateSegment => {
                let id = m.header.segment_id;
                if !v.committed(id) {
                    v.pending.entry(id).or_insert_with(|| Pending {
                        partition: m.header.partition.clone(),
                        create_id: m.id,
                        start_lc: lc.min(m.id),
                        rows: 0,
                        batches: Vec::new(),
                        min_tick: u64::MAX,
                        max_tick: 0,
                        sealed: None,
                    });
                }
            }
            MessageType::Insert | MessageType::Upsert | MessageType::Delete => {
                dml(v, &m, tick, lc)?;
            }
            MessageType::Txn => {
                for body in m.txn_messages().map_err(NodeError::from)? {
                    if matches!(
                        body.message_type(),
                        MessageType::Insert | MessageType::Upsert | MessageType::Delete
                    ) {
                        // A transaction's rows and deletes take effect at its commit.
                        dml(v, &body, tick, lc)?;
                    }
                }
            }
            MessageType::Flush => {
                let info = FlushInfo::decode(m.payload.as_ref())
                    .map_err(|e| FlushError::Format(format!("flush payload: {e}")))?;
                for id in info.segment_ids {
                    if let Some(p) = v.pending.get_mut(&id) {
                        p.sealed = Some(tick);
                    }
                }
                self.flush(&vchannel, Some(tick)).await?;
            }
            MessageType::DropCollection => {
                v.pending.clear();
                v.deletes.clear();
                v.deletes_lc = None;
                let mut next = v.stored.manifest.clone();
                next.dropped = true;
                let ch = self.ch.name().to_owned();
                let term = self.ch.term().0;
                manifest::commit(self.ctx.meta.as_ref(), &ch, term, &mut v.stored, next).await?;
                self.publish(&vchannel);
            }
            _ => {}
        }
        Ok(())
    }

    /// Writes the sealed segments of `vchannel` and its buffered deletes, and commits them.
    /// `flush_tick`: the Flush being handled (None: deletes only, by age or count).
    async fn flush(
        &mut self,
        vchannel: &str,
        flush_tick: Option<TimeTick>,
    ) -> Result<(), FlushError> {
        let Some(v) = self.vchannels.get_mut(vchannel) else {
            return Ok(());
        };
        let ctx = self.ctx.clone();
        let _busy = crate::metrics::InProgress::new(&ctx.metrics.flushes_in_progress);
        let blobs = ctx.blobs.as_ref();
        let prefix = vchannel_prefix(v.stored.manifest.collection_id, vchannel);
        let sealed: Vec<u64> = v
            .pending
            .iter()
            .filter(|(_, p)| p.sealed.is_some())
            .map(|(id, _)| *id)
            .collect();
        let mut next = v.stored.manifest.clone();
        let (mut bytes, mut rows) = (0u64, 0u64);
        for id in &sealed {
            let p = &v.pending[id];
            if p.rows == 0 {
                continue;
            }
            let segment_files = write_data_files(
                blobs,
                &format!("{prefix}{id:020}/"),
                &v.data_schema,
                p.batches.clone(),
                ctx.config.max_file_bytes,
            )
            .await?;
            bytes += segment_files.iter().map(|f| f.bytes).sum::<u64>();
            rows += p.rows;
            next.segments.push(FlushedSegment {
                segment_id: *id,
                partition: p.partition.clone(),
                state: SegmentState::Flushed as i32,
                rows: p.rows,
                deleted_rows: 0,
                files: segment_files,
                min_tick: p.min_tick,
                max_tick: p.max_tick,
                compacted_from: Vec::new(),
                create_id: p.create_id.0,
            });
        }
        let deletes = v.deletes.len() as u64;
        if !v.deletes.is_empty() {
            let min_tick = v.deletes.iter().map(|d| d.1).min().unwrap_or(0);
            let max_tick = v.deletes.iter().map(|d| d.1).max().unwrap_or(0);
            let batch = files::delta_batch(&v.delta_schema, &v.deletes)?;
            let data = encode(v.delta_schema.clone(), vec![batch]).await?;
            let key = format!(
                "{prefix}delta/{max_tick:020}-{:016x}.parquet",
                rand::random::<u64>()
            );
            let size = data.len() as u64;
            blobs.put_if_absent(&key, data).await?;
            bytes += size;
            next.deltas.push(DeltaLog {
                id: max_tick,
                file: Some(SegmentFile {
                    key,
                    kind: FileKind::Delta as i32,
                    rows: deletes,
                    bytes: size,
                    url: String::new(),
                }),
                min_tick,
                max_tick,
            });
            next.delete_tick = next.delete_tick.max(max_tick);
        }
        if let Some(t) = flush_tick {
            next.flushed_tick = next.flushed_tick.max(t.0);
        }
        // The position after the commit: without what it writes.
        let position = self.position;
        let cp = v
            .pending
            .iter()
            .filter(|(id, _)| !sealed.contains(id))
            .map(|(_, p)| p.start_lc)
            .fold(position, MessageId::min);
        next.checkpoint_id = next.checkpoint_id.max(cp.0);
        let pchannel = self.ch.name().to_owned();
        manifest::commit(
            ctx.meta.as_ref(),
            &pchannel,
            self.ch.term().0,
            &mut v.stored,
            next,
        )
        .await?;
        v.last_checkpoint = Some(Instant::now());
        let now = now_ms();
        for id in &sealed {
            if let Some(p) = v.pending.remove(id)
                && let Some(t) = p.sealed
            {
                ctx.metrics
                    .flush_latency
                    .observe(now.saturating_sub(t.physical_ms()) as f64 / 1000.0);
            }
        }
        v.deletes.clear();
        v.deletes_lc = None;
        v.deletes_since = None;
        ctx.metrics.flush_bytes.inc_by(bytes);
        ctx.metrics.flush_rows.inc_by(rows);
        ctx.metrics.flush_deletes.inc_by(deletes);
        if rows > 0 || deletes > 0 {
            debug!(%vchannel, segments = sealed.len(), rows, deletes, bytes, "flushed");
        }
        self.publish(vchannel);
        Ok(())
    }

    async fn housekeeping(&mut self) -> Result<(), FlushError> {
        let config = self.ctx.config.clone();
        // Deletes that waited long enough, or too many of them.
        let due: Vec<String> = self
            .vchannels
            .iter()
            .filter(|(_, v)| {
                !v.dropped()
                    && (v.deletes.len() >= config.delete_max_rows
                        || v.deletes_since.is_some_and(|s| {
                            s.elapsed() >= Duration::from_millis(config.delete_max_age_ms)
                        }))
            })
            .map(|(n, _)| n.clone())
            .collect();
        for vchannel in due {
            self.flush(&vchannel, None).await?;
        }
        self.save_checkpoints().await?;
        self.truncate().await?;
        self.report_lag();
        // Growing segments' row counts move with every insert: shown as of this round (the
        // manifests are republished only when they change).
        self.publish_held();
        if self
            .last_gc
            .is_none_or(|t| t.elapsed() >= Duration::from_millis(config.gc_interval_ms))
        {
            self.last_gc = Some(Instant::now());
            self.collect_garbage().await?;
        }
        if config.compaction.enabled
            && self.last_compaction.elapsed()
                >= Duration::from_millis(config.compaction.interval_ms)
        {
            self.last_compaction = Instant::now();
            let names: Vec<String> = self.vchannels.keys().cloned().collect();
            for vchannel in names {
                match self.compact(&vchannel).await {
                    Ok(false) => {}
                    Ok(true) => self
                        .ctx
                        .metrics
                        .compactions
                        .with_label_values(&["ok"])
                        .inc(),
                    Err(e) => {
                        self.ctx
                            .metrics
                            .compactions
                            .with_label_values(&["error"])
                            .inc();
                        return Err(e);
                    }
                }
            }
        }
        Ok(())
    }

    /// Saves each vchannel's flushed-through position that moved, at most once per
    /// `flush.checkpoint_interval_ms` (a manifest that does not exist yet at once).
    async fn save_checkpoints(&mut self) -> Result<(), FlushError> {
        let interval = self.ctx.config.checkpoint_interval();
        let position = self.position;
        let pchannel = self.ch.name().to_owned();
        let term = self.ch.term().0;
        let mut changed = Vec::new();
        for (name, v) in &mut self.vchannels {
            if v.dropped() {
                continue;
            }
            let cp = v.checkpoint(position).0;
            let moved = cp > v.stored.manifest.checkpoint_id
                && v.last_checkpoint.is_none_or(|t| t.elapsed() >= interval);
            if v.stored.exists() && !moved {
                continue;
            }
            let mut next = v.stored.manifest.clone();
            next.checkpoint_id = next.checkpoint_id.max(cp);
            // A retired segment whose CreateSegment is below the position can no longer be
            // met by a re-read.
            next.retired.retain(|r| r.create_id >= next.checkpoint_id);
            manifest::commit(self.ctx.meta.as_ref(), &pchannel, term, &mut v.stored, next).await?;
            v.last_checkpoint = Some(Instant::now());
            changed.push(name.clone());
        }
        for name in changed {
            self.publish(&name);
        }
        Ok(())
    }

    /// Truncates the WAL below the lowest saved flushed-through position of the live
    /// vchannels, the last durable checkpoint of the pchannel and the retention floor.
    async fn truncate(&mut self) -> Result<(), FlushError> {
        let wal = self.ch.wal().clone();
        let first = wal.first_id();
        let mut point = self.position;
        for v in self.vchannels.values().filter(|v| !v.dropped()) {
            if !v.stored.exists() {
                return Ok(());
            }
            point = point.min(MessageId(v.stored.manifest.checkpoint_id));
        }
        // A live vchannel the flusher has not met yet (created after the last message read).
        for c in self.ch.collections() {
            if !c.dropped && !self.vchannels.contains_key(&c.vchannel) {
                return Ok(());
            }
        }
        point = point.min(self.samples.floor(self.ctx.retention, now_ms(), first));
        if point <= first {
            self.report_wal(first);
            return Ok(());
        }
        if self.ch.durable_checkpoint_id() < point
            && self
                .last_checkpoint_request
                .is_none_or(|t| t.elapsed() >= self.ctx.config.checkpoint_interval() * 5)
        {
            // The replay must start at or above the log's start: make the checkpoint that
            // holds truncation back durable (at most every 5 checkpoint intervals: each is an
            // fsync of the metastore).
            self.last_checkpoint_request = Some(Instant::now());
            if let Err(e) = self.ch.checkpoint().await {
                debug!(pchannel = self.ch.name(), error = %e, "checkpoint for truncation");
            }
        }
        let point = point.min(self.ch.durable_checkpoint_id());
        if point > first {
            wal.truncate(point).await.map_err(NodeError::from)?;
            self.samples.forget_below(point);
            debug!(pchannel = self.ch.name(), below = %point, "WAL truncated");
        }
        self.report_wal(wal.first_id());
        Ok(())
    }

    fn report_wal(&self, first: MessageId) {
        let name = self.ch.name();
        let m = &self.ctx.metrics;
        m.truncation_point
            .with_label_values(&[name])
            .set(first.0 as i64);
        m.wal_bytes
            .with_label_values(&[name])
            .set(self.ch.wal().size_bytes() as i64);
    }

    /// The flush lag: the age of the oldest sealed segment not yet committed, or, while the
    /// flusher has not read up to the log's end (a Flush it has not met yet), the age of the
    /// last message it read.
    fn report_lag(&self) {
        let oldest_sealed = self
            .vchannels
            .values()
            .flat_map(|v| v.pending.values().filter_map(|p| p.sealed))
            .map(|t| t.physical_ms())
            .min();
        let reading = self
            .samples
            .end()
            .filter(|(next, _)| *next < self.ch.wal().durable_end())
            .map(|(_, t)| t.physical_ms());
        let now = now_ms();
        let lag = oldest_sealed
            .into_iter()
            .chain(reading)
            .map(|t| now.saturating_sub(t))
            .max()
            .unwrap_or(0);
        self.ch.set_flush_lag_ms(lag);
        self.ctx
            .metrics
            .flush_lag_ms
            .with_label_values(&[self.ch.name()])
            .set(lag as i64);
    }

    /// Deletes files under each vchannel's prefix that its manifest does not name and that
    /// were seen so for `flush.gc_grace_ms`. Runs between this flusher's own writes, so none
    /// of its uploads is in flight.
    async fn collect_garbage(&mut self) -> Result<(), FlushError> {
        let grace = Duration::from_millis(self.ctx.config.gc_grace_ms);
        let mut seen = HashSet::new();
        for (name, v) in &self.vchannels {
            let m = &v.stored.manifest;
            let referenced: HashSet<&str> = m
                .segments
                .iter()
                .flat_map(|s| s.files.iter())
                .chain(m.deltas.iter().filter_map(|d| d.file.as_ref()))
                .map(|f| f.key.as_str())
                .collect();
            for o in self
                .ctx
                .blobs
                .list(&vchannel_prefix(m.collection_id, name))
                .await?
            {
                if referenced.contains(o.key.as_str()) || v.dropped() {
                    continue;
                }
                seen.insert(o.key.clone());
                let since = *self
                    .unreferenced
                    .entry(o.key.clone())
                    .or_insert_with(Instant::now);
                if since.elapsed() >= grace {
                    self.ctx.blobs.delete(&o.key).await?;
                    self.ctx.metrics.files_deleted.inc();
                    seen.remove(&o.key);
                    info!(key = %o.key, "deleted a file no manifest names");
                }
            }
        }
        self.unreferenced.retain(|k, _| seen.contains(k));
        Ok(())
    }

    pub(crate) fn publish(&self, vchannel: &str) {
        if let Some(v) = self.vchannels.get(vchannel) {
            self.view
                .vchannels
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(
                    vchannel.to_owned(),
                    (v.stored.manifest.clone(), v.infos(vchannel)),
                );
        }
    }

    /// Republishes what each vchannel holds, keeping the published manifest.
    fn publish_held(&self) {
        let mut view = self
            .view
            .vchannels
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for (name, v) in &self.vchannels {
            match view.get_mut(name) {
                Some(entry) => entry.1 = v.infos(name),
                None => {
                    view.insert(name.clone(), (v.stored.manifest.clone(), v.infos(name)));
                }
            }
        }
    }

    fn publish_all(&self) {
        for name in self.vchannels.keys() {
            self.publish(name);
        }
    }
}

/// Takes an insert, upsert or delete into `v`'s buffers, at `tick` (a transaction's commit
/// tick for its body) with re-read position `lc`.
fn dml(
    v: &mut VState,
    m: &ImmutableMessage,
    tick: TimeTick,
    lc: MessageId,
) -> Result<(), FlushError> {
    let t = m.message_type();
    let delete_tick = v.stored.manifest.delete_tick;
    let add_deletes = |v: &mut VState, keys: Vec<Pk>| {
        if tick.0 <= delete_tick || keys.is_empty() {
            return;
        }
        v.deletes.extend(keys.into_iter().map(|k| (k, tick.0)));
        let lc = lc.min(m.id);
        v.deletes_lc = Some(v.deletes_lc.map_or(lc, |d| d.min(lc)));
        v.deletes_since.get_or_insert_with(Instant::now);
    };
    match t {
        MessageType::Delete => {
            let ids = DeleteIds::decode(m.payload.as_ref())
                .map_err(|e| FlushError::Format(format!("delete payload: {e}")))?;
            add_deletes(v, files::delete_keys(&ids).collect());
        }
        MessageType::Insert | MessageType::Upsert => {
            let batches = walden_schema::decode_ipc(&m.payload)?;
            if t == MessageType::Upsert {
                let mut keys = Vec::new();
                for b in &batches {
                    keys.extend(files::keys_of(b, &v.pk)?);
                }
                add_deletes(v, keys);
            }
            let seg = m.header.segment_id;
            let (schema, target) = (v.schema.clone(), v.data_schema.clone());
            if let Some(p) = v.pending.get_mut(&seg) {
                for b in &batches {
                    let b = files::data_batch(&schema, &target, b, tick.0)?;
                    p.rows += b.num_rows() as u64;
                    p.batches.push(b);
                }
                p.min_tick = p.min_tick.min(tick.0);
                p.max_tick = p.max_tick.max(tick.0);
            }
        }
        _ => {}
    }
    Ok(())
}

/// Writes `batches` as data files under `dir` (one per `max_bytes` of rows), each with
/// create-if-absent under a key no other write uses.
pub(crate) async fn write_data_files(
    blobs: &dyn Blobs,
    dir: &str,
    schema: &SchemaRef,
    batches: Vec<RecordBatch>,
    max_bytes: u64,
) -> Result<Vec<SegmentFile>, FlushError> {
    let mut out = Vec::new();
    for (n, group) in files::split(batches, max_bytes).into_iter().enumerate() {
        let rows = group.iter().map(|b| b.num_rows() as u64).sum();
        let data = encode(schema.clone(), group).await?;
        let key = format!("{dir}data-{n:04}-{:016x}.parquet", rand::random::<u64>());
        let bytes = data.len() as u64;
        blobs.put_if_absent(&key, data).await?;
        out.push(SegmentFile {
            key,
            kind: FileKind::Data as i32,
            rows,
            bytes,
            url: String::new(),
        });
    }
    Ok(out)
}

/// Encodes a Parquet file off the async workers: a segment takes a few hundred ms, and the
/// node's appends and acknowledgements share those workers (one, on two cores).
async fn encode(schema: SchemaRef, batches: Vec<RecordBatch>) -> Result<Bytes, FlushError> {
    tokio::task::spawn_blocking(move || files::encode(&schema, &batches))
        .await
        .map_err(|e| FlushError::Format(format!("encoding task: {e}")))?
        .map_err(FlushError::from)
}

/// Reads every batch of `files`.
pub(crate) async fn read_files(
    blobs: &dyn Blobs,
    files: &[SegmentFile],
) -> Result<Vec<RecordBatch>, FlushError> {
    let mut out = Vec::new();
    for f in files {
        let bytes: Bytes = blobs.get(&f.key).await?;
        let batches = tokio::task::spawn_blocking(move || files::decode(bytes))
            .await
            .map_err(|e| FlushError::Format(format!("decoding task: {e}")))??;
        out.extend(batches);
    }
    Ok(out)
}
