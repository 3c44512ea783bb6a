//! The collection state of one pchannel: its vchannels (collection shards), their partitions and
//! growing segments, and the rules every collection message must follow.
//!
//! The state is a pure function of the log: [`Shards::apply`] folds one stored message into it,
//! and is used both on the append path (right after a message is enqueued) and when replaying
//! the WAL at open. [`Shards::admit`] checks a message against the state before it is given a
//! tick. Both run under the channel's append lock, so the state a message is checked against is
//! exactly the state left by every message before it in tick order. This is why an exclusive
//! message (DDL, flush) needs no extra lock: DML checked before it is already enqueued before it,
//! and DML after it is checked against its effect.
//!
//! Invariants enforced per vchannel:
//! * `CreateCollection` comes first and at most once; nothing follows `DropCollection`;
//! * DML names an existing partition; nothing is written into a dropped one;
//! * `CreateSegment(s)` precedes every insert into `s`, and no insert follows the `Flush` of `s`.
//!   The node writes both itself: clients never name new segments.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use bytes::Bytes;
use prost::Message as _;
use walden_common::TimeTick;
use walden_message::{DEFAULT_PARTITION, MessageHeader, MessageType, MutableMessage};
use walden_proto::v1::{
    CollectionInfo, DeleteIds, FlushInfo, PChannelCheckpoint, SegmentMeta, VChannelMeta,
};
use walden_schema::Schema;

use crate::{NodeConfig, NodeError};

/// Why a segment is sealed (written into its Flush message).
pub mod reason {
    pub const MANUAL: &str = "manual";
    pub const ROWS: &str = "rows";
    pub const SIZE: &str = "size";
    pub const IDLE: &str = "idle";
    pub const LIFETIME: &str = "lifetime";
    pub const MEMORY: &str = "memory";
}

#[derive(Clone, Debug)]
struct VChannel {
    info: CollectionInfo,
    schema: Arc<Schema>,
    partitions: BTreeSet<String>,
    dropped: bool,
    sealed: BTreeSet<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Segment {
    vchannel: String,
    partition: String,
    rows: u64,
    bytes: u64,
    created: TimeTick,
    last_write: TimeTick,
}

/// One vchannel's collection, as [`Shards::collections`] reports it.
#[derive(Clone, Debug)]
pub struct CollectionOf {
    pub vchannel: String,
    pub info: CollectionInfo,
    pub schema: Arc<Schema>,
    pub dropped: bool,
}

/// Seal limits, from the node's configuration.
#[derive(Clone, Copy, Debug)]
pub struct SealPolicy {
    pub max_rows: u64,
    pub max_bytes: u64,
    pub idle_ms: u64,
    pub max_lifetime_ms: u64,
}

impl SealPolicy {
    pub fn from_config(c: &NodeConfig) -> Self {
        Self {
            max_rows: c.segment_max_rows,
            max_bytes: c.segment_max_bytes,
            idle_ms: c.segment_idle_ms,
            max_lifetime_ms: c.segment_max_lifetime_ms,
        }
    }
}

/// What the schema check outside the lock found; re-checked under the lock.
#[derive(Clone, Debug)]
pub struct Checked {
    pub collection_id: u64,
    pub rows: u64,
}

/// The collection state of one pchannel.
#[derive(Clone, Debug)]
pub struct Shards {
    vchannels: HashMap<String, VChannel>,
    segments: BTreeMap<u64, Segment>,
    policy: SealPolicy,
    growing_bytes: u64,
}

fn not_found(vchannel: &str) -> NodeError {
    NodeError::CollectionNotFound(format!(
        "vchannel {vchannel:?} has no collection (CreateCollection was not written to it)"
    ))
}

fn decode<M: prost::Message + Default>(what: &str, payload: &[u8]) -> Result<M, NodeError> {
    M::decode(payload).map_err(|e| NodeError::InvalidArgument(format!("{what} payload: {e}")))
}

impl Shards {
    pub fn new(policy: SealPolicy) -> Self {
        Self {
            vchannels: HashMap::new(),
            segments: BTreeMap::new(),
            policy,
            growing_bytes: 0,
        }
    }

    /// Payload bytes in this pchannel's growing segments.
    pub fn growing_bytes(&self) -> u64 {
        self.growing_bytes
    }

