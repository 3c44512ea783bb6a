//! Prometheus metrics of the flusher, registered in the node's registry.

use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

#[derive(Clone, Debug)]
pub struct Metrics {
    /// Parquet bytes written by flushes (data and delta files).
    pub flush_bytes: IntCounter,
    pub flush_rows: IntCounter,
    pub flush_deletes: IntCounter,
    /// From a segment's Flush message (its tick) to its manifest commit.
    pub flush_latency: Histogram,
    /// Age of the oldest sealed segment not yet committed, per pchannel.
    pub flush_lag_ms: IntGaugeVec,
    /// Compaction runs by result (`ok`, `error`).
    pub compactions: IntCounterVec,
    pub compacted_rows: IntCounter,
    /// The lowest id still readable, per pchannel.
    pub truncation_point: IntGaugeVec,
    /// Bytes of the WAL in storage, per pchannel.
    pub wal_bytes: IntGaugeVec,
    /// Files deleted because no manifest named them (crash leftovers, compacted away).
    pub files_deleted: IntCounter,
    /// Flushes (files being written, then the manifest commit) under way now.
    pub flushes_in_progress: IntGauge,
    /// Compactions under way now.
    pub compactions_in_progress: IntGauge,
}

/// Counts one unit of work in `gauge` while it lives (however the work ends).
pub(crate) struct InProgress(IntGauge);

impl InProgress {
    pub(crate) fn new(gauge: &IntGauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for InProgress {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Metrics {
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let m = Self {
            flush_bytes: IntCounter::new("flush_bytes_total", "Parquet bytes written by flushes")?,
            flush_rows: IntCounter::new("flush_rows_total", "Rows flushed to Parquet")?,
            flush_deletes: IntCounter::new(
                "flush_deletes_total",
                "Deletes written to delta files",
            )?,
            flush_latency: Histogram::with_opts(
                HistogramOpts::new(
                    "flush_latency_seconds",
                    "From a segment's Flush message to its manifest commit",
                )
                .buckets(prometheus::exponential_buckets(0.01, 2.0, 14)?),
            )?,
            flush_lag_ms: IntGaugeVec::new(
                Opts::new(
                    "flush_lag_ms",
                    "Age of the oldest sealed segment not yet in its manifest",
                ),
                &["pchannel"],
            )?,
            compactions: IntCounterVec::new(
                Opts::new("compactions_total", "Compaction runs by result"),
                &["result"],
            )?,
            compacted_rows: IntCounter::new(
                "compacted_rows_total",
                "Rows rewritten by compaction",
            )?,
            truncation_point: IntGaugeVec::new(
                Opts::new("wal_truncation_point", "The lowest WAL id still readable"),
                &["pchannel"],
            )?,
            wal_bytes: IntGaugeVec::new(
                Opts::new("wal_bytes", "Bytes of the WAL in storage"),
                &["pchannel"],
            )?,
            files_deleted: IntCounter::new(
                "flush_files_deleted_total",
                "Files deleted because no manifest names them",
            )?,
            flushes_in_progress: IntGauge::new(
                "flushes_in_progress",
                "Flushes under way: files being written or the manifest being committed",
            )?,
            compactions_in_progress: IntGauge::new(
                "compactions_in_progress",
                "Compactions under way",
            )?,
        };
        registry.register(Box::new(m.flush_bytes.clone()))?;
        registry.register(Box::new(m.flush_rows.clone()))?;
        registry.register(Box::new(m.flush_deletes.clone()))?;
        registry.register(Box::new(m.flush_latency.clone()))?;
        registry.register(Box::new(m.flush_lag_ms.clone()))?;
        registry.register(Box::new(m.compactions.clone()))?;
        registry.register(Box::new(m.compacted_rows.clone()))?;
        registry.register(Box::new(m.truncation_point.clone()))?;
        registry.register(Box::new(m.wal_bytes.clone()))?;
        registry.register(Box::new(m.files_deleted.clone()))?;
        registry.register(Box::new(m.flushes_in_progress.clone()))?;
        registry.register(Box::new(m.compactions_in_progress.clone()))?;
        Ok(m)
    }
}
