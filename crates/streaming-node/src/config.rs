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
    /// Write-ahead buffer: bytes of the tail kept in memory per pchannel. Default 64 MiB.
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
    /// Idempotent producers: messages of the WAL's tail read at open to rebuild the windows,
    /// per pchannel. Default 4096.
    pub dedup_rebuild_messages: u64,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            pchannels: 16,
            pchannel_prefix: "walden-dml".into(),
            time_tick_interval_ms: 200,
            max_message_bytes: 8 << 20,
            max_inflight_bytes: 64 << 20,
            wab_capacity_bytes: 64 << 20,
            wab_keepalive_ms: 30_000,
            tso_window_ms: 3_000,
            dedup_window: 1024,
            dedup_max_producers: 10_000,
            dedup_rebuild_messages: 4096,
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
        if self.tso_window_ms < 10 {
            return Err("node.tso_window_ms must be at least 10".into());
        }
        Ok(())
    }
}
