//! TLS and bearer tokens on a real server, with a certificate authority and a server
//! certificate the test makes (openssl): a plaintext client is refused, every RPC and the HTTP
//! endpoints are refused without a token and served with one, SIGHUP swaps the tokens, and no
//! token reaches the log.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::{path::Path, process::Command, sync::Arc, time::Duration};

use bytes::Bytes;
use common::{Server, WALDEN};
use walden_client::{Client, ClientError, ConnectOptions, ConsumerOptions, ProducerOptions};
use walden_common::{ErrorCode, HasErrorCode};
use walden_message::{MessageType, MutableMessage};

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl (scripts/install-test-deps.sh installs it)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, and a certificate for 127.0.0.1 signed by it: (ca.crt, server.crt, server.key).
fn make_certificates(dir: &Path) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-subj",
        "/CN=walden-test-ca",
        "-days",
        "2",
    ]);
    openssl(dir, &ca);
    let mut csr = vec!["req"];
    csr.extend(ec);
    csr.extend([
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=localhost",
    ]);
    openssl(dir, &csr);
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "2",
            "-extfile",
            "san.ext",
        ],
    );
}

fn is_unauthenticated(e: &ClientError) -> bool {
    let inner = match e {
        ClientError::RetriesExhausted { last, .. } => last.as_ref(),
        other => other,
    };
    inner.code() == ErrorCode::Unauthenticated
}

/// Every kind of call a client makes: status, produce, consume, and the collection calls.
/// Returns the errors of those that failed.
async fn every_call(client: &Client) -> Vec<(String, ClientError)> {
    let mut failed = Vec::new();
    if let Err(e) = client.status().await {
        failed.push(("status".into(), e));
    }
    let producer = client.producer(
        "walden-dml-0",
        ProducerOptions {
            retry_timeout: Duration::ZERO,
            ..ProducerOptions::default()
        },
    );
    let m = MutableMessage::new(MessageType::Data, "v", Bytes::from_static(b"hello"));
    if let Err(e) = producer.append(m).await {
        failed.push(("produce".into(), e));
    }
    let mut consumer = client.consumer(
        "walden-dml-0",
        ConsumerOptions {
            retry_timeout: Duration::ZERO,
            ..ConsumerOptions::default()
        },
    );
    match tokio::time::timeout(Duration::from_secs(5), consumer.next()).await {
        Ok(Some(Err(e))) => failed.push(("consume".into(), e)),
        Ok(Some(Ok(_))) => {}
        other => panic!("consume gave neither a message nor an error: {other:?}"),
    }
    let collections = client.collections();
    if let Err(e) = collections.list().await {
        failed.push(("list".into(), e));
    }
    if let Err(e) = collections.describe("nothing").await
        && e.code() != ErrorCode::CollectionNotFound
    {
        failed.push(("describe".into(), e));
    }
    if let Err(e) = collections.flush("nothing").await
        && e.code() != ErrorCode::CollectionNotFound
    {
        failed.push(("flush".into(), e));
    }
    let schema = walden_schema::Schema::from_json(
        r#"{"fields":[{"name":"id","type":"int64","primary_key":true},{"name":"v","type":"float_vector","dim":2}]}"#,
    )
    .unwrap();
    // Create (or find it there from an earlier round), partitions, drop: the rest of the API.
    match collections.create("secured", &schema, 1).await {
        Ok(_) => {}
        Err(e) if e.code() == ErrorCode::CollectionExists => {}
        Err(e) => failed.push(("create".into(), e)),
    }
    for (name, r) in [
        (
            "create_partition",
            collections.create_partition("secured", "p").await,
        ),
        (
            "drop_partition",
            collections.drop_partition("secured", "p").await,
        ),
        ("drop", collections.drop_collection("secured").await),
    ] {
        match r {
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.code(),
                    ErrorCode::CollectionNotFound | ErrorCode::PartitionNotFound
                ) => {}
            Err(e) => failed.push((name.into(), e)),
        }
    }
    failed
}

