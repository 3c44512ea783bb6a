//! Bad input gets a typed error with a stable code, the server keeps serving, and nothing
//! already written changes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::time::Duration;

use bytes::{Buf, BufMut, Bytes};
use common::Server;
use prost::Message as _;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use walden_client::{Client, ClientError, ConsumerOptions, ProducerOptions};
use walden_common::{ErrorCode, HasErrorCode};
use walden_message::{ImmutableMessage, MessageType, MutableMessage};
use walden_proto::v1 as pb;

/// Sends bytes as they are, so a test can put a frame on the wire that is not a valid message.
#[derive(Debug, Clone, Default)]
struct RawCodec;

#[derive(Debug)]
struct Raw;

impl Encoder for Raw {
    type Item = Bytes;
    type Error = tonic::Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Bytes;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, tonic::Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

const PCH: &str = "walden-dml-0";

/// Opens a produce stream on `PCH`, sends `extra` raw frames after the open, and returns the
/// codes of the stream-level errors the node answered with.
async fn raw_produce_errors(addr: &str, extra: Bytes) -> Vec<u32> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let open = pb::ProduceRequest {
        request: Some(pb::produce_request::Request::Open(pb::OpenProducer {
            pchannel: PCH.into(),
            term: 0,
        })),
    }
    .encode_to_vec();
    let frames = futures::stream::iter([Bytes::from(open), extra]);
    let path =
        tonic::codegen::http::uri::PathAndQuery::from_static("/walden.v1.StreamingNode/Produce");
    let mut responses = grpc
        .streaming(tonic::Request::new(frames), path, RawCodec)
        .await
        .unwrap()
        .into_inner();
    let mut codes = Vec::new();
    while let Ok(Some(frame)) = common::within(responses.message()).await {
        if let Some(pb::produce_response::Response::Error(e)) =
            pb::ProduceResponse::decode(frame).unwrap().response
        {
            codes.push(e.code);
        }
    }
    codes
}

async fn status_of_pch(client: &Client) -> pb::PChannelStatus {
    client
        .status()
        .await
        .unwrap()
        .pchannels
        .into_iter()
        .find(|p| p.name == PCH)
        .unwrap()
}

async fn all_messages(client: &Client) -> Vec<ImmutableMessage> {
    common::read_to_end(client, PCH).await
}

/// Everything but the WAL's own TimeTicks.
async fn client_messages(client: &Client) -> Vec<ImmutableMessage> {
    all_messages(client)
        .await
        .into_iter()
        .filter(|m| m.message_type() != MessageType::TimeTick)
        .collect()
}

fn no_retry(term: u64) -> ProducerOptions {
    ProducerOptions {
        max_in_flight: 4,
        retry_timeout: Duration::ZERO,
        term,
        ..ProducerOptions::default()
    }
}

fn insert(vchannel: &str, payload: Vec<u8>) -> MutableMessage {
    MutableMessage::new(MessageType::Data, vchannel, Bytes::from(payload))
}

fn server_code(e: &ClientError) -> (ErrorCode, bool) {
    let inner = match e {
        ClientError::RetriesExhausted { last, .. } => last.as_ref(),
        other => other,
    };
    match inner {
        ClientError::Server { retryable, .. } => (inner.code(), *retryable),
        other => panic!("expected a typed server error, got {other:?}"),
    }
}

