//! Per-operation metrics of the object store: requests, bytes, errors by kind, latency.

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};

/// The object store's metric families, registered once per registry.
#[derive(Clone, Debug)]
pub struct StoreMetrics {
    pub requests: IntCounterVec,
    pub bytes: IntCounterVec,
    pub errors: IntCounterVec,
    pub latency: HistogramVec,
}

impl StoreMetrics {
    /// Registers the families in `registry` (a second registration of the same names fails,
    /// so build one per registry).
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let m = Self {
            requests: IntCounterVec::new(
                Opts::new(
                    "object_store_requests_total",
                    "Object store calls, by operation",
                ),
                &["op"],
            )?,
            bytes: IntCounterVec::new(
                Opts::new(
                    "object_store_bytes_total",
                    "Bytes written (put) and read (get) through the object store",
                ),
                &["op"],
            )?,
            errors: IntCounterVec::new(
                Opts::new(
                    "object_store_errors_total",
                    "Failed object store calls, by operation and kind",
                ),
                &["op", "kind"],
            )?,
            latency: HistogramVec::new(
                HistogramOpts::new(
                    "object_store_latency_seconds",
                    "Time of one object store call, retries included",
                )
                .buckets(prometheus::exponential_buckets(0.0005, 2.0, 16)?),
                &["op"],
            )?,
        };
        registry.register(Box::new(m.requests.clone()))?;
        registry.register(Box::new(m.bytes.clone()))?;
        registry.register(Box::new(m.errors.clone()))?;
        registry.register(Box::new(m.latency.clone()))?;
        Ok(m)
    }
}