/// GET over HTTPS, trusting `ca`: (status, body).
async fn https_get(addr: &str, path: &str, ca: &[u8], token: Option<&str>) -> (u16, String) {
    use rustls_pki_types::{CertificateDer, ServerName, pem::PemObject};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::rustls;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca) {
        roots.add(c.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .unwrap();
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    tls.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n{auth}\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = tls.read_to_end(&mut out).await;
    let out = String::from_utf8_lossy(&out).into_owned();
    let status = out.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = out.split_once("\r\n\r\n").map_or("", |x| x.1).to_owned();
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_tls_and_tokens_every_call_needs_a_token_and_plaintext_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_certificates(d);
    let ca = std::fs::read(d.join("ca.crt")).unwrap();
    let tokens = d.join("tokens");
    std::fs::write(&tokens, "# the test's\nsecret-one\n").unwrap();
    let config = format!(
        "[server]\ntls_cert_file = {:?}\ntls_key_file = {:?}\nauth_token_file = {:?}\n\
         [node]\npchannels = 1\n[cluster]\ntls_ca_file = {:?}\n",
        d.join("server.crt"),
        d.join("server.key"),
        tokens,
        d.join("ca.crt"),
    );
    let with = |token: Option<&str>| ConnectOptions {
        token: token.map(str::to_owned),
        tls_ca_pem: Some(ca.clone()),
    };
    let log = d.join("server.log");
    let server = Server::start_secure(
        &d.join("data"),
        &config,
        with(Some("secret-one")),
        log.clone(),
    )
    .await;
    let addr = server.addr.as_str();

    // Plaintext: no gRPC call gets through.
    let plain = Client::connect(addr).await;
    if let Ok(c) = plain {
        assert!(c.status().await.is_err(), "a plaintext call was served");
    }

    // TLS without a token, or with a wrong one: every call is refused with UNAUTHENTICATED.
    for token in [None, Some("secret-two")] {
        let client = Client::connect_with(addr, &with(token)).await.unwrap();
        let failed = every_call(&client).await;
        let names: Vec<&str> = failed.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "status",
                "produce",
                "consume",
                "list",
                "describe",
                "flush",
                "create",
                "create_partition",
                "drop_partition",
                "drop"
            ],
            "token {token:?}: every call must be refused"
        );
        for (name, e) in &failed {
            assert!(is_unauthenticated(e), "{name}: {e}");
        }
    }
    // With the token: every call is served.
    let client = Client::connect_with(addr, &with(Some("secret-one")))
        .await
        .unwrap();
    let failed = every_call(&client).await;
    assert!(failed.is_empty(), "{failed:?}");

    // The CLI: --tls-ca and --token (or WALDEN_TOKEN); a refusal names its code.
    let ca_path = d.join("ca.crt");
    let status = |token: Option<&str>| {
        let mut cmd = Command::new(WALDEN);
        cmd.args(["status", "--json", "--addr", addr, "--tls-ca"])
            .arg(&ca_path)
            .env_remove("WALDEN_TOKEN");
        if let Some(t) = token {
            cmd.env("WALDEN_TOKEN", t);
        }
        cmd.output().unwrap()
    };
    let ok = status(Some("secret-one"));
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let refused = status(None);
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("UNAUTHENTICATED(21)"), "{err}");
    assert!(!err.contains("secret"), "{err}");

    // HTTP over TLS: 401 without the token, served with it.
    let http = server.metrics_addr.clone().unwrap();
    assert_eq!(https_get(&http, "/metrics", &ca, None).await.0, 401);
    assert_eq!(https_get(&http, "/healthz", &ca, None).await.0, 401);
    assert_eq!(
        https_get(&http, "/metrics", &ca, Some("secret-two"))
            .await
            .0,
        401
    );
    let (code, body) = https_get(&http, "/metrics", &ca, Some("secret-one")).await;
    assert_eq!(code, 200);
    assert!(body.contains("walden_appended_messages_total"));
    assert_eq!(
        https_get(&http, "/healthz", &ca, Some("secret-one"))
            .await
            .0,
        200
    );

    // SIGHUP: the file is read again; the old token stops working, the new one works.
    std::fs::write(&tokens, "secret-two\n").unwrap();
    let pid = server.pid().unwrap().to_string();
    assert!(
        Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success()
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let c = Client::connect_with(addr, &with(Some("secret-two")))
            .await
            .unwrap();
        if c.status().await.is_ok() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the new token never worked"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let old = Client::connect_with(addr, &with(Some("secret-one")))
        .await
        .unwrap();
    assert!(is_unauthenticated(&old.status().await.unwrap_err()));

    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("bearer tokens reloaded"), "{text}");
    assert!(
        !text.contains("secret-"),
        "a token reached the log:\n{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_healthz_answers_without_a_token_and_metrics_still_need_one() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "t0ken\n").unwrap();
    let config = format!(
        "[server]\nauth_token_file = {tokens:?}\npublic_healthz = true\n[node]\npchannels = 1\n"
    );
    let connect = ConnectOptions {
        token: Some("t0ken".into()),
        tls_ca_pem: None,
    };
    let server = Server::start_secure(
        &dir.path().join("data"),
        &config,
        connect,
        dir.path().join("log"),
    )
    .await;
    let http = server.metrics_addr.clone().unwrap();
    assert_eq!(common::http_get(&http, "/healthz").await.0, 200);
    assert_eq!(common::http_get(&http, "/metrics").await.0, 401);
}