/// The code of an error the client raised itself, before sending anything.
fn client_code(e: &ClientError) -> ErrorCode {
    assert!(
        !matches!(
            e,
            ClientError::Server { .. } | ClientError::RetriesExhausted { .. }
        ),
        "expected the client to refuse it before sending, got {e:?}"
    );
    e.code()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_typed_errors_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(
        &dir.path().join("data"),
        Some("[node]\npchannels = 2\nmax_message_bytes = 1024\n"),
    )
    .await;
    let client = server.client().await;
    let good = client.producer(PCH, no_retry(0));
    for i in 0..5 {
        good.append(insert("v1", format!("keep-{i}").into_bytes()))
            .await
            .unwrap();
    }
    let before = client_messages(&client).await;

    // Oversized: refused, not retryable, stable code 5; by the node (a producer told no
    // limit), and by a producer that knows the node's limit before anything is sent.
    let unchecked = client.producer(
        PCH,
        ProducerOptions {
            max_message_bytes: usize::MAX,
            ..no_retry(0)
        },
    );
    let err = unchecked
        .append(insert("v1", vec![7u8; 2000]))
        .await
        .unwrap_err();
    assert_eq!(
        server_code(&err),
        (ErrorCode::MessageTooLarge, false),
        "{err}"
    );
    assert_eq!(ErrorCode::MessageTooLarge.as_u32(), 5);
    let limited = client.producer(
        PCH,
        ProducerOptions {
            max_message_bytes: 1024,
            ..no_retry(0)
        },
    );
    let err = limited
        .append(insert("v1", vec![7u8; 2000]))
        .await
        .unwrap_err();
    assert_eq!(client_code(&err), ErrorCode::MessageTooLarge, "{err}");

    // Invalid fields: a vchannel that is not a name, and a type clients may not write; the
    // client refuses them before sending (the node's own check is in raw_produce tests).
    let err = good.append(insert("a/b", b"x".to_vec())).await.unwrap_err();
    assert_eq!(client_code(&err), ErrorCode::InvalidArgument, "{err}");
    let long = "v".repeat(100_000);
    let err = good.append(insert(&long, b"x".to_vec())).await.unwrap_err();
    assert_eq!(client_code(&err), ErrorCode::InvalidArgument, "{err}");
    let tick = MutableMessage::new(MessageType::TimeTick, "v1", Bytes::new());
    let err = good.append(tick).await.unwrap_err();
    assert_eq!(client_code(&err), ErrorCode::InvalidArgument, "{err}");

    // Unknown pchannel, for producers and consumers.
    let err = client
        .producer("no-such-pchannel", no_retry(0))
        .append(insert("v1", b"x".to_vec()))
        .await
        .unwrap_err();
    assert_eq!(server_code(&err).0, ErrorCode::ChannelNotFound, "{err}");
    let mut c = client.consumer(
        "no-such-pchannel",
        ConsumerOptions {
            retry_timeout: Duration::ZERO,
            ..ConsumerOptions::default()
        },
    );
    let err = common::within(c.next()).await.unwrap().unwrap_err();
    assert_eq!(server_code(&err).0, ErrorCode::ChannelNotFound, "{err}");

    // A malformed frame on the produce stream: typed INVALID_ARGUMENT, stream ends.
    let codes = raw_produce_errors(
        &server.addr,
        Bytes::from_static(&[0xff, 0xff, 0xff, 0x0f, 0x01]),
    )
    .await;
    assert_eq!(
        codes,
        [ErrorCode::InvalidArgument.as_u32()],
        "one typed error for the bad frame"
    );

    // Nothing written changed (the WAL's own TimeTicks may follow), and the server serves.
    let after = client_messages(&client).await;
    assert_eq!(after, before, "bad input changed what was written");
    let r = good
        .append(insert("v1", b"still-serving".to_vec()))
        .await
        .unwrap();
    assert!(r.id.0 > before.last().unwrap().id.0);

    // A stale term after a restart (which bumps the term): CHANNEL_FENCED, code 2, retryable.
    let old_term = status_of_pch(&client).await.term;
    server.kill();
    server.restart().await;
    let client = server.client().await;
    let err = client
        .producer(PCH, no_retry(old_term))
        .append(insert("v1", b"stale".to_vec()))
        .await
        .unwrap_err();
    assert_eq!(server_code(&err), (ErrorCode::ChannelFenced, true), "{err}");
    assert_eq!(ErrorCode::ChannelFenced.as_u32(), 2);
    let current = client.producer(PCH, no_retry(old_term + 1));
    current
        .append(insert("v1", b"current".to_vec()))
        .await
        .unwrap();
    let payloads: Vec<_> = all_messages(&client)
        .await
        .into_iter()
        .filter(|m| m.message_type() == MessageType::Data)
        .map(|m| String::from_utf8(m.payload.to_vec()).unwrap())
        .collect();
    assert_eq!(
        payloads,
        [
            "keep-0",
            "keep-1",
            "keep-2",
            "keep-3",
            "keep-4",
            "still-serving",
            "current"
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_message_in_a_batch_leaves_the_others_appended_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        &dir.path().join("data"),
        Some("[node]\npchannels = 1\nmax_message_bytes = 1024\n"),
    )
    .await;
    let mut grpc =
        pb::streaming_node_client::StreamingNodeClient::connect(format!("http://{}", server.addr))
            .await
            .unwrap();
    let msg = |id: u64, len: usize| pb::ProduceMessage {
        request_id: id,
        message: Some(insert("v", vec![b'a' + id as u8; len]).into_proto()),
    };
    let requests = vec![
        pb::ProduceRequest {
            request: Some(pb::produce_request::Request::Open(pb::OpenProducer {
                pchannel: PCH.into(),
                term: 0,
            })),
        },
        pb::ProduceRequest {
            request: Some(pb::produce_request::Request::Batch(pb::ProduceBatch {
                messages: vec![
                    msg(0, 10),
                    msg(1, 5000),
                    msg(2, 10),
                    // What the Rust client refuses itself: the node checks it too.
                    pb::ProduceMessage {
                        request_id: 3,
                        message: Some(insert("a/b", b"x".to_vec()).into_proto()),
                    },
                    pb::ProduceMessage {
                        request_id: 4,
                        message: Some(
                            MutableMessage::new(MessageType::TimeTick, "v", Bytes::new())
                                .into_proto(),
                        ),
                    },
                ],
            })),
        },
        pb::ProduceRequest {
            request: Some(pb::produce_request::Request::Close(pb::CloseProducer {})),
        },
    ];
    let mut responses = grpc
        .produce(futures::stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    let mut results = Vec::new();
    while let Some(r) = common::within(responses.message()).await.unwrap() {
        match r.response {
            Some(pb::produce_response::Response::Result(x)) => results.push(x),
            Some(pb::produce_response::Response::Results(xs)) => results.extend(xs.results),
            _ => {}
        }
    }
    results.sort_by_key(|r| r.request_id);
    let outcome = |r: &pb::ProduceResult| match &r.outcome {
        Some(pb::produce_result::Outcome::Ok(a)) => Ok(a.message_id),
        Some(pb::produce_result::Outcome::Error(e)) => Err(e.code),
        None => panic!("no outcome"),
    };
    assert_eq!(results.len(), 5);
    let (a, b, c) = (
        outcome(&results[0]),
        outcome(&results[1]),
        outcome(&results[2]),
    );
    assert_eq!(b, Err(ErrorCode::MessageTooLarge.as_u32()));
    let invalid = Err(ErrorCode::InvalidArgument.as_u32());
    assert_eq!(
        (outcome(&results[3]), outcome(&results[4])),
        (invalid, invalid)
    );
    assert!(a.unwrap() < c.unwrap(), "order within the batch is kept");
    let payloads: Vec<_> = all_messages(&server.client().await)
        .await
        .into_iter()
        .filter(|m| m.message_type() == MessageType::Data)
        .map(|m| m.payload[0])
        .collect();
    assert_eq!(
        payloads,
        [b'a', b'c'],
        "only the refused message is missing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_larger_than_the_node_reads_is_refused_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), Some("[node]\npchannels = 1\n")).await;
    let before = client_messages(&server.client().await).await;
    // A well-formed produce request, just larger than any frame the node reads.
    let huge = pb::ProduceRequest {
        request: Some(pb::produce_request::Request::Produce(pb::ProduceMessage {
            request_id: 1,
            message: Some(insert("v", vec![0u8; 65 << 20]).into_proto()),
        })),
    }
    .encode_to_vec();
    let codes = raw_produce_errors(&server.addr, Bytes::from(huge)).await;
    assert_eq!(codes, [ErrorCode::InvalidArgument.as_u32()]);
    assert_eq!(
        client_messages(&server.client().await).await,
        before,
        "nothing written"
    );
}

/// A listen address that is taken or malformed, a log level that is not one, and a collection
/// of zero shards: each refused at once with one line naming what to fix, before anything is
/// recovered or written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_startup_settings_are_refused_at_once_before_recovery() {
    use std::process::Command;
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_addr = taken.local_addr().unwrap().to_string();
    let level = dir.path().join("level.toml");
    std::fs::write(&level, "[log]\nlevel = \"infoo\"\n").unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["--listen".into(), taken_addr], "server.listen"),
        (
            vec!["--listen".into(), "not-an-address".into()],
            "server.listen",
        ),
        (
            vec!["--metrics-listen".into(), "256.0.0.1:1".into()],
            "server.metrics_listen",
        ),
        (
            vec!["--config".into(), level.to_str().unwrap().into()],
            "not a level",
        ),
    ];
    for (args, expected) in cases {
        let data = dir.path().join("data");
        let out = Command::new(common::WALDEN)
            .arg("standalone")
            .args(["--milvus-listen", ""])
            .args(&args)
            .arg("--data-dir")
            .arg(&data)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} started");
        assert!(err.contains(expected), "{args:?}: {err}");
        assert!(err.contains("INVALID_ARGUMENT"), "{args:?}: {err}");
        assert!(
            !data.join("meta.redb").exists(),
            "{args:?}: recovery ran before the settings were checked"
        );
    }

    let server = Server::start(&dir.path().join("served"), Some("[node]\npchannels = 1\n")).await;
    let schema = dir.path().join("schema.json");
    let schema_json = r#"{"fields":[{"name":"id","type":"int64","primary_key":true},{"name":"v","type":"float_vector","dim":2}]}"#;
    std::fs::write(&schema, schema_json).unwrap();
    let out = Command::new(common::WALDEN)
        .args(["collection", "create", "c", "--shards", "0", "--schema"])
        .arg(&schema)
        .args(["--addr", &server.addr])
        .output()
        .unwrap();
    assert!(!out.status.success(), "--shards 0 was accepted");
    // And past the client: the node refuses it too (it used to make one shard).
    let schema = walden_schema::Schema::from_json(schema_json).unwrap();
    let mut raw =
        pb::collections_client::CollectionsClient::connect(format!("http://{}", server.addr))
            .await
            .unwrap();
    let status = raw
        .create_collection(pb::CreateCollectionRequest {
            name: "c".into(),
            schema: Some(schema.proto().clone()),
            shards: 0,
        })
        .await
        .unwrap_err();
    let err = ClientError::from(status);
    assert_eq!(err.code(), ErrorCode::InvalidArgument, "{err}");
}

