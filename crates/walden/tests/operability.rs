//! What an operator relies on: Prometheus metrics, the health endpoint, gRPC reflection, and a
//! clean shutdown on SIGTERM.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use bytes::Bytes;
use common::{Server, http_get, metric};
use tonic_reflection::pb::v1::{
    ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
    server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
};
use walden_client::ProducerOptions;
use walden_message::{MessageType, MutableMessage};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_health_and_reflection_describe_a_serving_node() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start_with(
        &dir.path().join("data"),
        Some("[node]\npchannels = 2\n"),
        true,
    )
    .await;
    let http = server.metrics_addr.clone().unwrap();

    let (code, body) = http_get(&http, "/healthz").await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("2 pchannels"));

    let client = server.client().await;
    let p = client.producer("walden-dml-1", ProducerOptions::default());
    for i in 0..10 {
        let m = MutableMessage::new(MessageType::Data, "v", Bytes::from(vec![b'x'; 100 + i]));
        p.append(m).await.unwrap();
    }
    let (code, body) = http_get(&http, "/metrics").await;
    assert_eq!(code, 200);
    assert_eq!(
        metric(
            &body,
            "walden_appended_messages_total{pchannel=\"walden-dml-1\",type=\"Data\"}"
        ),
        10.0
    );
    assert_eq!(
        metric(
            &body,
            "walden_appended_bytes_total{pchannel=\"walden-dml-1\"}"
        ),
        (100..110).sum::<usize>() as f64
    );
    assert!(metric(&body, "walden_append_latency_seconds_count") >= 10.0);
    assert!(metric(&body, "walden_ack_latency_seconds_count") >= 10.0);
    assert!(metric(&body, "walden_wal_syncs{pchannel=\"walden-dml-1\"}") >= 1.0);
    assert!(
        metric(
            &body,
            "walden_write_ahead_buffer_messages{pchannel=\"walden-dml-1\"}"
        ) >= 10.0
    );
    assert!(body.contains("walden_consumer_lag_messages"));

    // Reflection: a generic gRPC tool can discover the service.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut reflection = ServerReflectionClient::new(channel);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = reflection
        .server_reflection_info(futures::stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    let resp = common::within(stream.message()).await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
        panic!("unexpected reflection answer: {resp:?}");
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    assert!(names.contains(&"walden.v1.StreamingNode"), "{names:?}");

    // SIGTERM: a clean exit, and everything acknowledged is there on restart.
    let status = server.stop();
    assert!(status.success(), "exit on SIGTERM: {status}");
    server.restart().await;
    let s = server.client().await.status().await.unwrap();
    let p1 = s
        .pchannels
        .iter()
        .find(|p| p.name == "walden-dml-1")
        .unwrap();
    assert!(
        p1.last_message_id >= 11,
        "fence + 10 inserts survived: {p1:?}"
    );
}

/// ~600 idle connections against a server whose open-file limit is 400: the server raises its
/// soft limit to the hard one, caps connections below it (refusing the rest at once, logged),
/// closes connections that never send the HTTP/2 preface, and `status` and `/healthz` answer
/// all along or right after. Before: the flood took every descriptor, the accept loop span,
/// and every call timed out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_flood_past_the_open_file_limit_leaves_status_and_health_answering() {
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = dir.path().join("walden.toml");
    std::fs::write(
        &config,
        "[server]\nhandshake_timeout_ms = 1500\n[node]\npchannels = 2\n",
    )
    .unwrap();
    let ready = dir.path().join("ready.json");
    let log = dir.path().join("server.log");
    let mut child = Command::new("bash")
        .args([
            "-c",
            r#"ulimit -S -n 300 && ulimit -H -n 400 && exec "$0" "$@""#,
            common::WALDEN,
            "standalone",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--milvus-listen",
            "",
            "--config",
        ])
        .arg(&config)
        .arg("--ready-file")
        .arg(&ready)
        .arg("--data-dir")
        .arg(&data)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let doc: serde_json::Value = loop {
        if let Ok(t) = std::fs::read_to_string(&ready)
            && let Ok(doc) = serde_json::from_str(&t)
        {
            break doc;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "never ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let addr = doc["grpc"].as_str().unwrap().to_owned();
    let http = doc["http"].as_str().unwrap().to_owned();

    let mut flood = Vec::new();
    for _ in 0..600 {
        if let Ok(s) = tokio::net::TcpStream::connect(&addr).await {
            flood.push(s);
        }
    }
    // Health is on its own listener and descriptors are kept back for it.
    let (code, body) =
        tokio::time::timeout(Duration::from_secs(5), common::http_get(&http, "/healthz"))
            .await
            .expect("/healthz answers under the flood");
    assert_eq!(code, 200, "{body}");
    // The flood's connections are closed by the handshake deadline; status answers then.
    let started = Instant::now();
    let status = loop {
        let out = Command::new(common::WALDEN)
            .args(["status", "--json", "--addr", &addr])
            .output()
            .unwrap();
        if out.status.success() {
            break out;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "status never answered: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(String::from_utf8_lossy(&status.stdout).contains("walden-dml-1"));
    // Every flood connection was closed by the server: refused at once or timed out.
    for mut s in flood {
        use tokio::io::AsyncReadExt;
        // The server's own SETTINGS may come first; then the end.
        let mut rest = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
        assert!(r.is_ok(), "an idle connection was left open");
    }
    let _ = child.kill();
    let _ = child.wait();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("soft_before=300") && text.contains("soft_now=400"),
        "{text}"
    );
    assert!(text.contains("max_connections reached"), "{text}");
}
