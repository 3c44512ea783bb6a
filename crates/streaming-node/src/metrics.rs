//! Prometheus metrics of the streaming node.

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry,
};

/// The node's metrics, registered in one registry.
#[derive(Clone, Debug)]
pub struct Metrics {
    pub registry: Registry,
    /// From the append call to its acknowledgement (durable).
    pub append_latency: HistogramVec,
    /// From the durable write to visibility (all lower ticks acknowledged).
    pub ack_latency: Histogram,
    pub appended_bytes: IntCounterVec,
    pub appended_messages: IntCounterVec,
    pub append_errors: IntCounterVec,
    /// Retries of idempotent producers answered with the original result.
    pub duplicates: prometheus::IntCounter,
    pub wal_syncs: IntGaugeVec,
    /// fdatasync calls of the whole WAL storage, where pchannels share them.
    pub wal_storage_syncs: prometheus::IntGauge,
    pub wab_bytes: IntGaugeVec,
    pub wab_messages: IntGaugeVec,
    /// Messages between what a consumer was last sent and the newest confirmed message.
    pub consumer_lag: Histogram,
    /// Payload bytes in growing segments, node-wide (what the memory seal policy reads).
    pub growing_bytes: prometheus::IntGauge,
}

fn buckets() -> Vec<f64> {
    prometheus::exponential_buckets(0.000_05, 2.0, 18).unwrap_or_default()
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new_custom(Some("walden".into()), None).unwrap_or_default();
        let m = Self {
            append_latency: HistogramVec::new(
                HistogramOpts::new("append_latency_seconds", "Append call to durable ack")
                    .buckets(buckets()),
                &["pchannel"],
            )
            .expect("valid metric"),
            ack_latency: Histogram::with_opts(
                HistogramOpts::new("ack_latency_seconds", "Durable write to visibility")
                    .buckets(buckets()),
            )
            .expect("valid metric"),
            appended_bytes: IntCounterVec::new(
                Opts::new("appended_bytes_total", "Encoded bytes appended"),
                &["pchannel"],
            )
            .expect("valid metric"),
            appended_messages: IntCounterVec::new(
                Opts::new("appended_messages_total", "Messages appended"),
                &["pchannel", "type"],
            )
            .expect("valid metric"),
            append_errors: IntCounterVec::new(
                Opts::new("append_errors_total", "Appends that failed, by error code"),
                &["pchannel", "code"],
            )
            .expect("valid metric"),
            duplicates: prometheus::IntCounter::new(
                "duplicates_total",
                "Retried appends answered with the original result instead of written again",
            )
            .expect("valid metric"),
            wal_syncs: IntGaugeVec::new(
                Opts::new(
                    "wal_syncs",
                    "fdatasync calls by the WAL since it was opened",
                ),
                &["pchannel"],
            )
            .expect("valid metric"),
            wab_bytes: IntGaugeVec::new(
                Opts::new(
                    "write_ahead_buffer_bytes",
                    "Bytes held in the write-ahead buffer",
                ),
                &["pchannel"],
            )
            .expect("valid metric"),
            wab_messages: IntGaugeVec::new(
                Opts::new(
                    "write_ahead_buffer_messages",
                    "Messages held in the write-ahead buffer",
                ),
                &["pchannel"],
            )
            .expect("valid metric"),
            consumer_lag: Histogram::with_opts(
                HistogramOpts::new("consumer_lag_messages", "Consumer lag when a batch is sent")
                    .buckets(prometheus::exponential_buckets(1.0, 4.0, 12).unwrap_or_default()),
            )
            .expect("valid metric"),
            wal_storage_syncs: prometheus::IntGauge::new(
                "wal_storage_syncs",
                "fdatasync calls of the whole WAL storage (shared layout: one per group commit)",
            )
            .expect("valid metric"),
            growing_bytes: prometheus::IntGauge::new(
                "growing_segment_bytes",
                "Payload bytes in growing segments (node total)",
            )
            .expect("valid metric"),
            registry,
        };
        for c in [
            Box::new(m.append_latency.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.ack_latency.clone()),
            Box::new(m.appended_bytes.clone()),
            Box::new(m.appended_messages.clone()),
            Box::new(m.append_errors.clone()),
            Box::new(m.duplicates.clone()),
            Box::new(m.wal_syncs.clone()),
            Box::new(m.wab_bytes.clone()),
            Box::new(m.wab_messages.clone()),
            Box::new(m.consumer_lag.clone()),
            Box::new(m.growing_bytes.clone()),
            Box::new(m.wal_storage_syncs.clone()),
        ] {
            // Names are distinct constants; registration cannot collide.
            let _ = m.registry.register(c);
        }
        m
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let families = self.registry.gather();
        let _ = prometheus::TextEncoder::new().encode_utf8(&families, &mut out);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