/// A produce stream that does not start with `open`, or sends `open` twice, gets
/// INVALID_REQUEST_SEQUENCE (11) and writes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_produce_stream_out_of_sequence_gets_invalid_request_sequence() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), Some("[node]\npchannels = 1\n")).await;
    let mut grpc =
        pb::streaming_node_client::StreamingNodeClient::connect(format!("http://{}", server.addr))
            .await
            .unwrap();
    let produce = |id: u64| pb::ProduceRequest {
        request: Some(pb::produce_request::Request::Produce(pb::ProduceMessage {
            request_id: id,
            message: Some(insert("v", b"x".to_vec()).into_proto()),
        })),
    };
    let open = || pb::ProduceRequest {
        request: Some(pb::produce_request::Request::Open(pb::OpenProducer {
            pchannel: PCH.into(),
            term: 0,
        })),
    };
    for requests in [vec![produce(1)], vec![open(), open(), produce(2)]] {
        let mut responses = grpc
            .produce(futures::stream::iter(requests))
            .await
            .unwrap()
            .into_inner();
        let mut codes = Vec::new();
        while let Ok(Some(r)) = common::within(responses.message()).await {
            if let Some(pb::produce_response::Response::Error(e)) = r.response {
                codes.push(e.code);
            }
        }
        assert_eq!(codes, [ErrorCode::InvalidRequestSequence.as_u32()]);
    }
    assert!(
        client_messages(&server.client().await).await.is_empty(),
        "nothing was written"
    );
}