    /// Every vchannel that received a CreateCollection: its catalog record, schema, and
    /// whether it was dropped since. The flusher reads schemas here (it may start reading the
    /// log after the CreateCollection).
    pub fn collections(&self) -> Vec<CollectionOf> {
        self.vchannels
            .iter()
            .map(|(name, vc)| CollectionOf {
                vchannel: name.clone(),
                info: vc.info.clone(),
                schema: vc.schema.clone(),
                dropped: vc.dropped,
            })
            .collect()
    }

    /// Number of growing segments.
    pub fn growing_segments(&self) -> usize {
        self.segments.len()
    }

    /// The schema of a live vchannel, for checking payloads outside the append lock.
    pub fn schema(&self, vchannel: &str) -> Result<(u64, Arc<Schema>), NodeError> {
        let vc = self.live(vchannel)?;
        Ok((vc.info.collection_id, vc.schema.clone()))
    }

    fn live(&self, vchannel: &str) -> Result<&VChannel, NodeError> {
        match self.vchannels.get(vchannel) {
            None => Err(not_found(vchannel)),
            Some(vc) if vc.dropped => Err(NodeError::CollectionDropped(format!(
                "collection {:?} (vchannel {vchannel:?}) was dropped",
                vc.info.name
            ))),
            Some(vc) => Ok(vc),
        }
    }

    fn growing_of(&self, vchannel: &str, partition: &str) -> Option<(u64, &Segment)> {
        self.segments
            .iter()
            .find(|(_, s)| s.vchannel == vchannel && s.partition == partition)
            .map(|(id, s)| (*id, s))
    }

    fn is_full(&self, s: &Segment) -> Option<&'static str> {
        if s.rows >= self.policy.max_rows {
            Some(reason::ROWS)
        } else if s.bytes >= self.policy.max_bytes {
            Some(reason::SIZE)
        } else {
            None
        }
    }

