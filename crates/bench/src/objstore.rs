//! The object store's own limit: raw create-if-absent PUTs (and GETs) of the sizes the
//! object-storage WAL writes, with 1 and N in flight. What every object-WAL report is set
//! beside, the way append reports are set beside `bench disk`.

use futures::{StreamExt, stream};
use walden_object_store::{Blobs, ObjectStoreConfig, StoreMetrics};

use super::*;

#[derive(clap::Args, Debug, Clone)]
pub(super) struct ObjStoreArgs {
    /// The store: file:///abs/dir or s3://bucket/prefix.
    #[arg(long)]
    object_store: String,
    /// An S3-compatible endpoint (http:// allowed).
    #[arg(long)]
    object_store_endpoint: Option<String>,
    /// Object sizes, comma-separated (the WAL's fragments: 4 MiB full, smaller at low load).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1024,65536,1048576,4194304"
    )]
    sizes: Vec<usize>,
    /// The N of "N in flight" (the WAL uploads 8 fragments at once by default).
    #[arg(long, default_value_t = 8)]
    inflight: usize,
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    duration: Duration,
    #[arg(long)]
    json: Option<PathBuf>,
}

/// The store config the bench and the server it starts use.
pub(super) fn store_config(url: &str, endpoint: Option<&str>) -> ObjectStoreConfig {
    ObjectStoreConfig {
        url: url.to_owned(),
        endpoint: endpoint.unwrap_or_default().to_owned(),
        allow_http: endpoint.is_some_and(|e| e.starts_with("http://")),
        ..ObjectStoreConfig::default()
    }
}

pub(super) async fn open_store(config: &ObjectStoreConfig) -> anyhow::Result<Arc<dyn Blobs>> {
    let metrics = StoreMetrics::new(&prometheus::Registry::new())?;
    walden_object_store::open(config, metrics)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))
}

/// One probe: `ops` calls of `size` bytes with `inflight` at once.
#[derive(Debug, Clone)]
pub(super) struct ProbeResult {
    pub(super) op: &'static str,
    pub(super) size: usize,
    pub(super) inflight: usize,
    pub(super) ops: u64,
    pub(super) elapsed: Duration,
    pub(super) hist: Histogram<u64>,
}

impl ProbeResult {
    pub(super) fn mib_per_s(&self) -> f64 {
        (self.ops * self.size as u64) as f64
            / self.elapsed.as_secs_f64().max(1e-9)
            / (1 << 20) as f64
    }
    pub(super) fn ms(&self, q: f64) -> f64 {
        ms(&self.hist, q)
    }
    pub(super) fn label(&self) -> String {
        format!("{} {}x{}", self.op, human_size(self.size), self.inflight)
    }
    pub(super) fn table_row(&self) -> String {
        let per_s = self.ops as f64 / self.elapsed.as_secs_f64().max(1e-9);
        table_row(&self.label(), per_s, self.mib_per_s(), &self.hist, 0)
    }
    pub(super) fn to_json(&self) -> Value {
        json!({
            "op": self.op, "size": self.size, "inflight": self.inflight,
            "ops_per_s": round(self.ops as f64 / self.elapsed.as_secs_f64().max(1e-9)),
            "mib_per_s": round(self.mib_per_s()),
            "latency_ms": {
                "p50": round(self.ms(0.5)), "p99": round(self.ms(0.99)),
                "max": round(self.hist.max() as f64 / 1000.0),
            },
        })
    }
}

