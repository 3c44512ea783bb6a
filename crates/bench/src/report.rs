//! What a run measured, and how it is printed: the table rows, the JSON, the median run.

use super::*;

#[derive(Debug, Clone)]
pub(super) struct RunResult {
    pub(super) msgs: u64,
    pub(super) bytes: u64,
    pub(super) elapsed: Duration,
    /// Microseconds: per-message latency, or the recovery time for `recovery`.
    pub(super) hist: Histogram<u64>,
    pub(super) errors: u64,
    pub(super) cpu_server_s: Option<f64>,
    pub(super) cpu_client_s: f64,
    pub(super) syncs: Option<u64>,
    /// Object-storage WAL: fragment uploads and their bytes over the run.
    pub(super) puts: Option<(u64, u64)>,
    /// Object-storage WAL: bytes the node read from the store over the run (the rest of a
    /// catch-up came from its write-ahead buffer).
    pub(super) store_read_bytes: Option<u64>,
    /// The node's own enqueue-to-durable time over the run (`walden_append_latency_seconds`):
    /// (sum in seconds, count). Tells the log's share of the latency from the rest.
    pub(super) node_append: Option<(f64, u64)>,
    /// At a fixed rate: how late the bench itself sent each message (its timer has ~1 ms
    /// resolution), in microseconds. Part of every latency above; reported so it can be told
    /// apart from the system's.
    pub(super) lateness: Histogram<u64>,
}

impl RunResult {
    pub(super) fn new() -> Self {
        Self {
            msgs: 0,
            bytes: 0,
            elapsed: Duration::ZERO,
            lateness: new_hist(),
            hist: new_hist(),
            errors: 0,
            cpu_server_s: None,
            cpu_client_s: 0.0,
            syncs: None,
            puts: None,
            store_read_bytes: None,
            node_append: None,
        }
    }
    pub(super) fn msgs_per_s(&self) -> f64 {
        self.msgs as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
    pub(super) fn mib_per_s(&self) -> f64 {
        self.bytes as f64 / self.elapsed.as_secs_f64().max(1e-9) / (1 << 20) as f64
    }
    pub(super) fn ms(&self, q: f64) -> f64 {
        ms(&self.hist, q)
    }
    /// The number runs are ranked by to pick the median.
    pub(super) fn score(&self, kind: Kind) -> f64 {
        match kind {
            Kind::Append | Kind::Catchup => self.msgs_per_s(),
            Kind::E2e => -self.ms(0.99),
            Kind::Recovery => -self.ms(0.5),
        }
    }
    pub(super) fn to_json(&self) -> Value {
        json!({
            "msgs": self.msgs,
            "msgs_per_s": round(self.msgs_per_s()),
            "mib_per_s": round(self.mib_per_s()),
            "errors": self.errors,
            "latency_ms": {
                "p50": round(self.ms(0.5)), "p90": round(self.ms(0.9)),
                "p99": round(self.ms(0.99)), "p999": round(self.ms(0.999)),
                "max": round(self.hist.max() as f64 / 1000.0),
            },
            "cpu_server_s": self.cpu_server_s.map(round),
            "cpu_client_s": round(self.cpu_client_s),
            "fsyncs": self.syncs,
            "store_read_mib": self.store_read_bytes.map(|b| round(b as f64 / (1 << 20) as f64)),
            "sender_lateness_ms": (!self.lateness.is_empty()).then(|| json!({
                "p50": round(self.lateness.value_at_quantile(0.5) as f64 / 1000.0),
                "p99": round(self.lateness.value_at_quantile(0.99) as f64 / 1000.0),
            })),
            "fsyncs_per_msg": self.syncs.map(|s| round(s as f64 / self.msgs.max(1) as f64)),
            "node_append_ms_mean": self
                .node_append
                .filter(|(_, n)| *n > 0)
                .map(|(sum, n)| round(sum * 1000.0 / n as f64)),
            "commit_interval_ms": self
                .syncs
                .filter(|s| *s > 0)
                .map(|s| round(self.elapsed.as_secs_f64() * 1000.0 / s as f64)),
        })
    }
    pub(super) fn table_row(&self, name: &str) -> String {
        table_row(
            name,
            self.msgs_per_s(),
            self.mib_per_s(),
            &self.hist,
            self.errors,
        )
    }
}

pub(super) fn round(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

pub(super) const TABLE_HEADER: &str =
    "system        msgs/s     MiB/s   p50 ms   p90 ms   p99 ms  p999 ms   max ms  errors";

pub(super) fn new_hist() -> Histogram<u64> {
    // 1 us .. 1 h at 3 significant digits; these bounds are valid, so creation cannot fail.
    Histogram::new_with_bounds(1, 3_600_000_000, 3).unwrap_or_else(|_| unreachable!())
}

pub(super) fn median(runs: &[RunResult], kind: Kind) -> RunResult {
    let mut sorted = runs.to_vec();
    sorted.sort_by(|x, y| x.score(kind).total_cmp(&y.score(kind)));
    sorted[sorted.len() / 2].clone()
}

pub(super) fn write_json(path: Option<&Path>, v: &Value) -> anyhow::Result<()> {
    if let Some(p) = path {
        let mut f =
            std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?;
        writeln!(f, "{}", serde_json::to_string_pretty(v)?)?;
    }
    Ok(())
}
