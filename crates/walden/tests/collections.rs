//! Collections on a real `walden standalone` process: the CLI as a user runs it, the
//! per-vchannel invariants over gRPC, DDL broadcasts interrupted by kill -9, and bounded replay
//! after a checkpoint.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::{
    collections::{BTreeMap, HashMap},
    process::{Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use arrow_array::{
    Int64Array, RecordBatch, StringArray, builder::FixedSizeListBuilder, builder::Float32Builder,
    types::Float64Type,
};
use bytes::Bytes;
use common::{Server, WALDEN, ok_json, read_to_end, walden};
use rand::Rng;
use serde_json::Value;
use walden_client::{Client, ProducerOptions};
use walden_common::ErrorCode;
use walden_message::{ImmutableMessage, MessageType, MutableMessage};

const SCHEMA: &str = r#"{"fields":[{"name":"id","type":"int64","primary_key":true},{"name":"emb","type":"float_vector","dim":4},{"name":"title","type":"string"}]}"#;

/// Runs a command that must fail with one line on stderr naming `code`.
fn fails_with(args: &[&str], code: ErrorCode) {
    let out = walden(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "walden {args:?} succeeded");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(
        err.contains(code.name()),
        "{args:?}: expected {code}: {err}"
    );
}

/// Non-TimeTick messages of every pchannel, by vchannel.
async fn logs(client: &Client, pchannels: usize) -> BTreeMap<String, Vec<ImmutableMessage>> {
    let mut by_vc: BTreeMap<String, Vec<ImmutableMessage>> = BTreeMap::new();
    for p in 0..pchannels {
        for m in read_to_end(client, &format!("walden-dml-{p}")).await {
            if m.message_type() != MessageType::TimeTick {
                by_vc.entry(m.vchannel().to_owned()).or_default().push(m);
            }
        }
    }
    by_vc
}

fn types(ms: &[ImmutableMessage]) -> Vec<MessageType> {
    ms.iter().map(ImmutableMessage::message_type).collect()
}

fn write_parquet(path: &std::path::Path, ids: std::ops::Range<i64>) {
    // Vectors as list<double>: what writers without Arrow metadata produce; the CLI converts.
    let n = ids.end - ids.start;
    let schema = Arc::new(arrow_schema::Schema::new(vec![
        arrow_schema::Field::new("id", arrow_schema::DataType::Int64, false),
        arrow_schema::Field::new(
            "emb",
            arrow_schema::DataType::List(Arc::new(arrow_schema::Field::new(
                "item",
                arrow_schema::DataType::Float64,
                true,
            ))),
            false,
        ),
        arrow_schema::Field::new("title", arrow_schema::DataType::Utf8, false),
    ]));
    let emb = arrow_array::ListArray::from_iter_primitive::<Float64Type, _, _>(
        ids.clone().map(|i| Some(vec![Some(i as f64); 4])),
    );
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(Int64Array::from_iter_values(ids.clone())),
            Arc::new(emb),
            Arc::new(StringArray::from_iter_values(ids.map(|i| format!("p{i}")))),
        ],
    )
    .unwrap();
    assert_eq!(batch.num_rows() as i64, n);
    let f = std::fs::File::create(path).unwrap();
    let mut w = parquet::arrow::ArrowWriter::try_new(f, schema, None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
}