fn human_size(b: usize) -> String {
    match b {
        b if b >= 1 << 20 => format!("{:.3}M", b as f64 / (1 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.3}K", b as f64 / (1 << 10) as f64),
        b => format!("{b}B"),
    }
    .replace(".000", "")
}

/// Creates objects of `size` under a fresh prefix for `duration`, `inflight` at once; then
/// reads them back the same way; then deletes them. Returns the PUT and GET results.
pub(super) async fn probe(
    store: &Arc<dyn Blobs>,
    size: usize,
    inflight: usize,
    duration: Duration,
) -> anyhow::Result<(ProbeResult, ProbeResult)> {
    let prefix = format!("bench-probe/{:016x}", rand_u64());
    let data = Bytes::from(vec![0x5au8; size]);
    let next = AtomicU64::new(0);
    let started = Instant::now();
    let deadline = started + duration;
    let hist = Mutex::new(new_hist());
    let worker = || async {
        while Instant::now() < deadline {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let t = Instant::now();
            store
                .put_if_absent(&format!("{prefix}/{i:010}"), data.clone())
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let us = t.elapsed().as_micros() as u64;
            hist.lock()
                .unwrap_or_else(|e| e.into_inner())
                .record(us.max(1))?;
        }
        anyhow::Ok(())
    };
    futures::future::try_join_all((0..inflight).map(|_| worker())).await?;
    let put = ProbeResult {
        op: "put",
        size,
        inflight,
        ops: next.load(Ordering::Relaxed),
        elapsed: started.elapsed(),
        hist: hist.into_inner().unwrap_or_else(|e| e.into_inner()),
    };
    let n = put.ops;
    let started = Instant::now();
    let mut hist = new_hist();
    let mut gets = stream::iter(0..n)
        .map(|i| {
            let key = format!("{prefix}/{i:010}");
            async move {
                let t = Instant::now();
                store.get(&key).await.map(|_| t.elapsed())
            }
        })
        .buffer_unordered(inflight);
    while let Some(r) = gets.next().await {
        let took = r.map_err(|e| anyhow::anyhow!("{e}"))?;
        hist.record((took.as_micros() as u64).max(1))?;
    }
    let get = ProbeResult {
        op: "get",
        size,
        inflight,
        ops: n,
        elapsed: started.elapsed(),
        hist,
    };
    stream::iter(0..n)
        .for_each_concurrent(inflight, |i| {
            let key = format!("{prefix}/{i:010}");
            async move {
                let _ = store.delete(&key).await;
            }
        })
        .await;
    // Say what was written: the objects are gone, unless a delete failed.
    let left = store
        .list(&format!("{prefix}/"))
        .await
        .map_or(0, |l| l.len());
    eprintln!(
        "  objstore probe: created {n} objects of {size} B under {prefix}/, deleted {}{}",
        n as usize - left.min(n as usize),
        if left > 0 {
            format!(" ({left} left behind)")
        } else {
            String::new()
        }
    );
    Ok((put, get))
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

/// With the object-storage WAL: the store's own limit for what the run did (PUTs of the
/// fragment size the node wrote, 1 in flight for one append in flight, else the WAL's 8
/// upload slots; GETs of that size for a catch-up).
pub(super) async fn objstore_limit(
    a: &Args,
    kind: Kind,
    w: &RunResult,
    server: Option<&WaldenServer>,
) -> anyhow::Result<Option<ProbeResult>> {
    if a.wal_storage != WalStorage::Object || !matches!(kind, Kind::Append | Kind::Catchup) {
        return Ok(None);
    }
    let (puts, bytes) = match (kind, w.puts, server) {
        (Kind::Append, Some(p), _) => p,
        // A catch-up reads what the preload wrote.
        (_, _, Some(s)) => scrape_node(&s.metrics)
            .await
            .map(|c| (c.puts, c.put_bytes))
            .unwrap_or_default(),
        _ => (0, 0),
    };
    if puts == 0 {
        return Ok(None);
    }
    let size = (bytes / puts) as usize;
    // Appends: one upload per message in flight, else the WAL's 8 upload slots. Catch-up: the
    // node reads 8 fragments ahead on every pchannel.
    let inflight = match kind {
        Kind::Append if a.inflight == 1 => 1,
        Kind::Append => 8,
        _ => 8 * a.pchannels as usize,
    };
    let config = store_config(
        a.object_store.as_deref().unwrap_or_default(),
        a.object_store_endpoint.as_deref(),
    );
    let store = open_store(&config).await?;
    let (put, get) = probe(&store, size, inflight, Duration::from_secs(3)).await?;
    Ok(Some(if kind == Kind::Catchup { get } else { put }))
}

/// `walden bench objstore`.
pub(super) async fn run(a: ObjStoreArgs) -> anyhow::Result<()> {
    let config = store_config(&a.object_store, a.object_store_endpoint.as_deref());
    let store = open_store(&config).await?;
    println!("{TABLE_HEADER}");
    let mut results = Vec::new();
    for &size in &a.sizes {
        for inflight in [1, a.inflight] {
            let (put, get) = probe(&store, size, inflight, a.duration).await?;
            println!("{}", put.table_row());
            println!("{}", get.table_row());
            results.push(put.to_json());
            results.push(get.to_json());
        }
    }
    write_json(
        a.json.as_deref(),
        &json!({ "workload": "objstore", "url": a.object_store, "results": results }),
    )
}
