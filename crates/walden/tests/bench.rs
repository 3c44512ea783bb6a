//! `walden bench` as a user runs it, every workload (append, e2e, catchup, recovery, disk): a
//! real server and a real Redis started by the bench, and the JSON report's numbers checked
//! against each other (not against timings: those belong to the benchmark, not to the suite).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::{path::Path, process::Command};

use common::{Server, http_get, metric};
use serde_json::Value;

fn bench(args: &[&str], dir: &Path) -> Value {
    let json = dir.join("report.json");
    let out = Command::new(env!("CARGO_BIN_EXE_walden"))
        .arg("bench")
        .args(args)
        .arg("--data-dir")
        .arg(dir.join("data"))
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "walden bench {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&std::fs::read(json).unwrap()).unwrap()
}

fn f(v: &Value, path: &[&str]) -> f64 {
    let mut v = v;
    for p in path {
        v = &v[*p];
    }
    v.as_f64()
        .unwrap_or_else(|| panic!("{path:?} is not a number: {v}"))
}

/// Latency quantiles of one system are ordered and its rates agree with its counts.
fn check_system(report: &Value, name: &str, size: f64) {
    let s = &report[name];
    assert_eq!(f(s, &["errors"]), 0.0, "{name}: {s}");
    let msgs_per_s = f(s, &["msgs_per_s"]);
    assert!(msgs_per_s > 0.0, "{name} acknowledged nothing: {s}");
    let mib = f(s, &["mib_per_s"]);
    let expected = msgs_per_s * size / (1u64 << 20) as f64;
    assert!(
        (mib - expected).abs() <= expected * 0.01 + 0.01,
        "{name}: {mib} MiB/s from {msgs_per_s} msg/s of {size} B"
    );
    let q = |k: &str| f(s, &["latency_ms", k]);
    assert!(
        0.0 < q("p50") && q("p50") <= q("p99") && q("p99") <= q("p999") && q("p999") <= q("max"),
        "{name}: quantiles out of order: {}",
        s["latency_ms"]
    );
}

#[test]
fn append_reports_walden_redis_and_the_disk_limit_with_consistent_ratios() {
    let dir = tempfile::tempdir().unwrap();
    let report = bench(
        &[
            "append",
            "--pchannels",
            "2",
            "--inflight",
            "8",
            "--size",
            "512",
            "--duration",
            "1s",
            "--warmup",
            "300ms",
            "--peer",
            "redis",
        ],
        dir.path(),
    );
    assert_eq!(report["workload"], "append");
    assert_eq!(f(&report, &["params", "warmup_s"]), 0.3);
    check_system(&report, "walden", 512.0);
    check_system(&report, "redis", 512.0);

    let (w, r) = (
        f(&report, &["walden", "msgs_per_s"]),
        f(&report, &["redis", "msgs_per_s"]),
    );
    let ratio = f(&report, &["ratio_to_peer"]);
    assert!(
        (ratio - w / r).abs() <= 0.01 * ratio + 0.001,
        "ratio_to_peer {ratio} is not walden/redis = {w}/{r}"
    );
    let to_disk = f(&report, &["ratio_to_disk"]);
    let disk = f(&report, &["disk", "mib_per_s"]);
    let wmib = f(&report, &["walden", "mib_per_s"]);
    assert!(
        (to_disk - wmib / disk).abs() <= 0.01 * to_disk + 0.001,
        "ratio_to_disk {to_disk} is not {wmib}/{disk}"
    );
    // Group commit: never more than one fsync per acknowledged message, and the disk probe
    // writes what Walden wrote per fsync.
    let per_msg = f(&report, &["walden", "fsyncs_per_msg"]);
    assert!(
        per_msg > 0.0 && per_msg <= 1.0,
        "fsyncs per message {per_msg}"
    );
    let write = f(&report, &["disk", "write_bytes"]);
    let fsyncs = f(&report, &["walden", "fsyncs"]);
    let msgs = f(&report, &["walden", "msgs"]);
    assert!(
        write >= 512.0 && write <= (msgs * 512.0 / fsyncs).max(512.0) * 1.5,
        "the disk probe wrote {write} B per sync; Walden wrote {} B of payload per fsync",
        msgs * 512.0 / fsyncs
    );
    // The node's own share: enqueue to durable, within what the client saw end to end, and one
    // group commit per `commit_interval_ms` of the run.
    let node = f(&report, &["walden", "node_append_ms_mean"]);
    assert!(
        node > 0.0 && node <= f(&report, &["walden", "latency_ms", "max"]),
        "enqueue to durable {node} ms"
    );
    let interval = f(&report, &["walden", "commit_interval_ms"]);
    let expected = msgs / w * 1000.0 / fsyncs;
    assert!(
        (interval - expected).abs() <= expected * 0.02 + 0.001,
        "a commit every {interval} ms, but {fsyncs} fsyncs in {} ms",
        msgs / w * 1000.0
    );
    // CPU of the server the bench started (from /proc) and of the bench's own client.
    for name in ["walden", "redis"] {
        assert!(
            f(&report, &[name, "cpu_server_s"]) > 0.0,
            "{name}: {}",
            report[name]
        );
        assert!(
            f(&report, &[name, "cpu_client_s"]) > 0.0,
            "{name}: {}",
            report[name]
        );
    }
    let runs = &report["runs"]["walden"];
    assert_eq!(runs.as_array().map(Vec::len), Some(1), "{runs}");
}

