//! `walden bench flush`: how fast sealed segments become Parquet, and whether the WAL stays
//! bounded behind them. The bench starts a standalone server, creates a collection, and keeps
//! inserters writing rows (an id, a float vector, a string) for `--duration`; every second it
//! reads the server's status and metrics. It reports rows inserted and flushed per second,
//! Parquet MiB/s written, the flush latency (a segment's Flush message to its manifest commit:
//! p50/p99 from the server's histogram), the flush lag seen in status, server CPU per row, and
//! WAL bytes over time beside the bytes written.

use std::sync::Arc;

use arrow_array::{
    ArrayRef, Int64Array, RecordBatch, StringArray, builder::FixedSizeListBuilder,
    builder::Float32Builder,
};
use walden_schema::Schema;

use super::*;

#[derive(clap::Args, Debug, Clone)]
pub struct FlushArgs {
    /// How long the inserters write.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    duration: Duration,
    /// Rows per second in all (0: as fast as the server takes them).
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Rows per insert call.
    #[arg(long, default_value_t = 500)]
    batch: usize,
    /// Inserters writing at once.
    #[arg(long, default_value_t = 4)]
    inserters: usize,
    /// Vector dimensions.
    #[arg(long, default_value_t = 128)]
    dim: usize,
    /// Collection shards (and server pchannels).
    #[arg(long, default_value_t = 4)]
    shards: u32,
    /// Rows per segment (`node.segment_max_rows`): small, so that segments seal within a run.
    #[arg(long, default_value_t = 50_000)]
    segment_rows: u64,
    /// Where the server keeps its data (default: a temp dir under `.`).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    #[arg(long)]
    json: Option<PathBuf>,
}

/// One row template's columns; ids change per batch.
fn batch_of(
    schema: &Schema,
    first_id: i64,
    rows: usize,
    dim: usize,
) -> anyhow::Result<RecordBatch> {
    let ids: ArrayRef = Arc::new(Int64Array::from_iter_values(
        first_id..first_id + rows as i64,
    ));
    let mut v = FixedSizeListBuilder::new(Float32Builder::with_capacity(rows * dim), dim as i32)
        .with_field(arrow_schema::Field::new(
            "item",
            arrow_schema::DataType::Float32,
            false,
        ));
    for r in 0..rows {
        for d in 0..dim {
            v.values()
                .append_value(((first_id as usize + r) * 31 + d) as f32 * 0.001);
        }
        v.append(true);
    }
    let titles: ArrayRef = Arc::new(StringArray::from_iter_values(
        (0..rows).map(|r| format!("row {}", first_id as usize + r)),
    ));
    let batch = RecordBatch::try_from_iter(vec![
        ("id", ids),
        ("emb", Arc::new(v.finish()) as ArrayRef),
        ("title", titles),
    ])?;
    Ok(schema.conform(&batch)?)
}

/// The machine's own limit for this work: rows of the same shape encoded to Parquet (Snappy,
/// as the flusher writes them) by one thread in this process, with no server, WAL or network.
/// Returns rows/s and Parquet MiB/s.
fn parquet_encode_limit(schema: &Schema, batch: usize, dim: usize) -> anyhow::Result<(f64, f64)> {
    let batches: Vec<RecordBatch> = (0..40)
        .map(|k| batch_of(schema, (k * batch) as i64, batch, dim))
        .collect::<anyhow::Result<_>>()?;
    let props = parquet::file::properties::WriterProperties::builder()
        .set_compression(parquet::basic::Compression::SNAPPY)
        .build();
    let started = Instant::now();
    let mut out = Vec::new();
    let mut w = parquet::arrow::ArrowWriter::try_new(&mut out, batches[0].schema(), Some(props))?;
    for b in &batches {
        w.write(b)?;
    }
    w.close()?;
    let s = started.elapsed().as_secs_f64();
    Ok((
        (40 * batch) as f64 / s,
        out.len() as f64 / (1 << 20) as f64 / s,
    ))
}

/// A sample of the server, every second.
#[derive(Clone, Copy, Debug, Default)]
struct Sample {
    t: f64,
    inserted_rows: u64,
    inserted_bytes: u64,
    wal_bytes: u64,
    flush_lag_ms: u64,
    flushed_rows: f64,
    flushed_bytes: f64,
}