/// The code a refused call ended with, through the client's retry wrapper.
fn code_of(e: &ClientError) -> ErrorCode {
    match e {
        ClientError::RetriesExhausted { last, .. } => last.code(),
        other => other.code(),
    }
}

/// A status call (a coordinator's cluster status, a node's status, a query node's state) to
/// `addr` with `options`: the error, if refused.
async fn call(role: &str, addr: &str, options: &ConnectOptions) -> Result<(), ErrorCode> {
    use walden_proto::v1::{QueryNodeStateRequest, query_node_client::QueryNodeClient};
    if role == "query-node" {
        let ch = walden_connect::lazy(addr, options, Some(Duration::from_secs(5))).unwrap();
        return match QueryNodeClient::new(ch)
            .state(QueryNodeStateRequest::default())
            .await
        {
            Ok(_) => Ok(()),
            Err(s) if s.code() == tonic::Code::Unauthenticated => Err(ErrorCode::Unauthenticated),
            Err(_) => Err(ErrorCode::Unavailable),
        };
    }
    let client = Client::connect_with(addr, options)
        .await
        .map_err(|e| code_of(&e))?;
    let r = if role == "coord" {
        client.cluster_status().await.map(|_| ())
    } else {
        client.status().await.map(|_| ())
    };
    r.map_err(|e| code_of(&e))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_with_tls_and_tokens_on_every_listener_writes_fails_over_flushes_and_searches() {
    use common::cluster::Cluster;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_certificates(d);
    let ca = std::fs::read(d.join("ca.crt")).unwrap();
    let tokens = d.join("tokens");
    std::fs::write(&tokens, "cluster-token\n").unwrap();
    // Appended to the cluster's [cluster] table: the authority, then the server's TLS and tokens.
    let extra = format!(
        "tls_ca_file = {:?}\n[server]\ntls_cert_file = {:?}\ntls_key_file = {:?}\n\
         auth_token_file = {:?}\n",
        d.join("ca.crt"),
        d.join("server.crt"),
        d.join("server.key"),
        tokens,
    );
    let with = |token: Option<&str>| ConnectOptions {
        token: token.map(str::to_owned),
        tls_ca_pem: Some(ca.clone()),
    };
    let mut c = Cluster::start_with(0, 0, 4, &extra, with(Some("cluster-token"))).await;
    c.metrics = true;
    c.add_coord().await;
    c.add_coord().await;
    for _ in 0..3 {
        c.add_node().await;
    }
    c.add_query_node().await;
    c.add_query_node().await;
    let status = c.converged(4, Duration::from_secs(30)).await;

    // Producers on every pchannel, through a kill -9 of the node that owns walden-dml-0.
    let client = c.client().await;
    let acked = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut producers = Vec::new();
    for p in 0..4 {
        let (client, acked) = (client.clone(), acked.clone());
        producers.push(tokio::spawn(async move {
            let pchannel = format!("walden-dml-{p}");
            let producer = client.producer(&pchannel, ProducerOptions::default());
            for i in 0..300 {
                let payload = format!("{pchannel}/{i}");
                let msg = MutableMessage::new(MessageType::Data, "v", Bytes::from(payload.clone()));
                let r = producer
                    .append(msg)
                    .await
                    .expect("acknowledged through the kill");
                acked
                    .lock()
                    .unwrap()
                    .push((pchannel.clone(), payload, r.id));
                if i % 50 == 0 {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }));
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while acked.lock().unwrap().len() < 400 {
        assert!(
            std::time::Instant::now() < deadline,
            "the producers stalled"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let owner = status
        .pchannels
        .iter()
        .find(|p| p.pchannel == "walden-dml-0")
        .unwrap()
        .node_id;
    let killed_at = acked.lock().unwrap().len();
    c.node_by_id(owner).kill();
    for p in producers {
        p.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert_eq!(acked.len(), 1200);
    assert!(killed_at < 1200, "the kill landed while producing");
    for p in 0..4 {
        let pchannel = format!("walden-dml-{p}");
        let stored: Vec<String> = common::read_to_end(&client, &pchannel)
            .await
            .into_iter()
            .filter(|m| m.message_type() == MessageType::Data)
            .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
            .collect();
        let mine: Vec<String> = acked
            .iter()
            .filter(|(pc, _, _)| *pc == pchannel)
            .map(|(_, p, _)| p.clone())
            .collect();
        assert_eq!(
            stored, mine,
            "{pchannel}: every acknowledged message once, in order"
        );
    }

    // A flush, query nodes loading it, and a search, from the CLI as a user runs it.
    std::fs::write(
        d.join("schema.json"),
        r#"{"fields":[{"name":"id","type":"int64","primary_key":true},
            {"name":"emb","type":"float_vector","dim":4}]}"#,
    )
    .unwrap();
    let rows: Vec<serde_json::Value> = (0..500)
        .map(|i| serde_json::json!({"id": i, "emb": [i as f32, 1.0, 2.0, 3.0]}))
        .collect();
    std::fs::write(d.join("rows.json"), serde_json::to_string(&rows).unwrap()).unwrap();
    let addr = c.addrs();
    let cli = |args: &[&str]| {
        let out = Command::new(WALDEN)
            .args(args)
            .args(["--addr", &addr, "--tls-ca"])
            .arg(d.join("ca.crt"))
            .env("WALDEN_TOKEN", "cluster-token")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "walden {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let schema = d.join("schema.json").to_string_lossy().into_owned();
    let rows = d.join("rows.json").to_string_lossy().into_owned();
    cli(&[
        "collection",
        "create",
        "docs",
        "--schema",
        &schema,
        "--shards",
        "2",
    ]);
    cli(&["insert", "--collection", "docs", "--file", &rows]);
    cli(&["flush", "--collection", "docs", "--wait"]);
    cli(&[
        "collection",
        "load",
        "docs",
        "--replicas",
        "2",
        "--timeout",
        "60",
    ]);
    for q in &c.query_nodes {
        assert!(q.log().contains("segments loaded"), "{}", q.log());
    }
    let found = cli(&[
        "search",
        "--collection",
        "docs",
        "--vector",
        "[123, 1, 2, 3]",
        "--top-k",
        "1",
        "--consistency",
        "strong",
        "--json",
    ]);
    let found: serde_json::Value = serde_json::from_str(&found).unwrap();
    assert_eq!(
        found["results"][0][0]["id"],
        serde_json::json!(123),
        "{found}"
    );

    // Every listener refuses plaintext and a missing token, /metrics included.
    let plain = ConnectOptions::default();
    let procs: Vec<(&str, String, Option<String>)> = c
        .coords
        .iter()
        .chain(c.nodes.iter().filter(|n| n.node_id != Some(owner)))
        .chain(c.query_nodes.iter())
        .map(|p| (p.role, p.addr.clone(), p.http.clone()))
        .collect();
    assert_eq!(procs.len(), 6);
    for (role, addr, http) in procs {
        assert_eq!(
            call(role, &addr, &with(Some("cluster-token"))).await,
            Ok(()),
            "{role} {addr}"
        );
        assert!(
            call(role, &addr, &plain).await.is_err(),
            "{role} {addr}: plaintext served"
        );
        assert_eq!(
            call(role, &addr, &with(None)).await,
            Err(ErrorCode::Unauthenticated),
            "{role} {addr}: no token"
        );
        let http = http.expect("metrics listener");
        assert_eq!(
            https_get(&http, "/metrics", &ca, None).await.0,
            401,
            "{role} /metrics"
        );
        assert_eq!(
            https_get(&http, "/metrics", &ca, Some("cluster-token"))
                .await
                .0,
            200,
            "{role} /metrics"
        );
    }
}