#[test]
fn a_fixed_rate_run_sends_on_schedule_and_reports_how_late_the_sender_was() {
    let dir = tempfile::tempdir().unwrap();
    let report = bench(
        &[
            "e2e",
            "--pchannels",
            "2",
            "--rate",
            "400",
            "--duration",
            "1s",
            "--warmup",
            "0s",
        ],
        dir.path(),
    );
    assert_eq!(report["workload"], "e2e");
    check_system(&report, "walden", 1024.0);
    // At a fixed rate the number sent follows the schedule, not the server's speed.
    let msgs = f(&report, &["walden", "msgs"]);
    assert!(
        (300.0..=500.0).contains(&msgs),
        "{msgs} messages at 400/s for 1 s"
    );
    // Latency counts from the intended send time, so it holds the sender's own lateness: each
    // message's latency is at least its lateness, and so is every quantile.
    for q in ["p50", "p99"] {
        let late = f(&report, &["walden", "sender_lateness_ms", q]);
        let latency = f(&report, &["walden", "latency_ms", q]);
        assert!(
            late <= latency,
            "{q}: sent {late} ms late, delivered {latency} ms after"
        );
    }
}

/// At a fixed rate with a window far larger than what is ever in flight, an acknowledgement is
/// timed when it arrives. Read only once the window was full (as the bench once did), each
/// one's latency was the window's length: 1 000 × 5 ms = 5 s here, whatever the server did.
#[test]
fn a_fixed_rate_append_times_each_acknowledgement_when_it_arrives_not_when_the_window_fills() {
    let dir = tempfile::tempdir().unwrap();
    let (rate, producers, inflight) = (400.0, 2.0, 2000.0);
    let report = bench(
        &[
            "append",
            "--pchannels",
            "2",
            "--rate",
            "400",
            "--inflight",
            "2000",
            "--duration",
            "2s",
            "--warmup",
            "0s",
            "--peer",
            "redis",
        ],
        dir.path(),
    );
    let window_ms = inflight / producers * (producers / rate) * 1000.0;
    for system in ["walden", "redis"] {
        check_system(&report, system, 1024.0);
        let msgs = f(&report, &[system, "msgs"]);
        assert!((700.0..=900.0).contains(&msgs), "{system}: {msgs} messages");
        let p50 = f(&report, &[system, "latency_ms", "p50"]);
        assert!(
            p50 < window_ms / 10.0,
            "{system}: p50 {p50} ms, near the window's {window_ms} ms"
        );
    }
}

/// With one message in flight the report adds the loopback round trip to the disk's sync (the
/// floor an acknowledgement cannot beat); with more in flight it has no such line.
#[test]
fn one_append_in_flight_is_reported_against_disk_sync_plus_loopback_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let args = |inflight: &'static str| {
        [
            "append",
            "--pchannels",
            "1",
            "--inflight",
            inflight,
            "--duration",
            "1s",
            "--warmup",
            "0s",
        ]
    };
    let report = bench(&args("1"), dir.path());
    check_system(&report, "walden", 1024.0);
    let rtt = |q: &str| f(&report, &["loopback_rtt_ms", q]);
    assert!(
        0.0 < rtt("p50") && rtt("p50") <= rtt("p99"),
        "{}",
        report["loopback_rtt_ms"]
    );
    // An acknowledgement needs a sync and a round trip: no message beats their sum's p50 by
    // much (the probe's own p50 is not a minimum, hence the margin).
    let floor = f(&report, &["disk", "latency_ms", "p50"]) + rtt("p50");
    let walden = f(&report, &["walden", "latency_ms", "p50"]);
    assert!(
        walden > floor / 2.0,
        "p50 {walden} ms under half the floor {floor} ms"
    );
    let many = bench(&args("8"), dir.path());
    assert!(
        many["loopback_rtt_ms"].is_null(),
        "{}",
        many["loopback_rtt_ms"]
    );
}

