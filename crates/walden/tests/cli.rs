//! The CLI as a user runs it (the README quick start): produce, consume, status, exit codes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::{
    collections::HashMap,
    io::Write,
    process::{Command, Output, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use common::{Server, WALDEN};
use serde_json::Value;

fn walden(args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(WALDEN)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn json_lines(out: &Output) -> Vec<Value> {
    assert!(
        out.status.success(),
        "walden failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_quick_start_commands_produce_consume_and_report_status() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), None).await;
    let a = server.addr.as_str();

    let produced = json_lines(&walden(
        &[
            "produce",
            "--pchannel",
            "walden-dml-3",
            "--vchannel",
            "orders",
            "--json",
            "--addr",
            a,
        ],
        "first\nsecond\nthird\n",
    ));
    assert_eq!(produced.len(), 3);
    let payloads: Vec<_> = produced
        .iter()
        .map(|v| v["payload"].as_str().unwrap())
        .collect();
    assert_eq!(
        payloads,
        ["first", "second", "third"],
        "acknowledged in the order sent"
    );
    let ids: Vec<u64> = produced
        .iter()
        .map(|v| v["message_id"].as_u64().unwrap())
        .collect();
    let ticks: Vec<u64> = produced
        .iter()
        .map(|v| v["time_tick"].as_u64().unwrap())
        .collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]) && ticks.windows(2).all(|w| w[0] < w[1]));
    assert!(produced.iter().all(|v| v["vchannel"] == "orders"));

    let consumed = json_lines(&walden(
        &[
            "consume",
            "--pchannel",
            "walden-dml-3",
            "--json",
            "--idle-exit",
            "1",
            "--addr",
            a,
        ],
        "",
    ));
    let data: Vec<_> = consumed.iter().filter(|v| v["type"] == "Data").collect();
    assert_eq!(
        consumed.len(),
        data.len(),
        "TimeTicks only with --show-ticks"
    );
    assert_eq!(
        data.iter()
            .map(|v| v["message_id"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        ids
    );
    assert_eq!(data[2]["payload"], "third");

    let after = json_lines(&walden(
        &[
            "consume",
            "--pchannel",
            "walden-dml-3",
            "--json",
            "--idle-exit",
            "1",
            "--from",
            &format!("after:{}", ids[0]),
            "--addr",
            a,
        ],
        "",
    ));
    assert_eq!(
        after
            .iter()
            .map(|v| v["payload"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ["second", "third"]
    );
    let limited = json_lines(&walden(
        &[
            "consume",
            "--pchannel",
            "walden-dml-3",
            "--json",
            "--show-ticks",
            "--limit",
            "2",
            "--addr",
            a,
        ],
        "",
    ));
    assert_eq!(limited.len(), 2);
    assert_eq!(
        limited[0]["type"], "TimeTick",
        "the fence tick opens every pchannel"
    );

    let status = json_lines(&walden(&["status", "--json", "--addr", a], ""));
    let pchannels = status[0]["pchannels"].as_array().unwrap();
    assert_eq!(pchannels.len(), 16);
    let p3 = pchannels
        .iter()
        .find(|p| p["name"] == "walden-dml-3")
        .unwrap();
    assert!(p3["term"].as_u64().unwrap() >= 1);
    assert!(p3["last_time_tick"].as_u64().unwrap() >= ticks[2]);
    assert!(p3["wal_bytes"].as_u64().unwrap() > 0);

    // Failures: non-zero exit and one line on stderr.
    let bad = walden(
        &[
            "produce",
            "--pchannel",
            "nope",
            "--vchannel",
            "v",
            "--retry-timeout",
            "0",
            "--addr",
            a,
        ],
        "x\n",
    );
    assert!(!bad.status.success());
    let err = String::from_utf8(bad.stderr).unwrap();
    assert_eq!(err.trim_end().lines().count(), 1, "one-line error: {err}");
    assert!(err.contains("CHANNEL_NOT_FOUND"), "{err}");
    let bad = walden(
        &[
            "consume",
            "--pchannel",
            "p",
            "--from",
            "sideways",
            "--addr",
            a,
        ],
        "",
    );
    assert!(!bad.status.success());
    assert!(
        String::from_utf8(bad.stderr)
            .unwrap()
            .contains("--from must be")
    );
}

/// The README's quick-start blocks, run verbatim (bar the line naming the binary) against a
/// fresh server: the commands a new user copies must work as written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_quick_start_blocks_run_as_written() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md")).unwrap();
    let quick_start = &readme[readme.find("## Quick start").unwrap()..];
    let blocks: Vec<&str> = quick_start
        .split("```sh\n")
        .skip(1)
        .take(2)
        .map(|b| &b[..b.find("\n```").unwrap()])
        .collect();
    assert_eq!(
        blocks.len(),
        2,
        "the produce/consume block and the collections block"
    );
    let script: String = blocks
        .iter()
        .flat_map(|b| b.lines())
        .filter(|l| !l.starts_with("W="))
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(script.contains("$W collection create"), "{script}");

    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), None).await;
    let out = Command::new("bash")
        .args(["-euo", "pipefail", "-c", &script])
        .current_dir(dir.path())
        .env("W", WALDEN)
        .env("WALDEN_ADDR", &server.addr)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "README commands failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    for expected in [
        r#""inserted":2"#,
        r#""type":"CreateCollection""#,
        r#""type":"Insert""#,
    ] {
        assert!(
            stdout.contains(expected),
            "{expected} missing from:\n{stdout}"
        );
    }
}

