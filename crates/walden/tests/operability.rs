//! What an operator relies on: Prometheus metrics, the health endpoint, gRPC reflection, and a
//! clean shutdown on SIGTERM.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

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
    let resp = stream.message().await.unwrap().unwrap();
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