#[test]
fn catchup_reads_back_exactly_the_preload_from_walden_and_redis() {
    let dir = tempfile::tempdir().unwrap();
    let report = bench(
        &[
            "catchup",
            "--pchannels",
            "2",
            "--preload-mib",
            "2",
            "--peer",
            "redis",
        ],
        dir.path(),
    );
    assert_eq!(report["workload"], "catchup");
    // 2 MiB of 1 KiB messages over 2 pchannels, each read back from the start.
    for name in ["walden", "redis"] {
        check_system(&report, name, 1024.0);
        assert_eq!(f(&report, &[name, "msgs"]), 2048.0, "{name}");
    }
}

#[test]
fn recovery_reports_the_time_to_ready_after_a_kill() {
    let dir = tempfile::tempdir().unwrap();
    let report = bench(
        &["recovery", "--pchannels", "2", "--preload-mib", "2"],
        dir.path(),
    );
    assert_eq!(report["workload"], "recovery");
    let ready = f(&report, &["walden", "latency_ms", "p50"]);
    assert!(ready > 0.0 && ready < 60_000.0, "ready after {ready} ms");
    assert_eq!(f(&report, &["walden", "errors"]), 0.0);
}

#[test]
fn the_disk_probe_reports_its_write_size_and_a_rate_that_agrees_with_its_bandwidth() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("disk.json");
    let out = Command::new(env!("CARGO_BIN_EXE_walden"))
        .args(["bench", "disk", "--size", "4096", "--duration", "300ms"])
        .arg("--dir")
        .arg(dir.path())
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&std::fs::read(json).unwrap()).unwrap();
    assert_eq!(report["workload"], "disk");
    let disk = &report["disk"];
    assert_eq!(f(disk, &["write_bytes"]), 4096.0, "{report}");
    let per_s = f(disk, &["syncs_per_s"]);
    let mib = f(disk, &["mib_per_s"]);
    assert!(per_s > 0.0, "{report}");
    assert!(
        (mib - per_s * 4096.0 / (1u64 << 20) as f64).abs() <= mib * 0.01 + 0.01,
        "{mib} MiB/s from {per_s} syncs/s of 4 KiB"
    );
}

/// `--addr` targets a server someone else runs: the bench's messages land there (its own
/// metrics count them), and what only a server the bench started can give (its CPU from
/// `/proc`, its fsync count) is reported as unknown, not made up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn append_against_a_running_server_lands_there_and_reports_no_server_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(
        &dir.path().join("data"),
        Some("[node]\npchannels = 2\n"),
        true,
    )
    .await;
    let metrics = server.metrics_addr.clone().unwrap();
    let acked = async || {
        metric(
            &http_get(&metrics, "/metrics").await.1,
            "walden_ack_latency_seconds_count",
        )
    };
    let before = acked().await;
    let addr = server.addr.clone();
    let out_dir = dir.path().to_owned();
    let report = tokio::task::spawn_blocking(move || {
        bench(
            &[
                "append",
                "--addr",
                &addr,
                "--pchannels",
                "2",
                "--inflight",
                "8",
                "--duration",
                "500ms",
                "--warmup",
                "0s",
            ],
            &out_dir,
        )
    })
    .await
    .unwrap();
    check_system(&report, "walden", 1024.0);
    let msgs = f(&report, &["walden", "msgs"]);
    let landed = acked().await - before;
    assert!(
        landed >= msgs,
        "the server acknowledged {landed} appends, the bench counted {msgs}"
    );
    assert!(report["walden"]["cpu_server_s"].is_null(), "{report}");
    assert!(report["walden"]["fsyncs"].is_null(), "{report}");
}

/// On the object WAL (`file://` here), an append report carries the store's own limit at the
/// fragment size the node wrote, and its ratio agrees with the two numbers it is made of.
#[test]
fn object_wal_append_is_set_beside_the_store_limit_with_a_consistent_ratio() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    std::fs::create_dir(&store).unwrap();
    let url = format!("file://{}", store.display());
    let report = bench(
        &[
            "append",
            "--pchannels",
            "1",
            "--inflight",
            "1",
            "--duration",
            "1s",
            "--warmup",
            "0s",
            "--wal-storage",
            "object",
            "--object-store",
            &url,
        ],
        dir.path(),
    );
    check_system(&report, "walden", 1024.0);
    let probe = &report["objstore"];
    assert_eq!(probe["op"], "put", "{probe}");
    assert_eq!(f(probe, &["inflight"]), 1.0);
    // Fragments of one 1 KiB message (and a header) each.
    let size = f(probe, &["size"]);
    assert!((1024.0..2048.0).contains(&size), "{probe}");
    let ratio = f(&report, &["ratio_to_objstore", "ratio"]);
    let expected = f(&report, &["walden", "latency_ms", "p50"]) / f(probe, &["latency_ms", "p50"]);
    assert!(
        (ratio - expected).abs() <= expected * 0.01 + 0.01,
        "{ratio} vs {expected}"
    );
    assert!(report["disk"].is_null(), "no disk limit for the object WAL");

    // `bench objstore` alone: a PUT and a GET row per size and concurrency.
    let json = dir.path().join("objstore.json");
    let out = Command::new(env!("CARGO_BIN_EXE_walden"))
        .args(["bench", "objstore", "--object-store", &url])
        .args([
            "--sizes",
            "1024,65536",
            "--inflight",
            "4",
            "--duration",
            "200ms",
            "--json",
        ])
        .arg(&json)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_slice(&std::fs::read(json).unwrap()).unwrap();
    let rows = r["results"].as_array().unwrap();
    assert_eq!(rows.len(), 8, "{r}");
    for row in rows {
        assert!(f(row, &["ops_per_s"]) > 0.0, "{row}");
    }
    // It leaves nothing behind, and says so.
    assert!(String::from_utf8_lossy(&out.stderr).contains("deleted"));
    let left: Vec<_> = walk(&store);
    assert!(left.is_empty(), "probe objects left: {left:?}");
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else if p.to_string_lossy().contains("bench-probe") {
            out.push(p);
        }
    }
    out
}

