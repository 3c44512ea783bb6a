//! `[flush]` and `[wal.retention]` in the server's TOML file. Every key is optional; the
//! defaults are written next to each field and in `walden.example.toml`.

use std::time::Duration;

use serde::Deserialize;

/// How sealed segments become files, and how the files are kept.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct FlushConfig {
    /// The largest Parquet file a flush or a compaction writes, estimated from the rows'
    /// Arrow size (a segment larger than this is several files). Default 64 MiB.
    pub max_file_bytes: u64,
    /// A vchannel's buffered deletes are written as a delete log once the oldest has waited
    /// this long, even if no Flush comes (they hold the WAL's truncation back). Default 60 000.
    pub delete_max_age_ms: u64,
    /// ... or once this many are buffered. Default 100 000.
    pub delete_max_rows: usize,
    /// How often the flusher saves flushed-through positions that moved and truncates the WAL
    /// behind them. Default 1 000.
    pub checkpoint_interval_ms: u64,
    /// A file no manifest names (left by a crash before its commit, or replaced by compaction)
    /// is deleted once it has been seen unreferenced for this long, so a reader that listed it
    /// just before the swap can finish. Default 600 000 (10 min).
    pub gc_grace_ms: u64,
    /// How often to look for such files. Default 60 000.
    pub gc_interval_ms: u64,
    /// `[flush.compaction]`.
    pub compaction: CompactionConfig,
}

impl Default for FlushConfig {
    fn default() -> Self {
        Self {
            max_file_bytes: 64 << 20,
            delete_max_age_ms: 60_000,
            delete_max_rows: 100_000,
            checkpoint_interval_ms: 1_000,
            gc_grace_ms: 600_000,
            gc_interval_ms: 60_000,
            compaction: CompactionConfig::default(),
        }
    }
}

/// Merging small flushed segments and applying delete logs to them.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct CompactionConfig {
    /// Default true.
    pub enabled: bool,
    /// How often a pchannel's manifests are looked at. Default 10 000.
    pub interval_ms: u64,
    /// A segment with fewer rows than this is small. Default 100 000.
    pub small_rows: u64,
    /// A partition's small segments are merged once there are this many. Default 4.
    pub min_segments: usize,
    /// A vchannel's delete logs are applied (every segment they touch rewritten) once there
    /// are this many. Default 8.
    pub max_delete_logs: usize,
    /// The most rows one compaction reads. Default 4 000 000.
    pub max_input_rows: u64,
}

impl Default for CompactionConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            interval_ms: 10_000,
            small_rows: 100_000,
            min_segments: 4,
            max_delete_logs: 8,
            max_input_rows: 4_000_000,
        }
    }
}

/// `[wal.retention]`: what the WAL keeps even once it is flushed. The WAL is truncated below
/// the lowest of every vchannel's flushed-through position, the last durable checkpoint and
/// this floor: the newest `time_ms` of messages and the newest `bytes` are kept.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct RetentionConfig {
    /// Keep messages younger than this. Default 600 000 (10 min).
    pub time_ms: u64,
    /// Keep at least this many of the newest bytes. Default 0.
    pub bytes: u64,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            time_ms: 600_000,
            bytes: 0,
        }
    }
}

impl FlushConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.max_file_bytes < 1 << 10 {
            return Err("flush.max_file_bytes must be at least 1024".into());
        }
        if self.checkpoint_interval_ms == 0 {
            return Err("flush.checkpoint_interval_ms must be positive".into());
        }
        if self.compaction.min_segments < 2 {
            return Err("flush.compaction.min_segments must be at least 2".into());
        }
        if self.compaction.interval_ms == 0 || self.gc_interval_ms == 0 {
            return Err(
                "flush.compaction.interval_ms and flush.gc_interval_ms must be positive".into(),
            );
        }
        Ok(())
    }

    pub(crate) fn checkpoint_interval(&self) -> Duration {
        Duration::from_millis(self.checkpoint_interval_ms)
    }
}