/// Error lines that used to lie or name no code: a 100 KB collection name (an HTTP/2 protocol
/// error reported as STORAGE_UNAVAILABLE), an unreachable server (STORAGE_UNAVAILABLE), a JSON
/// number out of range and a 100 000-byte vchannel (no code), an unknown pchannel (5.6 s of
/// retries first). Each is now one line naming the right code, at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_error_lines_name_the_right_code_at_once() {
    use std::process::Command;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), Some("[node]\npchannels = 1\n")).await;
    let a = server.addr.as_str();
    let schema = dir.path().join("schema.json");
    std::fs::write(
        &schema,
        r#"{"fields":[{"name":"id","type":"int64","primary_key":true},{"name":"v","type":"float_vector","dim":2}]}"#,
    )
    .unwrap();
    let s = schema.to_str().unwrap();
    let rows = dir.path().join("rows.json");
    std::fs::write(&rows, r#"[{"id": 1e400, "v": [1, 2]}]"#).unwrap();
    let huge = "c".repeat(100_000);
    let long_vchannel = "v".repeat(100_000);
    let cases: Vec<(Vec<&str>, &str, Option<ErrorCode>)> = vec![
        (
            vec!["collection", "describe", &huge, "--addr", a],
            "",
            Some(ErrorCode::InvalidArgument),
        ),
        (
            vec!["collection", "create", "ok", "--schema", s, "--addr", a],
            "",
            None,
        ),
        (
            vec![
                "insert",
                "--collection",
                "ok",
                "--file",
                rows.to_str().unwrap(),
                "--addr",
                a,
            ],
            "",
            Some(ErrorCode::InvalidArgument),
        ),
        (
            vec![
                "produce",
                "--pchannel",
                PCH,
                "--vchannel",
                &long_vchannel,
                "--addr",
                a,
            ],
            "x\n",
            Some(ErrorCode::InvalidArgument),
        ),
        (
            vec![
                "produce",
                "--pchannel",
                "no-such",
                "--vchannel",
                "v",
                "--addr",
                a,
            ],
            "x\n",
            Some(ErrorCode::ChannelNotFound),
        ),
        (
            vec!["status", "--addr", "127.0.0.1:1"],
            "",
            Some(ErrorCode::Unavailable),
        ),
    ];
    for (args, stdin, code) in cases {
        let started = std::time::Instant::now();
        let mut child = Command::new(common::WALDEN)
            .args(&args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write as _;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let what = format!("{:?}", &args[..2]);
        let Some(code) = code else {
            assert!(
                out.status.success(),
                "{what}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            continue;
        };
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what} succeeded");
        let last = err.trim_end().lines().last().unwrap_or_default();
        assert!(
            last.contains(&code.to_string()),
            "{what}: expected {code}: {err}"
        );
        assert!(err.len() < 2_000, "{what}: {} bytes of error", err.len());
        assert!(
            started.elapsed() < std::time::Duration::from_secs(3),
            "{what} took {:?}",
            started.elapsed()
        );
    }
    // Past the client: the node's refusal of a huge name is a typed error, not an HTTP/2 one.
    let mut raw = pb::collections_client::CollectionsClient::connect(format!("http://{a}"))
        .await
        .unwrap();
    let status = raw
        .describe_collection(pb::CollectionName { name: huge })
        .await
        .unwrap_err();
    let err = ClientError::from(status);
    assert_eq!(err.code(), ErrorCode::InvalidArgument, "{err}");
}