    /// Checks `msg` against the state and fills in what the node decides (collection id,
    /// segment, flush contents). Returns the messages the node must write first (a
    /// `CreateSegment` for an insert with no growing segment). `checked` is the result of the
    /// payload check made outside the lock, if the type needs one.
    pub fn admit(
        &self,
        msg: &mut MutableMessage,
        checked: Option<&Checked>,
    ) -> Result<Vec<MutableMessage>, NodeError> {
        let vchannel = msg.vchannel.as_str();
        match msg.message_type {
            MessageType::TimeTick => Ok(vec![]),
            MessageType::Data => match self.vchannels.get(vchannel) {
                Some(vc) => Err(NodeError::InvalidArgument(format!(
                    "vchannel {vchannel:?} belongs to collection {:?}: Data messages go to \
                     vchannels that are not a collection's",
                    vc.info.name
                ))),
                None => Ok(vec![]),
            },
            MessageType::CreateCollection => {
                if let Some(vc) = self.vchannels.get(vchannel) {
                    return Err(NodeError::CollectionExists(format!(
                        "vchannel {vchannel:?} already holds collection {:?}{}",
                        vc.info.name,
                        if vc.dropped { " (dropped)" } else { "" }
                    )));
                }
                let info: CollectionInfo = decode("CreateCollection", &msg.payload)?;
                if info.collection_id == 0 {
                    return Err(NodeError::InvalidArgument("collection id 0".into()));
                }
                let schema = info.schema.clone().unwrap_or_default();
                Schema::new(schema).map_err(|e| NodeError::InvalidArgument(e.to_string()))?;
                msg.coll.collection_id = info.collection_id;
                Ok(vec![])
            }
            MessageType::DropCollection => {
                msg.coll.collection_id = self.live(vchannel)?.info.collection_id;
                Ok(vec![])
            }
            MessageType::CreatePartition | MessageType::DropPartition => {
                let vc = self.live(vchannel)?;
                let p = &msg.coll.partition;
                walden_common::validate_object_name("partition", p)
                    .map_err(NodeError::InvalidArgument)?;
                let exists = vc.partitions.contains(p);
                if msg.message_type == MessageType::CreatePartition && exists {
                    return Err(NodeError::PartitionExists(format!(
                        "partition {p:?} of collection {:?}",
                        vc.info.name
                    )));
                }
                if msg.message_type == MessageType::DropPartition {
                    if !exists {
                        return Err(partition_not_found(p, vc));
                    }
                    if p == DEFAULT_PARTITION {
                        return Err(NodeError::InvalidArgument(
                            "the _default partition cannot be dropped".into(),
                        ));
                    }
                }
                msg.coll.collection_id = vc.info.collection_id;
                Ok(vec![])
            }
            MessageType::Insert | MessageType::Upsert | MessageType::Delete => {
                let vc = self.live(vchannel)?;
                let checked =
                    checked.ok_or_else(|| NodeError::Internal("payload was not checked".into()))?;
                if checked.collection_id != vc.info.collection_id {
                    // Dropped and re-created between the check and now: check again.
                    return Err(NodeError::CollectionNotFound(format!(
                        "vchannel {vchannel:?} changed collection during the append"
                    )));
                }
                if msg.coll.partition.is_empty() {
                    msg.coll.partition = DEFAULT_PARTITION.into();
                }
                if !vc.partitions.contains(&msg.coll.partition) {
                    return Err(partition_not_found(&msg.coll.partition, vc));
                }
                msg.coll.collection_id = vc.info.collection_id;
                msg.coll.rows = checked.rows;
                if msg.message_type == MessageType::Delete {
                    msg.coll.segment_id = 0;
                    return Ok(vec![]);
                }
                if msg.coll.segment_id != 0 {
                    let seg = msg.coll.segment_id;
                    return match self.segments.get(&seg) {
                        Some(s) if s.vchannel == vchannel && s.partition == msg.coll.partition => {
                            Ok(vec![])
                        }
                        _ if vc.sealed.contains(&seg) => Err(NodeError::SegmentSealed(format!(
                            "segment {seg} of vchannel {vchannel:?} is sealed"
                        ))),
                        _ => Err(NodeError::InvalidArgument(format!(
                            "segment {seg} is not a growing segment of vchannel {vchannel:?}, \
                             partition {:?}",
                            msg.coll.partition
                        ))),
                    };
                }
                if self.growing_of(vchannel, &msg.coll.partition).is_some() {
                    return Ok(vec![]);
                }
                let mut create = MutableMessage::new(
                    MessageType::CreateSegment,
                    vchannel.to_owned(),
                    Bytes::new(),
                );
                create.coll.collection_id = vc.info.collection_id;
                create.coll.partition = msg.coll.partition.clone();
                Ok(vec![create])
            }
            MessageType::Flush => {
                let vc = self.live(vchannel)?;
                let segment_ids = self
                    .segments
                    .iter()
                    .filter(|(_, s)| s.vchannel == vchannel)
                    .map(|(id, _)| *id)
                    .collect();
                msg.coll.collection_id = vc.info.collection_id;
                msg.payload = FlushInfo {
                    segment_ids,
                    reason: reason::MANUAL.into(),
                }
                .encode_to_vec()
                .into();
                Ok(vec![])
            }
            MessageType::CreateSegment => Err(NodeError::InvalidArgument(
                "CreateSegment messages are written by the node only".into(),
            )),
            // The transaction manager checked the transaction; the vchannel must still be live
            // if it is a collection's.
            MessageType::BeginTxn | MessageType::CommitTxn | MessageType::RollbackTxn => {
                if self.vchannels.contains_key(vchannel) {
                    msg.coll.collection_id = self.live(vchannel)?.info.collection_id;
                }
                Ok(vec![])
            }
            MessageType::Txn => Err(NodeError::InvalidArgument(
                "Txn messages are assembled for consumers and never written".into(),
            )),
            MessageType::Unspecified => Err(NodeError::InvalidArgument(
                "message type is unspecified".into(),
            )),
        }
    }

    /// Picks the growing segment for an admitted insert once the segments its admission asked
    /// for exist.
    pub fn assign(&self, msg: &mut MutableMessage) {
        if matches!(msg.message_type, MessageType::Insert | MessageType::Upsert)
            && msg.coll.segment_id == 0
            && let Some((id, _)) = self.growing_of(&msg.vchannel, &msg.coll.partition)
        {
            msg.coll.segment_id = id;
        }
    }