/// A refused line in the middle of the input: every line the server acknowledged is printed in
/// input order, the refused one is reported with its line number and code, nothing after it is
/// hidden, and the exit code says that a line failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produce_prints_every_acknowledged_line_and_names_the_refused_one() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), None).await;
    let a = server.addr.as_str();
    let mut input = String::from("line-1\nline-2\n");
    input.push_str(&"x".repeat(9 << 20));
    input.push('\n');
    for i in 3..=50 {
        input.push_str(&format!("line-{i}\n"));
    }
    let out = walden(
        &[
            "produce",
            "--pchannel",
            "walden-dml-1",
            "--vchannel",
            "v",
            "--json",
            "--addr",
            a,
        ],
        &input,
    );
    assert!(
        !out.status.success(),
        "a refused line must fail the command"
    );
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains("line 3") && stderr.contains("MESSAGE_TOO_LARGE(5)"),
        "{stderr}"
    );
    assert!(
        stderr.contains("1 of 51 lines were not written"),
        "{stderr}"
    );
    let printed: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(printed.len(), 51, "one output line per input line");
    let lines: Vec<u64> = printed
        .iter()
        .map(|v| v["line"].as_u64().unwrap())
        .collect();
    assert_eq!(lines, (1..=51).collect::<Vec<_>>(), "in input order");
    assert_eq!(printed[2]["error"]["name"], "MESSAGE_TOO_LARGE");
    let acked: Vec<&str> = printed
        .iter()
        .filter_map(|v| v["payload"].as_str())
        .collect();
    let expected: Vec<String> = (1..=50).map(|i| format!("line-{i}")).collect();
    assert_eq!(acked, expected);

    // What was printed as written is exactly what the WAL holds.
    let consumed = json_lines(&walden(
        &[
            "consume",
            "--pchannel",
            "walden-dml-1",
            "--json",
            "--idle-exit",
            "1",
            "--addr",
            a,
        ],
        "",
    ));
    let stored: Vec<&str> = consumed
        .iter()
        .map(|v| v["payload"].as_str().unwrap())
        .collect();
    assert_eq!(stored, expected);
}