fn write_arrow(path: &std::path::Path, ids: std::ops::Range<i64>) {
    let mut emb = FixedSizeListBuilder::new(Float32Builder::new(), 4).with_field(
        arrow_schema::Field::new("item", arrow_schema::DataType::Float32, false),
    );
    for i in ids.clone() {
        emb.values().append_slice(&[i as f32; 4]);
        emb.append(true);
    }
    let batch = RecordBatch::try_from_iter(vec![
        (
            "id",
            Arc::new(Int64Array::from_iter_values(ids.clone())) as arrow_array::ArrayRef,
        ),
        ("emb", Arc::new(emb.finish())),
        (
            "title",
            Arc::new(StringArray::from_iter_values(ids.map(|i| format!("a{i}")))),
        ),
    ])
    .unwrap();
    let f = std::fs::File::create(path).unwrap();
    let mut w = arrow_ipc::writer::FileWriter::try_new(f, &batch.schema()).unwrap();
    w.write(&batch).unwrap();
    w.finish().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_collection_commands_work_end_to_end_from_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), None).await;
    let a = server.addr.as_str();
    let file = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.to_str().unwrap().to_owned()
    };
    let schema = file("schema.json", SCHEMA);

    let created = ok_json(&[
        "collection",
        "create",
        "books",
        "--schema",
        &schema,
        "--shards",
        "3",
        "--addr",
        a,
        "--json",
    ]);
    assert_eq!(created["state"], "created");
    let described = ok_json(&["collection", "describe", "books", "--addr", a, "--json"]);
    let vchannels = described["vchannels"].as_array().unwrap();
    assert_eq!(vchannels.len(), 3);
    let pchannels: std::collections::HashSet<_> = vchannels
        .iter()
        .map(|v| v["pchannel"].as_str().unwrap())
        .collect();
    assert_eq!(
        pchannels.len(),
        3,
        "three shards on three pchannels: {described}"
    );
    assert_eq!(described["schema"]["fields"][1]["dim"], 4);
    assert_eq!(described["partitions"], serde_json::json!(["_default"]));
    let listed = ok_json(&["collection", "list", "--addr", a, "--json"]);
    assert_eq!(listed["collections"][0]["name"], "books");

    // Rows from a JSON array, JSON lines, Parquet and Arrow IPC.
    let rows: Vec<String> = (0..20)
        .map(|i| format!(r#"{{"id":{i},"emb":[{i},0.5,0.25,1],"title":"t{i}"}}"#))
        .collect();
    let json_array = file("rows.json", &format!("[{}]", rows.join(",")));
    let json_lines = file("rows.jsonl", &rows[..5].join("\n"));
    let parquet = dir.path().join("rows.parquet");
    write_parquet(&parquet, 100..130);
    let arrow = dir.path().join("rows.arrow");
    write_arrow(&arrow, 200..210);
    let inserted = ok_json(&[
        "insert",
        "--collection",
        "books",
        "--file",
        &json_array,
        "--addr",
        a,
        "--json",
    ]);
    assert_eq!(inserted["inserted"], 20);
    assert!(inserted["time_tick"].as_u64().unwrap() > 0);
    for (f, n) in [
        (parquet.to_str().unwrap(), 30),
        (arrow.to_str().unwrap(), 10),
    ] {
        let r = ok_json(&[
            "insert",
            "--collection",
            "books",
            "--file",
            f,
            "--addr",
            a,
            "--json",
        ]);
        assert_eq!(r["inserted"], n, "{f}");
    }
    let upserted = ok_json(&[
        "upsert",
        "--collection",
        "books",
        "--file",
        &json_lines,
        "--addr",
        a,
        "--json",
    ]);
    assert_eq!(upserted["upserted"], 5);
    let deleted = ok_json(&[
        "delete",
        "--collection",
        "books",
        "--ids",
        "1,2,3",
        "--addr",
        a,
        "--json",
    ]);
    assert_eq!(deleted["deleted"], 3);
    ok_json(&[
        "partition",
        "create",
        "--collection",
        "books",
        "p1",
        "--addr",
        a,
        "--json",
    ]);
    ok_json(&[
        "insert",
        "--collection",
        "books",
        "--file",
        &json_lines,
        "--partition",
        "p1",
        "--addr",
        a,
        "--json",
    ]);
    ok_json(&[
        "partition",
        "drop",
        "--collection",
        "books",
        "p1",
        "--addr",
        a,
        "--json",
    ]);
    let flushed = ok_json(&["flush", "--collection", "books", "--addr", a, "--json"]);
    assert_eq!(flushed["time_ticks"].as_array().unwrap().len(), 3);

    // Refusals: one line naming the code, non-zero exit.
    fails_with(
        &[
            "insert",
            "--collection",
            "books",
            "--file",
            &json_lines,
            "--partition",
            "p1",
            "--addr",
            a,
        ],
        ErrorCode::PartitionNotFound,
    );
    fails_with(
        &[
            "insert",
            "--collection",
            "nope",
            "--file",
            &json_array,
            "--addr",
            a,
        ],
        ErrorCode::CollectionNotFound,
    );
    fails_with(
        &[
            "collection",
            "create",
            "books",
            "--schema",
            &schema,
            "--addr",
            a,
        ],
        ErrorCode::CollectionExists,
    );
    let bad_rows = file("bad.json", r#"[{"id":1,"emb":[1,2,3],"title":"x"}]"#);
    fails_with(
        &[
            "insert",
            "--collection",
            "books",
            "--file",
            &bad_rows,
            "--addr",
            a,
        ],
        ErrorCode::SchemaMismatch,
    );
    let bad_schema = file(
        "bad-schema.json",
        r#"{"fields":[{"name":"id","type":"int64"}]}"#,
    );
    fails_with(
        &[
            "collection",
            "create",
            "x",
            "--schema",
            &bad_schema,
            "--addr",
            a,
        ],
        ErrorCode::InvalidArgument,
    );

    // What the shards hold: every row once, in the shard its key hashes to.
    let client = server.client().await;
    let by_vc = logs(&client, 16).await;
    let mut rows_total = 0;
    for v in vchannels {
        let ms = &by_vc[v["name"].as_str().unwrap()];
        assert_eq!(ms[0].message_type(), MessageType::CreateCollection);
        for m in ms
            .iter()
            .filter(|m| m.message_type() == MessageType::Insert)
        {
            let seg = m.header.segment_id;
            let created = ms.iter().position(|c| {
                c.message_type() == MessageType::CreateSegment && c.header.segment_id == seg
            });
            // Both must exist: `None < Some(_)` would pass for a missing CreateSegment.
            let created = created.expect("every segment has its CreateSegment");
            let at = ms.iter().position(|x| x.id == m.id).expect("the insert");
            assert!(created < at, "insert before its CreateSegment");
            rows_total += m.header.rows;
        }
        assert_eq!(ms.last().unwrap().message_type(), MessageType::Flush);
    }
    assert_eq!(rows_total, 20 + 30 + 10 + 5);

    // `consume` names the collection message types.
    let out = walden(&[
        "consume",
        "--pchannel",
        vchannels[0]["pchannel"].as_str().unwrap(),
        "--idle-exit",
        "0.3",
        "--addr",
        a,
        "--json",
    ]);
    let seen: std::collections::HashSet<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["type"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    for t in [
        "CreateCollection",
        "CreateSegment",
        "Insert",
        "CreatePartition",
        "DropPartition",
        "Flush",
    ] {
        assert!(seen.contains(t), "{t} missing from {seen:?}");
    }

    let dropped = ok_json(&["collection", "drop", "books", "--addr", a, "--json"]);
    assert_eq!(dropped["time_ticks"].as_array().unwrap().len(), 3);
    fails_with(
        &["collection", "describe", "books", "--addr", a],
        ErrorCode::CollectionNotFound,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_that_break_a_vchannel_invariant_are_refused_over_grpc_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), None).await;
    let client = server.client().await;
    let api = client.collections();
    let schema = walden_schema::Schema::from_json(SCHEMA).unwrap();
    let info = api.create("c", &schema, 1).await.unwrap();
    api.create_partition("c", "p").await.unwrap();
    let vc = info.vchannels[0].clone();
    let rows = |ids: std::ops::Range<i64>| {
        let rows: Vec<Value> = ids
            .map(|i| serde_json::json!({"id": i, "emb": [1, 2, 3, 4], "title": "x"}))
            .collect();
        schema
            .encode_ipc(&schema.rows_from_json(&rows).unwrap())
            .unwrap()
    };
    api.insert(
        "c",
        Some("p"),
        &[schema
            .rows_from_json(&[serde_json::json!({"id": 1, "emb": [1, 2, 3, 4], "title": "x"})])
            .unwrap()],
    )
    .await
    .unwrap();
    api.flush("c").await.unwrap();
    let before = logs(&client, 16).await;
    let sealed = before[&vc.name]
        .iter()
        .find(|m| m.message_type() == MessageType::CreateSegment)
        .unwrap()
        .header
        .segment_id;
    api.drop_partition("c", "p").await.unwrap();

    let producer = client.producer(&vc.pchannel, ProducerOptions::default());
    let send = |m: MutableMessage| {
        let producer = producer.clone();
        async move { producer.append(m).await.expect_err("must be refused") }
    };
    let insert = |vchannel: &str, partition: &str| {
        MutableMessage::new(MessageType::Insert, vchannel, rows(10..12)).with_partition(partition)
    };
    let code = |e: walden_client::ClientError| walden_common::HasErrorCode::code(&e);
    let unknown = format!("{}_999v0", vc.pchannel);
    assert_eq!(
        code(send(insert(&unknown, "")).await),
        ErrorCode::CollectionNotFound
    );
    assert_eq!(
        code(send(insert(&vc.name, "p")).await),
        ErrorCode::PartitionNotFound
    );
    let mut into_sealed = insert(&vc.name, "");
    into_sealed.coll.segment_id = sealed;
    assert_eq!(code(send(into_sealed).await), ErrorCode::SegmentSealed);
    let wrong = MutableMessage::new(
        MessageType::Insert,
        vc.name.clone(),
        Bytes::from_static(b"\xff\xff\xff\xff"),
    );
    assert_eq!(code(send(wrong).await), ErrorCode::InvalidArgument);
    // Dropped through another client: `api` still has "c" cached.
    client.collections().drop_collection("c").await.unwrap();
    assert_eq!(
        code(send(insert(&vc.name, "")).await),
        ErrorCode::CollectionDropped
    );

    // Only the DDL reached the log: DropPartition and DropCollection.
    let after = logs(&client, 16).await;
    let added: Vec<_> = types(&after[&vc.name][before[&vc.name].len()..]);
    assert_eq!(
        added,
        [MessageType::DropPartition, MessageType::DropCollection]
    );
    assert!(!after.contains_key(&unknown));

    // A client that described "c" before it was dropped and re-created is refused once, forgets
    // it, and then writes to the new collection's shards.
    let row = || {
        schema
            .rows_from_json(&[serde_json::json!({"id": 7, "emb": [1, 2, 3, 4], "title": "x"})])
            .unwrap()
    };
    let stale = api.insert("c", None, &[row()]).await.unwrap_err();
    assert_eq!(code(stale), ErrorCode::CollectionDropped);
    let again = client.collections().create("c", &schema, 1).await.unwrap();
    assert_ne!(again.collection_id, info.collection_id);
    api.insert("c", None, &[row()]).await.unwrap();
}

/// Checks that every shard agrees with the catalog: live collections are created on all their
/// shards (once) and dropped on none; every other collection found in a log was dropped on
/// every shard that has it.
async fn assert_shards_agree(client: &Client, pchannels: usize) -> usize {
    let catalog: HashMap<String, _> = client
        .collections()
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|c| (c.name.clone(), c))
        .collect();
    let by_vc = logs(client, pchannels).await;
    let mut live = std::collections::HashSet::new();
    for c in catalog.values() {
        assert_eq!(
            c.state(),
            walden_proto::v1::CollectionState::Created,
            "{}",
            c.name
        );
        for v in &c.vchannels {
            let ms = by_vc.get(&v.name).map_or_else(Vec::new, |m| types(m));
            assert_eq!(
                ms,
                [MessageType::CreateCollection],
                "{} on {}",
                c.name,
                v.name
            );
            live.insert(v.name.clone());
        }
    }
    for (vc, ms) in &by_vc {
        if !live.contains(vc) && vc.contains('v') && ms[0].header.collection_id != 0 {
            assert_eq!(
                types(ms),
                [MessageType::CreateCollection, MessageType::DropCollection],
                "{vc} belongs to no live collection but was not dropped"
            );
        }
    }
    catalog.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ddl_across_sixteen_shards_killed_half_way_leaves_every_shard_agreeing() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(&dir.path().join("data"), None).await;
    let schema_path = dir.path().join("schema.json");
    std::fs::write(&schema_path, SCHEMA).unwrap();
    let schema_path = schema_path.to_str().unwrap().to_owned();
    let mut rng = rand::rng();
    // How long one create + drop takes here, so that kills land inside them, not after.
    let started = Instant::now();
    for args in [
        vec![
            "collection",
            "create",
            "calibrate",
            "--schema",
            &schema_path,
            "--shards",
            "16",
        ],
        vec!["collection", "drop", "calibrate"],
    ] {
        let out = Command::new(WALDEN)
            .args(&args)
            .args(["--addr", &server.addr])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let ddl_ms = (started.elapsed().as_millis() as u64 / 2).max(2);
    let mut interrupted = 0;
    for round in 0..8 {
        let a = server.addr.clone();
        // Create a collection (and drop the previous one) and kill -9 somewhere in between.
        let name = format!("c{round}");
        let create = Command::new(WALDEN)
            .args([
                "collection",
                "create",
                &name,
                "--schema",
                &schema_path,
                "--shards",
                "16",
                "--addr",
                &a,
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let drop = (round > 0).then(|| {
            Command::new(WALDEN)
                .args([
                    "collection",
                    "drop",
                    &format!("c{}", round - 1),
                    "--addr",
                    &a,
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        });
        tokio::time::sleep(Duration::from_millis(rng.random_range(ddl_ms / 4..ddl_ms))).await;
        server.kill();
        for mut child in [Some(create), drop].into_iter().flatten() {
            if !child.wait().unwrap().success() {
                interrupted += 1;
            }
        }
        server.restart().await;
        let client = server.client().await;
        assert_shards_agree(&client, 16).await;
    }
    // Kill timing is random: make sure some runs really were cut short.
    assert!(
        interrupted > 0,
        "no DDL was interrupted; the test proves nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_kill_9_the_node_replays_only_what_followed_the_last_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let config = "[node]\npchannels = 2\ncheckpoint_max_dirty_messages = 2000\ncheckpoint_interval_ms = 60000\n";
    let mut server = Server::start(&dir.path().join("data"), Some(config)).await;
    let client = server.client().await;
    let api = client.collections();
    let schema = walden_schema::Schema::from_json(SCHEMA).unwrap();
    let info = api.create("c", &schema, 1).await.unwrap();
    api.create_partition("c", "p").await.unwrap();
    let pchannel = info.vchannels[0].pchannel.clone();
    // A large volume: 30 000 messages, which crosses the dirty bound many times.
    let producer = client.producer(&pchannel, ProducerOptions::default());
    let mut pending = Vec::new();
    for i in 0..30_000u32 {
        let m = MutableMessage::new(
            MessageType::Data,
            "raw",
            Bytes::from(i.to_le_bytes().to_vec()),
        );
        pending.push(producer.send(m).await.unwrap());
    }
    for p in pending {
        p.await.unwrap();
    }
    // The durable checkpoint that the last crossing asked for lands (status reports it live),
    // with a deadline.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = client.status().await.unwrap();
        let p = status
            .pchannels
            .iter()
            .find(|p| p.name == pchannel)
            .unwrap();
        if p.durable_checkpoint_id >= 28_000 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no durable checkpoint past 28 000 within 10 s: at {}",
            p.durable_checkpoint_id
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for i in 0..50 {
        let row = serde_json::json!({"id": i, "emb": [1, 2, 3, 4], "title": "after"});
        api.insert("c", Some("p"), &[schema.rows_from_json(&[row]).unwrap()])
            .await
            .unwrap();
    }
    let total = read_to_end(&client, &pchannel).await.len() as u64;
    server.kill();
    server.restart().await;

    let client = server.client().await;
    let status = client.status().await.unwrap();
    let p = status
        .pchannels
        .iter()
        .find(|p| p.name == pchannel)
        .unwrap();
    assert!(
        p.checkpoint_next_id >= 28_000,
        "checkpoint at {}",
        p.checkpoint_next_id
    );
    assert!(
        p.replayed_messages < 2_000 + 200,
        "replayed {} of {total} messages",
        p.replayed_messages
    );
    // The state before and after the checkpoint is whole: the partition accepts rows.
    let row = serde_json::json!({"id": 1000, "emb": [1, 2, 3, 4], "title": "again"});
    client
        .collections()
        .insert("c", Some("p"), &[schema.rows_from_json(&[row]).unwrap()])
        .await
        .unwrap();
    let data = read_to_end(&client, &pchannel)
        .await
        .iter()
        .filter(|m| m.message_type() == MessageType::Data)
        .count();
    assert_eq!(data, 30_000);
}

/// An insert cut into several messages, one of which the node refuses: the output says how
/// many rows were written and exactly which keys were not, and the log holds exactly the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_insert_written_in_part_names_the_keys_that_were_not_written() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        &dir.path().join("data"),
        Some("[node]\npchannels = 2\nmax_message_bytes = 1048576\n"),
    )
    .await;
    let a = server.addr.as_str();
    let schema = dir.path().join("schema.json");
    std::fs::write(&schema, SCHEMA).unwrap();
    let s = schema.to_str().unwrap();
    ok_json(&[
        "collection",
        "create",
        "parts",
        "--schema",
        s,
        "--shards",
        "2",
        "--json",
        "--addr",
        a,
    ]);
    // Row 21 alone is over the node's 1 MiB limit; the rest are small.
    let rows: Vec<Value> = (1..=21)
        .map(|i| {
            let title = if i == 21 {
                "t".repeat(2 << 20)
            } else {
                format!("t{i}")
            };
            serde_json::json!({"id": i, "emb": [0.0, 0.1, 0.2, 0.3], "title": title})
        })
        .collect();
    let file = dir.path().join("rows.json");
    std::fs::write(&file, serde_json::to_string(&rows).unwrap()).unwrap();
    let out = walden(&[
        "insert",
        "--collection",
        "parts",
        "--file",
        file.to_str().unwrap(),
        "--json",
        "--addr",
        a,
    ]);
    assert!(
        !out.status.success(),
        "a write in part must fail the command"
    );
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["inserted"], 20, "{doc}");
    assert_eq!(doc["not_written"], serde_json::json!(["21"]), "{doc}");
    assert_eq!(doc["error"]["name"], "MESSAGE_TOO_LARGE", "{doc}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("MESSAGE_TOO_LARGE"), "{err}");

    let client = server.client().await;
    let stored: u64 = logs(&client, 2)
        .await
        .values()
        .flatten()
        .filter(|m| m.message_type() == MessageType::Insert)
        .map(|m| m.header.rows)
        .sum();
    assert_eq!(
        stored, 20,
        "the log holds exactly the rows reported written"
    );
}