    /// Folds a stored message into the state. Messages that break the rules cannot be in the
    /// log (admission refused them), so a message that does not fit is skipped, not an error:
    /// replay must never stop a pchannel from opening.
    pub fn apply(&mut self, h: &MessageHeader, payload: &[u8]) {
        let t = MessageType::try_from(h.message_type).unwrap_or(MessageType::Unspecified);
        let tick = TimeTick(h.time_tick);
        match t {
            MessageType::CreateCollection => {
                let Ok(info) = CollectionInfo::decode(payload) else {
                    return;
                };
                let Ok(schema) = Schema::new(info.schema.clone().unwrap_or_default()) else {
                    return;
                };
                let mut partitions: BTreeSet<String> = info.partitions.iter().cloned().collect();
                partitions.insert(DEFAULT_PARTITION.into());
                self.vchannels.insert(
                    h.vchannel.clone(),
                    VChannel {
                        info,
                        schema: Arc::new(schema),
                        partitions,
                        dropped: false,
                        sealed: BTreeSet::new(),
                    },
                );
            }
            MessageType::DropCollection => {
                if let Some(vc) = self.vchannels.get_mut(&h.vchannel) {
                    vc.dropped = true;
                    vc.sealed.clear();
                }
                self.remove_segments(|s| s.vchannel == h.vchannel);
            }
            MessageType::CreatePartition => {
                if let Some(vc) = self.vchannels.get_mut(&h.vchannel) {
                    vc.partitions.insert(h.partition.clone());
                }
            }
            MessageType::DropPartition => {
                if let Some(vc) = self.vchannels.get_mut(&h.vchannel) {
                    vc.partitions.remove(&h.partition);
                }
                let sealed = self
                    .remove_segments(|s| s.vchannel == h.vchannel && s.partition == h.partition);
                if let Some(vc) = self.vchannels.get_mut(&h.vchannel) {
                    vc.sealed.extend(sealed);
                }
            }
            MessageType::CreateSegment => {
                self.segments.insert(
                    h.segment_id,
                    Segment {
                        vchannel: h.vchannel.clone(),
                        partition: h.partition.clone(),
                        rows: 0,
                        bytes: 0,
                        created: tick,
                        last_write: tick,
                    },
                );
            }
            MessageType::Insert | MessageType::Upsert => {
                if let Some(s) = self.segments.get_mut(&h.segment_id) {
                    s.rows += h.rows;
                    s.bytes += payload.len() as u64;
                    s.last_write = tick;
                    self.growing_bytes += payload.len() as u64;
                }
            }
            MessageType::Flush => {
                let Ok(f) = FlushInfo::decode(payload) else {
                    return;
                };
                for id in f.segment_ids {
                    if let Some(s) = self.segments.remove(&id) {
                        self.growing_bytes -= s.bytes;
                        if let Some(vc) = self.vchannels.get_mut(&s.vchannel) {
                            vc.sealed.insert(id);
                        }
                    }
                }
            }
            _ => {}
        }
    }

    fn remove_segments(&mut self, pred: impl Fn(&Segment) -> bool) -> Vec<u64> {
        let ids: Vec<u64> = self
            .segments
            .iter()
            .filter(|(_, s)| pred(s))
            .map(|(id, _)| *id)
            .collect();
        for id in &ids {
            if let Some(s) = self.segments.remove(id) {
                self.growing_bytes -= s.bytes;
            }
        }
        ids
    }

