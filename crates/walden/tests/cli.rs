//! The CLI as a user runs it (the README quick start): produce, consume, status, exit codes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::{
    collections::HashMap,
    io::Write,
    process::{Command, Output, Stdio},
    time::Duration,
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
}