/// `walden bench failover` starts its own cluster and reports one sample per planned move and
/// one per pchannel of each killed node, every one of them positive.
#[test]
fn failover_reports_a_sample_for_every_move_and_every_pchannel_of_a_killed_node() {
    let dir = tempfile::tempdir().unwrap();
    let report = bench(
        &[
            "failover",
            "--nodes",
            "2",
            "--pchannels",
            "4",
            "--moves",
            "10",
            "--kills",
            "1",
            "--lease-ttl-ms",
            "2000",
        ],
        dir.path(),
    );
    let planned = report["planned_ms"].as_array().unwrap();
    let crash = report["crash_ms"].as_array().unwrap();
    assert_eq!(planned.len(), 10);
    // Two nodes share four pchannels evenly: the killed one held two.
    assert_eq!(crash.len(), 2, "{report}");
    for v in planned.iter().chain(crash) {
        assert!(v.as_f64().unwrap() > 0.0, "{report}");
    }
    // A crash is noticed only when the lease ends: no sample can be shorter than that.
    for v in crash {
        assert!(
            v.as_f64().unwrap() >= 1000.0,
            "crash sample below the lease: {report}"
        );
    }
    assert!(report["appends"].as_u64().unwrap() > 0);
}

/// `walden bench flush` starts a server, inserts for the run, and reports what it flushed: every
/// inserted row is flushed by the end (the drain), the Parquet rate is positive, and the WAL
/// samples are over the run.
#[test]
fn flush_reports_rows_and_parquet_rates_beside_the_encode_limit_and_the_wal_over_time() {
    let dir = tempfile::tempdir().unwrap();
    let report = bench(
        &[
            "flush",
            "--duration",
            "3s",
            "--dim",
            "8",
            "--batch",
            "200",
            "--inserters",
            "2",
            "--shards",
            "2",
            "--segment-rows",
            "2000",
        ],
        dir.path(),
    );
    let rows = report["rows_inserted"].as_u64().unwrap();
    assert!(rows > 0, "{report}");
    assert_eq!(
        report["rows_flushed_total"].as_u64(),
        Some(rows),
        "{report}"
    );
    assert!(f(&report, &["parquet_mib_per_s"]) > 0.0, "{report}");
    assert!(
        f(&report, &["parquet_encode_limit_rows_per_s"]) > 0.0,
        "{report}"
    );
    let samples = report["samples"].as_array().unwrap();
    assert!(samples.len() >= 2, "{report}");
    assert!(samples.iter().all(|s| s["wal_mib"].as_f64().is_some()));
}

#[test]
fn search_reports_growing_and_indexed_latency_and_qps_at_recall_against_brute_force() {
    let dir = tempfile::tempdir().unwrap();
    let report = bench(
        &[
            "search",
            "--rows",
            "3000",
            "--dim",
            "16",
            "--clusters",
            "10",
            "--queries",
            "20",
            "--batch",
            "500",
            "--qps-duration",
            "1s",
        ],
        dir.path(),
    );
    let walden = &report["systems"][0];
    assert_eq!(walden["system"], "walden", "{report}");
    assert!(f(walden, &["insert_rows_per_s"]) > 0.0, "{report}");
    // Growing rows are searched exactly: the bench's own brute force agrees.
    assert_eq!(f(walden, &["growing", "recall"]), 1.0, "{report}");
    assert!(f(walden, &["growing", "p50_ms"]) > 0.0, "{report}");
    assert!(f(walden, &["indexed", "recall"]) >= 0.95, "{report}");
    assert!(f(walden, &["indexed", "qps"]) > 0.0, "{report}");
    assert!(f(walden, &["index_build_s"]) > 0.0, "{report}");
}