    /// Flush messages for segments that a seal policy says to seal now: full (rows, size),
    /// idle, too old, or (largest first) while `node_growing_bytes` is above `memory_high`
    /// until it would be below `memory_low`.
    /// Segments in `busy` (written by open transactions) are left growing.
    pub fn due_seals(
        &self,
        now: TimeTick,
        node_growing_bytes: u64,
        memory: (u64, u64),
        busy: &BTreeSet<u64>,
    ) -> Vec<MutableMessage> {
        let now_ms = now.physical_ms();
        let mut due: Vec<(u64, &'static str)> = Vec::new();
        for (id, s) in self.segments.iter().filter(|(id, _)| !busy.contains(id)) {
            let why = self.is_full(s).or_else(|| {
                if now_ms.saturating_sub(s.created.physical_ms()) >= self.policy.max_lifetime_ms {
                    Some(reason::LIFETIME)
                } else if s.rows > 0
                    && now_ms.saturating_sub(s.last_write.physical_ms()) >= self.policy.idle_ms
                {
                    Some(reason::IDLE)
                } else {
                    None
                }
            });
            if let Some(why) = why {
                due.push((*id, why));
            }
        }
        let (high, low) = memory;
        if node_growing_bytes > high {
            let mut by_size: Vec<(u64, u64)> = self
                .segments
                .iter()
                .filter(|(id, _)| !busy.contains(id) && !due.iter().any(|(d, _)| d == *id))
                .map(|(id, s)| (s.bytes, *id))
                .collect();
            by_size.sort_unstable_by(|a, b| b.cmp(a));
            let mut total = node_growing_bytes;
            for (bytes, id) in by_size {
                if total <= low || bytes == 0 {
                    break;
                }
                total -= bytes;
                due.push((id, reason::MEMORY));
            }
        }
        due.into_iter()
            .filter_map(|(id, why)| self.seal(id, why))
            .collect()
    }

    /// The Flush for segment `id` if the last insert filled it (it is sealed right after).
    pub fn full_seal(&self, id: u64) -> Option<MutableMessage> {
        let s = self.segments.get(&id)?;
        self.is_full(s).and_then(|why| self.seal(id, why))
    }

    /// The Flush that seals growing segment `id` for reason `why`.
    fn seal(&self, id: u64, why: &str) -> Option<MutableMessage> {
        let s = self.segments.get(&id)?;
        let vc = self.vchannels.get(&s.vchannel)?;
        let mut m = MutableMessage::new(MessageType::Flush, s.vchannel.clone(), Bytes::new());
        m.coll.collection_id = vc.info.collection_id;
        m.coll.partition = s.partition.clone();
        m.payload = FlushInfo {
            segment_ids: vec![id],
            reason: why.into(),
        }
        .encode_to_vec()
        .into();
        Some(m)
    }

    /// The state as a checkpoint (without its position, which the caller sets).
    pub fn to_checkpoint(&self) -> PChannelCheckpoint {
        let mut vchannels: Vec<VChannelMeta> = self
            .vchannels
            .iter()
            .map(|(name, vc)| VChannelMeta {
                name: name.clone(),
                collection: Some(vc.info.clone()),
                partitions: vc.partitions.iter().cloned().collect(),
                dropped: vc.dropped,
                sealed_segments: vc.sealed.iter().copied().collect(),
            })
            .collect();
        vchannels.sort_by(|a, b| a.name.cmp(&b.name));
        PChannelCheckpoint {
            vchannels,
            segments: self
                .segments
                .iter()
                .map(|(id, s)| SegmentMeta {
                    segment_id: *id,
                    vchannel: s.vchannel.clone(),
                    partition: s.partition.clone(),
                    rows: s.rows,
                    bytes: s.bytes,
                    created_tick: s.created.0,
                    last_write_tick: s.last_write.0,
                })
                .collect(),
            ..PChannelCheckpoint::default()
        }
    }

    /// Restores the state saved by [`Shards::to_checkpoint`].
    pub fn from_checkpoint(cp: &PChannelCheckpoint, policy: SealPolicy) -> Result<Self, NodeError> {
        let mut shards = Self::new(policy);
        for v in &cp.vchannels {
            let info = v.collection.clone().unwrap_or_default();
            let schema = Schema::new(info.schema.clone().unwrap_or_default()).map_err(|e| {
                NodeError::Internal(format!("checkpoint of vchannel {}: {e}", v.name))
            })?;
            shards.vchannels.insert(
                v.name.clone(),
                VChannel {
                    info,
                    schema: Arc::new(schema),
                    partitions: v.partitions.iter().cloned().collect(),
                    dropped: v.dropped,
                    sealed: v.sealed_segments.iter().copied().collect(),
                },
            );
        }
        for s in &cp.segments {
            shards.growing_bytes += s.bytes;
            shards.segments.insert(
                s.segment_id,
                Segment {
                    vchannel: s.vchannel.clone(),
                    partition: s.partition.clone(),
                    rows: s.rows,
                    bytes: s.bytes,
                    created: TimeTick(s.created_tick),
                    last_write: TimeTick(s.last_write_tick),
                },
            );
        }
        Ok(shards)
    }
}

/// Decodes and checks a DML payload against the vchannel's schema: the part of admission that
/// is too slow to run under the append lock.
pub fn check_payload(
    msg: &MutableMessage,
    collection_id: u64,
    schema: &Schema,
) -> Result<Checked, NodeError> {
    let rows = match msg.message_type {
        MessageType::Insert | MessageType::Upsert => schema.validate_ipc(&msg.payload)?,
        MessageType::Delete => {
            let ids: DeleteIds = decode("Delete", &msg.payload)?;
            schema.check_delete(&ids)?
        }
        _ => 0,
    };
    Ok(Checked {
        collection_id,
        rows,
    })
}

/// Whether the type carries a payload checked against the schema.
pub fn needs_payload_check(t: MessageType) -> bool {
    matches!(
        t,
        MessageType::Insert | MessageType::Upsert | MessageType::Delete
    )
}

fn partition_not_found(p: &str, vc: &VChannel) -> NodeError {
    NodeError::PartitionNotFound(format!(
        "collection {:?} has no partition {p:?}",
        vc.info.name
    ))
}

#[cfg(test)]
mod tests;
