//! Walden as a cluster, with real processes: etcd, `walden coord` and `walden node` on
//! 127.0.0.1, the WAL on a shared `file://` object store. Idempotent producers write through
//! the coordinators' topology while nodes crash, freeze, move and drain, and the leader
//! coordinator dies; every acknowledged message is read back exactly once, in order, and no
//! tick is handed out twice or backwards.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use common::{
    cluster::Cluster,
    load::{Load, PCHANNELS, busiest, moved_off, pchannel, verify},
    read_to_end,
};
use walden_client::{Client, ProducerOptions};
use walden_common::{ErrorCode, HasErrorCode};
use walden_message::{MessageType, MutableMessage};
use walden_proto::v1::AssignmentState;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_under_load_loses_nothing_and_its_pchannels_serve_again_within_the_lease() {
    let mut c = Cluster::start(1, 3, PCHANNELS, "").await;
    let load = Load::start(c.addrs()).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (victim, moved) = busiest(&c).await;
    let before = load.acked();
    let killed = Instant::now();
    c.node_by_id(victim).kill();
    moved_off(&c, victim, &moved, Duration::from_secs(20)).await;
    let took = killed.elapsed();
    // Lease TTL (2 s) plus recovery; generous for a loaded 2-core machine.
    eprintln!(
        "node {victim} killed: its {} pchannels served again after {took:?}",
        moved.len()
    );
    assert!(took < Duration::from_secs(10), "moved after {took:?}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(load.acked() > before, "producers carried on");
    let outcome = load.finish().await;
    verify(&c.client().await, &outcome).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_node_past_its_lease_is_fenced_and_nothing_it_writes_after_is_accepted() {
    let mut c = Cluster::start(1, 3, PCHANNELS, "").await;
    let load = Load::start(c.addrs()).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (victim, moved) = busiest(&c).await;
    let zombie_addr = c.node_by_id(victim).addr.clone();
    // The terms the frozen node holds: its writes are under them.
    let s = c.status().await.unwrap();
    let old_term: HashMap<String, u64> = s
        .pchannels
        .iter()
        .map(|p| (p.pchannel.clone(), p.term))
        .collect();
    c.node_by_id(victim).signal("STOP");
    moved_off(&c, victim, &moved, Duration::from_secs(20)).await;
    c.node_by_id(victim).signal("CONT");
    // A client still writing to the old owner under its term gets refused, never acknowledged.
    // (The process itself rejoins as a new node and may be given pchannels again, under new
    // terms: those are legitimate owners, not the zombie.)
    let zombie = Client::connect(&zombie_addr).await.unwrap();
    for p in &moved {
        let producer = zombie.producer(
            p,
            ProducerOptions {
                retry_timeout: Duration::from_secs(1),
                term: old_term[p],
                ..ProducerOptions::default()
            },
        );
        let msg = MutableMessage::new(MessageType::Data, "zombie", Bytes::from("zombie-write"));
        let e = match producer.append(msg).await {
            Err(e) => e,
            Ok(r) => panic!(
                "the old owner acknowledged a write after the new owner's fence: {p} {r:?}; its log:\n{}",
                c.node_by_id(victim).log()
            ),
        };
        assert!(
            matches!(
                e.code(),
                ErrorCode::ChannelFenced
                    | ErrorCode::ChannelNotFound
                    | ErrorCode::StorageUnavailable
            ),
            "{e}"
        );
    }
    // The cluster's own clients moved on to the new owners without an error.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let outcome = load.finish().await;
    let payloads = verify(&c.client().await, &outcome).await;
    assert!(
        !payloads.contains("zombie-write"),
        "a write of the fenced node is readable"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_coordinator_killed_under_load_is_replaced_and_no_tick_repeats() {
    let mut c = Cluster::start(2, 2, PCHANNELS, "").await;
    let load = Load::start(c.addrs()).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let s = c.status().await.unwrap();
    let leader = s.leader.clone().unwrap();
    let i = c
        .coords
        .iter()
        .position(|p| leader.address.ends_with(&p.addr))
        .unwrap();
    c.coords[i].kill();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(s) = c.status().await
            && let Some(l) = s.leader
            && l.epoch > leader.epoch
        {
            break;
        }
        assert!(Instant::now() < deadline, "no new leader");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before = load.acked();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        load.acked() > before,
        "producers carried on under the new leader"
    );
    // The new leader serves the catalog.
    let client = c.client().await;
    let schema = walden_schema::Schema::from_json(
        r#"{"fields":[{"name":"id","type":"int64","primary_key":true},{"name":"v","type":"float_vector","dim":2}]}"#,
    )
    .unwrap();
    client
        .collections()
        .create("after_failover", &schema, 2)
        .await
        .unwrap();
    let outcome = load.finish().await;
    verify(&client, &outcome).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manual_move_and_a_drain_under_load_cause_no_client_error() {
    let c = Cluster::start(1, 3, PCHANNELS, "").await;
    let load = Load::start(c.addrs()).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let client = c.client().await;
    let s = c.status().await.unwrap();
    let p0 = s
        .pchannels
        .iter()
        .find(|p| p.pchannel == "walden-dml-0")
        .unwrap();
    let to = s
        .nodes
        .iter()
        .map(|n| n.node.as_ref().unwrap().id)
        .find(|id| *id != p0.node_id)
        .unwrap();
    client.move_pchannel("walden-dml-0", to).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = c.status().await.unwrap();
        if s.pchannels.iter().any(|p| {
            p.pchannel == "walden-dml-0"
                && p.node_id == to
                && p.state() == AssignmentState::Assigned
        }) {
            break;
        }
        assert!(Instant::now() < deadline, "the move did not happen");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (drained, moved) = busiest(&c).await;
    client.drain_node(drained).await.unwrap();
    moved_off(&c, drained, &moved, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let outcome = load.finish().await;
    verify(&client, &outcome).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_started_before_the_coordinator_and_an_etcd_restart_converge() {
    let mut c = Cluster::start(0, 2, PCHANNELS, "").await;
    // Nodes wait for assignments; the coordinator arrives later.
    tokio::time::sleep(Duration::from_millis(500)).await;
    c.add_coord().await;
    c.converged(PCHANNELS, Duration::from_secs(30)).await;
    c.etcd.restart().unwrap();
    c.converged(PCHANNELS, Duration::from_secs(30)).await;
    let client = c.client().await;
    let p = client.producer("walden-dml-1", ProducerOptions::default());
    let r = p
        .append(MutableMessage::new(
            MessageType::Data,
            "v",
            Bytes::from("after-restart"),
        ))
        .await
        .unwrap();
    let read = read_to_end(&client, "walden-dml-1").await;
    assert!(
        read.iter()
            .any(|m| m.id == r.id && m.payload == "after-restart")
    );
}

#[tokio::test]
async fn a_node_on_the_local_wal_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(common::WALDEN)
        .args([
            "node",
            "--etcd",
            "http://127.0.0.1:1",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "",
        ])
        .arg("--data-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("wal.storage") && err.contains("could never move"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_stopped_with_sigterm_hands_its_pchannels_over_before_it_exits() {
    let mut c = Cluster::start(1, 3, PCHANNELS, "").await;
    let load = Load::start(c.addrs()).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (id, moved) = busiest(&c).await;
    let stopped = Instant::now();
    let status = c
        .node_by_id(id)
        .stop(Duration::from_secs(30))
        .expect("the node exits after its drain");
    assert!(status.success(), "{status}");
    // Its pchannels were moved before the exit, not recovered after a lease expiry.
    let s = c.status().await.unwrap();
    for p in &moved {
        let r = s.pchannels.iter().find(|r| &r.pchannel == p).unwrap();
        assert_ne!(r.node_id, id, "{p} still on the stopped node");
        assert_eq!(
            r.state(),
            AssignmentState::Assigned,
            "{p} not served at the exit"
        );
    }
    eprintln!("node {id} drained and exited in {:?}", stopped.elapsed());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let outcome = load.finish().await;
    verify(&c.client().await, &outcome).await;
}

/// With bearer tokens on, the cluster's own calls (a node's ticks from the leader, the
/// catalog's appends) carry the cluster's token, and a caller without one is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_bearer_tokens_the_cluster_works_for_callers_with_one_and_refuses_the_rest() {
    let tokens = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(tokens.path(), "cluster-secret\n").unwrap();
    let extra = format!(
        "[server]\nauth_token_file = {:?}\n",
        tokens.path().display().to_string()
    );
    let with = walden_client::ConnectOptions {
        token: Some("cluster-secret".into()),
        tls_ca_pem: None,
    };
    let c = Cluster::start_with(1, 2, PCHANNELS, &extra, with).await;
    let client = c.client().await;
    let r = client
        .producer("walden-dml-0", ProducerOptions::default())
        .append(MutableMessage::new(
            MessageType::Data,
            "v",
            Bytes::from("x"),
        ))
        .await
        .unwrap();
    assert!(r.tick.0 > 0);
    let schema = walden_schema::Schema::from_json(
        r#"{"fields":[{"name":"id","type":"int64","primary_key":true},{"name":"v","type":"float_vector","dim":2}]}"#,
    )
    .unwrap();
    client
        .collections()
        .create("secured", &schema, 2)
        .await
        .unwrap();

    let anonymous = Client::connect(&c.addrs()).await.unwrap();
    let e = anonymous
        .producer(
            "walden-dml-0",
            ProducerOptions {
                retry_timeout: Duration::from_secs(1),
                ..ProducerOptions::default()
            },
        )
        .append(MutableMessage::new(
            MessageType::Data,
            "v",
            Bytes::from("y"),
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), ErrorCode::Unauthenticated, "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_held_by_a_killed_nodes_flusher_are_flushed_by_the_new_owner_exactly_once() {
    let mut c = Cluster::start(1, 2, 2, "[flush]\ncheckpoint_interval_ms = 100\n").await;
    let client = c.client().await;
    let schema = walden_schema::Schema::from_json(
        r#"{"fields":[{"name":"id","type":"int64","primary_key":true},
                      {"name":"emb","type":"float_vector","dim":2}]}"#,
    )
    .unwrap();
    client
        .collections()
        .create("docs", &schema, 2)
        .await
        .unwrap();
    let insert = |ids: std::ops::Range<i64>| {
        let rows: Vec<serde_json::Value> = ids
            .map(|i| serde_json::json!({"id": i, "emb": [i as f64, 1.0]}))
            .collect();
        let batch = schema.rows_from_json(&rows).unwrap();
        let client = client.clone();
        async move {
            client
                .collections()
                .insert("docs", None, &[batch])
                .await
                .unwrap()
        }
    };
    insert(0..300).await;
    client
        .flush_and_wait("docs", Duration::from_secs(60))
        .await
        .unwrap();
    // Growing rows only the killed node's flusher held in memory.
    insert(300..400).await;
    let (victim, pchannels) = busiest(&c).await;
    c.node_by_id(victim).kill();
    moved_off(&c, victim, &pchannels, Duration::from_secs(30)).await;
    insert(400..600).await;
    client
        .flush_and_wait("docs", Duration::from_secs(60))
        .await
        .unwrap();
    let addrs = c.addrs();
    let segments = common::ok_json(&[
        "segments",
        "--collection",
        "docs",
        "--json",
        "--addr",
        &addrs,
    ]);
    let got = common::parquet_rows(&segments, "id");
    let ids: Vec<i64> = got["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, (0..600).collect::<Vec<_>>());
    for (id, n) in got["row_copies"].as_object().unwrap() {
        assert_eq!(n.as_u64(), Some(1), "row {id} is in the files {n} times");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_member_etcd_losing_its_leader_then_its_quorum_loses_and_doubles_nothing() {
    let etcd = walden_metastore_etcd::testing::EtcdServer::start_cluster(3)
        .expect("3 etcd members (scripts/install-test-deps.sh installs etcd)");
    let mut c = Cluster::start_on(etcd, 2, 3, PCHANNELS, "", Default::default()).await;
    let load = Load::start(c.addrs()).await;
    load.more(300, "at start").await;

    // The etcd leader dies: a new one is elected, and the cluster writes on.
    let leader = c.etcd.leader().expect("an etcd leader");
    c.etcd.kill_member(leader);
    let killed = Instant::now();
    load.more(300, "after the etcd leader died").await;
    eprintln!(
        "etcd leader {leader} killed: 300 more acknowledged in {:?}",
        killed.elapsed()
    );
    let status = c.status().await.expect("the cluster answers");
    assert!(
        status
            .pchannels
            .iter()
            .all(|p| p.state() == AssignmentState::Assigned)
    );

    // A second member dies: no quorum. Nothing acknowledged is lost meanwhile, and the
    // coordinators say why they cannot place.
    let second = (0..3).find(|i| *i != leader).unwrap();
    c.etcd.kill_member(second);
    let lost = load.acked();
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert!(!c.etcd.healthy(), "no quorum with one member of three");
    eprintln!("quorum lost: {} acknowledged in 8 s", load.acked() - lost);
    // The leader coordinator cannot keep its lease: it steps down (no placement without etcd)
    // and says why; the standby's campaign fails for the same reason.
    let logs: String = c.coords.iter().map(|p| p.log()).collect();
    assert!(
        logs.contains("metastore unavailable: etcd")
            && (logs.contains("stepping down") || logs.contains("campaign failed")),
        "the coordinators do not say why they stopped placing: {logs}"
    );

    // Both come back: the cluster writes on; every acknowledged message once, in order.
    c.etcd.restart_member(leader).unwrap();
    c.etcd.restart_member(second).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !c.etcd.healthy() {
        assert!(Instant::now() < deadline, "etcd never healthy again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    load.more(300, "after the quorum came back").await;
    c.converged(PCHANNELS, Duration::from_secs(30)).await;
    let outcome = load.finish().await;
    verify(&c.client().await, &outcome).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_partitioned_from_etcd_stops_acknowledging_within_its_lease_and_clients_move_on() {
    let netns = match common::netns::Netns::create() {
        Ok(n) => n,
        Err(e) => {
            let root = std::process::Command::new("id")
                .arg("-u")
                .output()
                .is_ok_and(|o| o.stdout.starts_with(b"0"));
            assert!(!root, "root could not make a network namespace: {e}");
            eprintln!("skipped: network namespaces need root ({e})");
            return;
        }
    };
    let etcd = walden_metastore_etcd::testing::EtcdServer::start_cluster_on(1, Some(&netns.etcd))
        .expect("etcd");
    let mut c = Cluster::start_on(etcd, 0, 0, PCHANNELS, "", Default::default()).await;
    c.host = netns.host.clone();
    c.add_coord().await;
    // The node inside the namespace first: it takes pchannels before the other joins.
    c.add_node_in(&netns).await;
    c.add_node().await;
    let status = c.converged(PCHANNELS, Duration::from_secs(30)).await;
    let inside = c.nodes[0].node_id.expect("node id");
    let mut cut: Vec<String> = status
        .pchannels
        .iter()
        .filter(|p| p.node_id == inside)
        .map(|p| p.pchannel.clone())
        .collect();
    if cut.is_empty() {
        let pc = pchannel(0);
        c.client().await.move_pchannel(&pc, inside).await.unwrap();
        cut.push(pc);
        c.converged(PCHANNELS, Duration::from_secs(30)).await;
    }
    let load = Load::start(c.addrs()).await;
    load.more(300, "at start").await;

    // A writer that keeps at the cut node itself (no routing): when does it last hear "ok"?
    let acks = Arc::new(std::sync::Mutex::new(Vec::<Instant>::new()));
    let stop_direct = Arc::new(AtomicBool::new(false));
    let direct = {
        let (addr, pc, acks, stop) = (
            c.nodes[0].addr.clone(),
            cut[0].clone(),
            acks.clone(),
            stop_direct.clone(),
        );
        tokio::spawn(async move {
            let client = Client::connect(&addr).await.unwrap();
            let p = client.producer(
                &pc,
                ProducerOptions {
                    retry_timeout: Duration::ZERO,
                    ..ProducerOptions::default()
                },
            );
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let msg = MutableMessage::new(
                    MessageType::Data,
                    "direct",
                    Bytes::from(format!("direct-{i}")),
                );
                i += 1;
                if p.append(msg).await.is_ok() {
                    acks.lock().unwrap().push(Instant::now());
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!acks.lock().unwrap().is_empty(), "the direct writer wrote");

    // Cut from etcd, still reachable by clients: it must stop acknowledging within its lease
    // (2 s), its pchannels move, and the routed producers follow them.
    let cut_at = Instant::now();
    netns.cut_etcd();
    moved_off(&c, inside, &cut, Duration::from_secs(30)).await;
    let moved_after = cut_at.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop_direct.store(true, Ordering::Relaxed);
    direct.await.unwrap();
    let last = *acks.lock().unwrap().last().unwrap();
    let quiet_after = last.saturating_duration_since(cut_at);
    eprintln!(
        "cut from etcd: last acknowledgement {quiet_after:?} after, moved after {moved_after:?}"
    );
    assert!(
        quiet_after <= Duration::from_secs(2),
        "the partitioned node acknowledged {quiet_after:?} after the cut (lease 2 s)"
    );
    load.more(300, "after the cut from etcd").await;
    netns.heal_etcd();

    // The node comes back (a new registration); a pchannel moved onto it, then the whole
    // namespace cut: clients cannot reach it, its lease ends, and they move on again.
    let deadline = Instant::now() + Duration::from_secs(30);
    let back = loop {
        if let Some(s) = c.status().await
            && let Some(n) = s
                .nodes
                .iter()
                .filter_map(|n| n.node.as_ref())
                .find(|n| n.address.contains(&netns.inside) && n.id != inside)
        {
            break n.id;
        }
        assert!(
            Instant::now() < deadline,
            "the partitioned node never came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // The balancer spreads pchannels onto it; if it does not soon, one is moved there.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut asked = Instant::now();
    let pc = loop {
        if let Some(s) = c.status().await
            && let Some(p) = s
                .pchannels
                .iter()
                .find(|p| p.node_id == back && p.state() == AssignmentState::Assigned)
        {
            break p.pchannel.clone();
        }
        if asked.elapsed() > Duration::from_secs(3) {
            let _ = c.client().await.move_pchannel(&cut[0], back).await;
            asked = Instant::now();
        }
        assert!(
            Instant::now() < deadline,
            "node {back} never served a pchannel: {:?}",
            c.status().await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    load.more(200, "on the node back").await;
    netns.cut_all();
    moved_off(&c, back, std::slice::from_ref(&pc), Duration::from_secs(30)).await;
    load.more(300, "after the full cut").await;
    netns.heal_all();

    // Every acknowledged message once, in order; and in every pchannel's log the terms never
    // go back: the old owner's writes and the new one's do not interleave.
    let outcome = load.finish().await;
    let client = c.client().await;
    verify(&client, &outcome).await;
    for p in 0..PCHANNELS {
        let mut term = 0;
        for m in read_to_end(&client, &pchannel(p)).await {
            assert!(
                m.header.term >= term,
                "{}: term {} after {term} at id {}",
                pchannel(p),
                m.header.term,
                m.id
            );
            term = m.header.term;
        }
    }
}