fn metric_sum(body: &str, prefix: &str) -> f64 {
    body.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A quantile of a Prometheus histogram (`{le="..."}` buckets), by linear interpolation.
fn histogram_quantile(body: &str, name: &str, q: f64) -> Option<f64> {
    let mut buckets: Vec<(f64, f64)> = body
        .lines()
        .filter(|l| l.starts_with(&format!("{name}_bucket{{")))
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, l.rsplit(' ').next()?.parse().ok()?))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last()?.1;
    if total == 0.0 {
        return None;
    }
    let want = q * total;
    let (mut lo, mut below) = (0.0, 0.0);
    for (le, n) in buckets {
        if n >= want {
            if le.is_infinite() {
                return Some(lo);
            }
            let frac = if n > below {
                (want - below) / (n - below)
            } else {
                1.0
            };
            return Some(lo + (le - lo) * frac);
        }
        lo = le;
        below = n;
    }
    None
}

pub async fn run(a: FlushArgs) -> anyhow::Result<()> {
    let base = a.data_dir.clone().unwrap_or_else(|| PathBuf::from("."));
    std::fs::create_dir_all(&base).with_context(|| format!("creating {}", base.display()))?;
    let scratch = tempfile::Builder::new()
        .prefix("walden-bench-flush.")
        .tempdir_in(&base)?;
    let config = format!(
        "[node]\npchannels = {}\nsegment_max_rows = {}\n\
         [wal_local]\nsegment_bytes = {}\n\
         [wal.retention]\ntime_ms = 0\n",
        a.shards,
        a.segment_rows,
        16 << 20
    );
    let mut server = WaldenServer::start(&config, &scratch.path().join("data")).await?;
    let client = Client::connect(&server.addr).await?;
    let schema = Schema::from_json(&format!(
        r#"{{"fields":[{{"name":"id","type":"int64","primary_key":true}},
            {{"name":"emb","type":"float_vector","dim":{}}},
            {{"name":"title","type":"string"}}]}}"#,
        a.dim
    ))?;
    client
        .collections()
        .create("bench", &schema, a.shards)
        .await?;
    let (limit_rows, limit_mib) = parquet_encode_limit(&schema, a.batch, a.dim)?;
    let template_bytes = schema
        .encode_ipc(&batch_of(&schema, 0, a.batch, a.dim)?)?
        .len() as u64;
    let inserted = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let pid = server.pid().context("server pid")?;
    let cpu_before = cpu_seconds(&pid).unwrap_or(0.0);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..a.inserters {
        let (client, schema, inserted, stop) = (
            client.clone(),
            schema.clone(),
            inserted.clone(),
            stop.clone(),
        );
        let (batch, dim, rate, n) = (a.batch, a.dim, a.rate, a.inserters);
        tasks.push(tokio::spawn(async move {
            let api = client.collections();
            let mut k = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let first = ((k * n as u64 + w as u64) * batch as u64) as i64;
                k += 1;
                let b = batch_of(&schema, first, batch, dim)?;
                api.insert("bench", None, &[b]).await?;
                let done = inserted.fetch_add(batch as u64, Ordering::Relaxed) + batch as u64;
                if rate > 0 {
                    let due = Duration::from_secs_f64(done as f64 / rate as f64);
                    if let Some(wait) = due.checked_sub(started.elapsed()) {
                        tokio::time::sleep(wait).await;
                    }
                }
            }
            anyhow::Ok(())
        }));
    }
    let mut samples: Vec<Sample> = Vec::new();
    let sample =
        |t: f64, rows: u64, status: &walden_proto::v1::StatusResponse, body: &str| Sample {
            t,
            inserted_rows: rows,
            inserted_bytes: rows / a.batch.max(1) as u64 * template_bytes,
            wal_bytes: status.pchannels.iter().map(|p| p.wal_bytes).sum(),
            flush_lag_ms: status
                .pchannels
                .iter()
                .map(|p| p.flush_lag_ms)
                .max()
                .unwrap_or(0),
            flushed_rows: metric_sum(body, "walden_flush_rows_total"),
            flushed_bytes: metric_sum(body, "walden_flush_bytes_total"),
        };
    while started.elapsed() < a.duration {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let status = client.status().await?;
        let body = scrape(&server.metrics).await.unwrap_or_default();
        samples.push(sample(
            started.elapsed().as_secs_f64(),
            inserted.load(Ordering::Relaxed),
            &status,
            &body,
        ));
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await??;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let rows = inserted.load(Ordering::Relaxed);
    let cpu = cpu_seconds(&pid).unwrap_or(0.0) - cpu_before;
    // What the run flushed while it wrote, then what draining the rest takes.
    let body = scrape(&server.metrics).await.unwrap_or_default();
    let during = sample(elapsed, rows, &client.status().await?, &body);
    let drain_started = Instant::now();
    client
        .flush_and_wait("bench", Duration::from_secs(600))
        .await?;
    let drain_s = drain_started.elapsed().as_secs_f64();
    let body = scrape(&server.metrics).await.unwrap_or_default();
    let flushed_total = metric_sum(&body, "walden_flush_rows_total");
    let p50 = histogram_quantile(&body, "walden_flush_latency_seconds", 0.5);
    let p99 = histogram_quantile(&body, "walden_flush_latency_seconds", 0.99);
    let max_lag = samples.iter().map(|s| s.flush_lag_ms).max().unwrap_or(0);
    let max_wal = samples.iter().map(|s| s.wal_bytes).max().unwrap_or(0);
    let mib = |b: f64| b / (1 << 20) as f64;
    let report = json!({
        "workload": "flush",
        "duration_s": round(elapsed),
        "rows_inserted": rows,
        "insert_rows_per_s": round(rows as f64 / elapsed),
        "insert_mib_per_s": round(mib(during.inserted_bytes as f64) / elapsed),
        "rows_flushed_during_run": during.flushed_rows,
        "rows_flushed_total": flushed_total as u64,
        "flush_rows_per_s": round(during.flushed_rows / elapsed),
        "parquet_mib_per_s": round(mib(during.flushed_bytes) / elapsed),
        "flush_latency_p50_s": p50.map(round),
        "flush_latency_p99_s": p99.map(round),
        "flush_lag_max_ms": max_lag,
        "drain_after_run_s": round(drain_s),
        "wal_bytes_max": max_wal,
        "wal_bytes_end": during.wal_bytes,
        "server_cpu_us_per_row": round(cpu * 1e6 / rows.max(1) as f64),
        "parquet_encode_limit_rows_per_s": round(limit_rows),
        "parquet_encode_limit_mib_per_s": round(limit_mib),
        "flush_vs_encode_limit": round(during.flushed_rows / elapsed / limit_rows),
        "samples": samples.iter().map(|s| json!({
            "t": round(s.t),
            "inserted_rows": s.inserted_rows,
            "inserted_mib": round(mib(s.inserted_bytes as f64)),
            "wal_mib": round(mib(s.wal_bytes as f64)),
            "flushed_rows": s.flushed_rows,
            "flush_lag_ms": s.flush_lag_ms,
        })).collect::<Vec<_>>(),
    });
    println!(
        "flush: {} rows in {:.1} s ({:.0} rows/s, {:.1} MiB/s inserted); flushed {:.0} rows/s, \
         {:.1} MiB/s of Parquet; flush latency p50 {} p99 {}; lag max {} ms; drain {:.1} s; \
         WAL max {:.1} MiB, end {:.1} MiB (written {:.1} MiB); server CPU {:.1} us/row",
        rows,
        elapsed,
        rows as f64 / elapsed,
        mib(during.inserted_bytes as f64) / elapsed,
        during.flushed_rows / elapsed,
        mib(during.flushed_bytes) / elapsed,
        p50.map_or("-".into(), |v| format!("{:.2} s", v)),
        p99.map_or("-".into(), |v| format!("{:.2} s", v)),
        max_lag,
        drain_s,
        mib(max_wal as f64),
        mib(during.wal_bytes as f64),
        mib(during.inserted_bytes as f64),
        cpu * 1e6 / rows.max(1) as f64,
    );
    println!(
        "{:>6} {:>12} {:>10} {:>12} {:>10}",
        "t_s", "written_MiB", "wal_MiB", "flushed_rows", "lag_ms"
    );
    for s in &samples {
        println!(
            "{:>6.1} {:>12.1} {:>10.1} {:>12.0} {:>10}",
            s.t,
            mib(s.inserted_bytes as f64),
            mib(s.wal_bytes as f64),
            s.flushed_rows,
            s.flush_lag_ms
        );
    }
    write_json(a.json.as_deref(), &report)?;
    drop(server.child.take().map(|mut c| {
        let _ = c.kill();
        c.wait()
    }));
    Ok(())
}