/// A 200 MiB line: MESSAGE_TOO_LARGE (not INVALID_ARGUMENT from a refused frame), skipped as it
/// is read rather than held, and the line after it is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_200_mib_line_is_too_large_and_the_next_line_is_still_written() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), Some("[node]\npchannels = 1\n")).await;
    let mut child = Command::new(WALDEN)
        .args([
            "produce",
            "--pchannel",
            "walden-dml-0",
            "--vchannel",
            "v",
            "--json",
            "--addr",
            &server.addr,
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || {
        let chunk = vec![b'z'; 1 << 20];
        for _ in 0..200 {
            stdin.write_all(&chunk).unwrap();
        }
        stdin.write_all(b"\nafter\n").unwrap();
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("line 1") && stderr.contains("MESSAGE_TOO_LARGE(5)"),
        "{stderr}"
    );
    assert!(stderr.contains(&format!("{} bytes", 200 << 20)), "{stderr}");
    let printed: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(printed.len(), 2);
    assert_eq!(printed[0]["error"]["name"], "MESSAGE_TOO_LARGE");
    assert_eq!(printed[1]["payload"], "after");
    assert_eq!(printed[1]["line"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produce_into_a_server_killed_for_good_ends_within_its_retry_window_and_names_every_line() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(&dir.path().join("data"), None).await;
    let addr = server.addr.clone();
    let pid = server.pid().unwrap().to_string();
    // 2 000 lines with a 5 s retry window: one window for the outage, not one per line.
    let run = tokio::task::spawn_blocking(move || {
        common::produce_through(
            &[
                "--pchannel",
                "walden-dml-0",
                "--vchannel",
                "v",
                "--addr",
                &addr,
                "--retry-timeout",
                "5",
            ],
            "k",
            2000,
            300,
            Duration::from_secs(60),
            || {
                let killed = Command::new("kill").args(["-9", &pid]).status().unwrap();
                assert!(killed.success());
            },
        )
    })
    .await
    .unwrap();
    common::assert_ended_honestly(&run, 2000, Duration::from_secs(10), "server killed");
    // Nothing acknowledged is lost or doubled.
    server.kill();
    server.restart().await;
    let client = server.client().await;
    let mut stored: HashMap<String, usize> = HashMap::new();
    for m in common::read_to_end(&client, "walden-dml-0").await {
        if m.message_type() == walden_message::MessageType::Data {
            *stored
                .entry(String::from_utf8_lossy(&m.payload).into_owned())
                .or_default() += 1;
        }
    }
    let acked = run.acknowledged();
    assert!(acked.len() >= 300);
    for p in &acked {
        assert_eq!(stored.get(p), Some(&1), "acknowledged {p} stored once");
    }
    assert!(stored.values().all(|n| *n == 1), "nothing stored twice");
    for p in run.not_written() {
        assert!(
            !stored.contains_key(&p),
            "{p} reported not written is not stored"
        );
    }
}

/// `walden insert` of a file cut into many messages, the server killed for good while they are
/// in flight: the command ends within its retry window, prints how many rows were written and
/// which keys were not, and the log holds every key reported written exactly once and nothing
/// twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_insert_cut_by_a_server_killed_for_good_ends_within_its_retry_window_and_names_the_rest()
{
    use arrow_array::{
        ArrayRef, Int64Array, RecordBatch, StringArray,
        builder::{FixedSizeListBuilder, Float32Builder},
    };
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(&dir.path().join("data"), None).await;
    let addr = server.addr.clone();
    let schema_file = dir.path().join("schema.json");
    std::fs::write(
        &schema_file,
        r#"{"fields":[{"name":"id","type":"int64","primary_key":true},
            {"name":"emb","type":"float_vector","dim":4},
            {"name":"title","type":"string"}]}"#,
    )
    .unwrap();
    common::ok_json(&[
        "collection",
        "create",
        "big",
        "--schema",
        schema_file.to_str().unwrap(),
        "--shards",
        "2",
        "--json",
        "--addr",
        &addr,
    ]);
    // 24 000 rows of 4 KiB: about 48 messages of 2 MiB, many in flight at the kill.
    const ROWS: i64 = 24_000;
    let schema =
        walden_schema::Schema::from_json(&std::fs::read_to_string(&schema_file).unwrap()).unwrap();
    let mut emb = FixedSizeListBuilder::new(Float32Builder::new(), 4).with_field(Arc::new(
        arrow_schema::Field::new("item", arrow_schema::DataType::Float32, false),
    ));
    for _ in 0..ROWS {
        emb.values().append_slice(&[0.0, 0.1, 0.2, 0.3]);
        emb.append(true);
    }
    let title = "t".repeat(4096);
    let batch = RecordBatch::try_from_iter([
        (
            "id",
            Arc::new(Int64Array::from_iter_values(0..ROWS)) as ArrayRef,
        ),
        ("emb", Arc::new(emb.finish()) as ArrayRef),
        (
            "title",
            Arc::new(StringArray::from_iter_values((0..ROWS).map(|_| &title))) as ArrayRef,
        ),
    ])
    .unwrap();
    let batch = schema.conform(&batch).unwrap();
    let file = dir.path().join("rows.arrow");
    let mut w = arrow_ipc::writer::FileWriter::try_new(
        std::fs::File::create(&file).unwrap(),
        &batch.schema(),
    )
    .unwrap();
    w.write(&batch).unwrap();
    w.finish().unwrap();

    let status = |client: walden_client::Client| async move {
        let s = client.status().await.unwrap();
        s.pchannels.iter().map(|p| p.last_message_id).sum::<u64>()
    };
    let before = status(server.client().await).await;
    let started = Instant::now();
    let insert = Command::new(WALDEN)
        .args(["insert", "--collection", "big", "--file"])
        .arg(&file)
        .args(["--json", "--retry-timeout", "5", "--addr", &addr])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Kill once a few of its messages are in the log, so that the rest are in flight or queued.
    let client = server.client().await;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if status(client.clone()).await >= before + 4 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the insert wrote nothing in 120 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.kill();
    let killed = Instant::now();
    let out = tokio::task::spawn_blocking(move || insert.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let after_kill = killed.elapsed();
    eprintln!(
        "insert started {:?} before the kill, ended {after_kill:?} after",
        killed - started
    );
    assert!(
        after_kill < Duration::from_secs(5 + 5),
        "ended {after_kill:?} after the kill (retry window 5 s)"
    );
    assert!(!out.status.success(), "an insert written in part fails");
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "one JSON document ({e}): {} / {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let written = doc["inserted"].as_u64().unwrap();
    let keys = |field: &str| -> Vec<i64> {
        doc[field]
            .as_array()
            .unwrap_or_else(|| panic!("{field} in {doc}"))
            .iter()
            .map(|k| k.as_str().unwrap().parse().unwrap())
            .collect()
    };
    let (not_written, in_doubt) = (keys("not_written"), keys("in_doubt"));
    assert!(written > 0, "some rows were written before the kill: {doc}");
    assert!(
        !not_written.is_empty() || !in_doubt.is_empty(),
        "the kill cut the insert: {doc}"
    );
    assert_eq!(
        written + (not_written.len() + in_doubt.len()) as u64,
        ROWS as u64,
        "every row is accounted for once"
    );
    assert!(
        doc["error"]["name"].as_str().is_some(),
        "the last error is named: {doc}"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not written"), "{err}");

    // What the log holds: every key reported written once, no key reported not written, and
    // nothing twice; keys in doubt may be there (once) or not.
    server.restart().await;
    let client = server.client().await;
    let mut stored: HashMap<i64, usize> = HashMap::new();
    for p in 0..2 {
        for m in common::read_to_end(&client, &format!("walden-dml-{p}")).await {
            if m.message_type() != walden_message::MessageType::Insert {
                continue;
            }
            for b in walden_schema::decode_ipc(&m.payload).unwrap() {
                let ids = b
                    .column(0)
                    .as_any()
                    .downcast_ref::<Int64Array>()
                    .unwrap()
                    .clone();
                for id in ids.values() {
                    *stored.entry(*id).or_default() += 1;
                }
            }
        }
    }
    assert!(stored.values().all(|n| *n == 1), "nothing stored twice");
    let unacknowledged: std::collections::HashSet<i64> =
        not_written.iter().chain(&in_doubt).copied().collect();
    for k in (0..ROWS).filter(|k| !unacknowledged.contains(k)) {
        assert_eq!(
            stored.get(&k),
            Some(&1),
            "key {k} reported written is stored once"
        );
    }
    let lied = not_written
        .iter()
        .filter(|k| stored.contains_key(k))
        .count();
    let doubt_stored = in_doubt.iter().filter(|k| stored.contains_key(k)).count();
    eprintln!(
        "{written} rows reported written, {} not written, {} in doubt ({doubt_stored} of them stored)",
        not_written.len(),
        in_doubt.len(),
    );
    assert_eq!(lied, 0, "keys reported not written are not in the log");
}
