//! Streaming node settings (the `[node]` table of the config file).

use std::time::Duration;

use serde::Deserialize;

/// Settings of the streaming node. Every field has a default; see `walden.example.toml`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    /// How many pchannels a standalone node serves. Default 16.
    pub pchannels: u32,
    /// Pchannel names are `{prefix}-{i}`. Default `walden-dml`.
    pub pchannel_prefix: String,
    /// How often a TimeTick is written when real messages were appended since the last one.
    /// Default 200 ms.
    pub time_tick_interval_ms: u64,
    /// Largest message accepted (payload, vchannel and properties). Default 8 MiB.
    pub max_message_bytes: usize,
    /// Bytes of appends in flight per pchannel before producers wait. Default 64 MiB.
    pub max_inflight_bytes: usize,
    /// Write-ahead buffer: bytes of the tail kept in memory per pchannel. Default 16 MiB: readers
    /// further behind read the WAL (page cache), and a larger buffer only grows the memory that
    /// every appended byte must be freshly faulted into until the buffer is full.
    pub wab_capacity_bytes: usize,
    /// Write-ahead buffer: how long an entry is kept at most. Default 30 s.
    pub wab_keepalive_ms: u64,
    /// How far ahead the timestamp oracle persists its bound. Default 3000 ms.
    pub tso_window_ms: u64,
    /// Idempotent producers: sequences remembered per producer and pchannel. Default 1024.
    pub dedup_window: usize,
    /// Idempotent producers: producers remembered per pchannel (the idlest is forgotten
    /// first). Default 10000.
    pub dedup_max_producers: usize,
    /// Idempotent producers: the windows are rebuilt at open from everything since the last
    /// checkpoint, and at least this many messages of the WAL's tail, per pchannel.
    /// Default 4096.
    pub dedup_rebuild_messages: u64,
    /// Seal policy: a growing segment is sealed once it holds this many rows. Default 1000000.
    pub segment_max_rows: u64,
    /// Seal policy: ... or this many payload bytes. Default 128 MiB.
    pub segment_max_bytes: u64,
    /// Seal policy: ... or when no row was added for this long. Default 600000 ms (10 min).
    pub segment_idle_ms: u64,
    /// Seal policy: ... or when it is this old. Default 86400000 ms (24 h).
    pub segment_max_lifetime_ms: u64,
    /// Seal policy: when the growing segments of the whole node hold more than this many
    /// bytes, the largest are sealed until the total is below `growing_memory_low_bytes`.
    /// Default 1 GiB.
    pub growing_memory_high_bytes: u64,
    /// See `growing_memory_high_bytes`. Default 512 MiB.
    pub growing_memory_low_bytes: u64,
    /// Recovery storage: the collection state is checkpointed this often (when it changed).
    /// Default 10000 ms.
    pub checkpoint_interval_ms: u64,
    /// Recovery storage: ... or as soon as this many messages were appended since the last
    /// checkpoint, which bounds the replay at open. Default 20000.
    pub checkpoint_max_dirty_messages: u64,
    /// Transactions: how long one may stay idle (no body message) before the node rolls it
    /// back, when BeginTxn does not say. Default 10000 ms.
    pub txn_keepalive_ms: u64,
    /// Transactions: most payload bytes one may hold (consumers buffer a transaction until its
    /// commit); a body message past it is refused with MESSAGE_TOO_LARGE. Default 64 MiB.
    pub txn_max_bytes: u64,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            pchannels: 16,
            pchannel_prefix: "walden-dml".into(),
            time_tick_interval_ms: 200,
            max_message_bytes: 8 << 20,
            max_inflight_bytes: 64 << 20,
            wab_capacity_bytes: 16 << 20,
            wab_keepalive_ms: 30_000,
            tso_window_ms: 3_000,
            dedup_window: 1024,
            dedup_max_producers: 10_000,
            dedup_rebuild_messages: 4096,
            segment_max_rows: 1_000_000,
            segment_max_bytes: 128 << 20,
            segment_idle_ms: 600_000,
            segment_max_lifetime_ms: 86_400_000,
            growing_memory_high_bytes: 1 << 30,
            growing_memory_low_bytes: 512 << 20,
            checkpoint_interval_ms: 10_000,
            checkpoint_max_dirty_messages: 20_000,
            txn_keepalive_ms: 10_000,
            txn_max_bytes: 64 << 20,
        }
    }
}

impl NodeConfig {
    pub fn pchannel_names(&self) -> Vec<String> {
        (0..self.pchannels)
            .map(|i| format!("{}-{i}", self.pchannel_prefix))
            .collect()
    }

    pub fn time_tick_interval(&self) -> Duration {
        Duration::from_millis(self.time_tick_interval_ms.max(1))
    }

    /// Checks values that would make the node misbehave.
    pub fn validate(&self) -> Result<(), String> {
        if self.pchannels == 0 {
            return Err("node.pchannels must be at least 1".into());
        }
        walden_common::validate_channel_name(&format!("{}-0", self.pchannel_prefix))
            .map_err(|e| format!("node.pchannel_prefix: {e}"))?;
        if self.max_message_bytes == 0 || self.max_message_bytes > 128 << 20 {
            return Err("node.max_message_bytes must be between 1 and 128 MiB".into());
        }
        if self.max_inflight_bytes < self.max_message_bytes {
            return Err("node.max_inflight_bytes must be at least node.max_message_bytes".into());
        }
        if self.segment_max_rows == 0 || self.segment_max_bytes == 0 {
            return Err(
                "node.segment_max_rows and node.segment_max_bytes must be at least 1".into(),
            );
        }
        if self.growing_memory_low_bytes > self.growing_memory_high_bytes {
            return Err(
                "node.growing_memory_low_bytes must not exceed node.growing_memory_high_bytes"
                    .into(),
            );
        }
        if self.checkpoint_max_dirty_messages == 0 || self.checkpoint_interval_ms == 0 {
            return Err("node.checkpoint_* settings must be at least 1".into());
        }
        if self.tso_window_ms < 10 {
            return Err("node.tso_window_ms must be at least 10".into());
        }
        Ok(())
    }
}
