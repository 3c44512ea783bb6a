//! Query nodes in a real cluster (etcd, `walden coord`, `walden node`, `walden query-node`
//! processes): flushed segments move from the delegator to query nodes placed by the
//! coordinator with two replicas, deletes after the flush are forwarded to them, and searches
//! in flight while a query node or a read replica's node is killed with SIGKILL are answered
//! exactly within 2 s by another copy (with the client's retries off, or counted); another
//! query node joins, and the last one goes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::{
    collections::{BTreeMap, HashSet},
    time::{Duration, Instant},
};

use common::cluster::Cluster;
use rand::{Rng, SeedableRng, rngs::StdRng};
use serde_json::{Value, json};
use walden_client::{Client, Consistency, SearchOptions};
use walden_common::HasErrorCode;
use walden_proto::v1::DeleteIds;
use walden_schema::Schema;

const DIM: usize = 16;
const SCHEMA: &str = r#"{"fields":[
  {"name":"id","type":"int64","primary_key":true},
  {"name":"emb","type":"float_vector","dim":16},
  {"name":"n","type":"int64"}]}"#;

fn vector(rng: &mut StdRng) -> Vec<f32> {
    (0..DIM).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

fn l2(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
}

fn nearest(model: &BTreeMap<i64, Vec<f32>>, q: &[f32]) -> Vec<i64> {
    let mut all: Vec<(f32, i64)> = model.iter().map(|(id, v)| (l2(q, v), *id)).collect();
    all.sort_by(|a, b| a.0.total_cmp(&b.0));
    all.into_iter().take(10).map(|x| x.1).collect()
}

async fn search(client: &Client, q: &[f32]) -> Result<Vec<i64>, walden_client::ClientError> {
    search_at(client, q, Consistency::Strong).await
}

/// Ten searches exact against the model, and the count.
async fn exact(client: &Client, model: &BTreeMap<i64, Vec<f32>>, rng: &mut StdRng, what: &str) {
    for _ in 0..10 {
        let q = vector(rng);
        let got = search(client, &q)
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(got, nearest(model, &q), "{what}");
    }
    assert_eq!(
        client.count("docs", "", Consistency::Strong).await.unwrap(),
        model.len() as u64,
        "{what}: count"
    );
}

/// Waits until every shard serves its flushed rows from synced copies (none growing).
async fn served_sealed(client: &Client, rows: u64, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(shards) = client.shards("docs").await {
            let sealed: u64 = shards.iter().map(|s| s.sealed_rows).sum();
            let growing: u64 = shards.iter().map(|s| s.growing_rows).sum();
            if sealed == rows && growing == 0 {
                return;
            }
            assert!(Instant::now() < deadline, "{what}: {shards:?}");
        }
        assert!(Instant::now() < deadline, "{what}: shards unreachable");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn wait_for_log(p: &common::cluster::Proc, text: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !p.log().contains(text) {
        assert!(
            Instant::now() < deadline,
            "{} never logged {text:?}",
            p.role
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_nodes_serve_flushed_segments_with_replicas_and_survive_a_killed_node() {
    let mut c = Cluster::start(1, 1, 2, "").await;
    // Query nodes serve /metrics: the kill below waits until reads reach the victim.
    c.metrics = true;
    c.add_query_node().await;
    c.add_query_node().await;
    let client = c.client().await;
    let schema = Schema::from_json(SCHEMA).unwrap();
    client
        .collections()
        .create("docs", &schema, 2)
        .await
        .unwrap();
    client.collections().load("docs", 2).await.unwrap();
    let mut rng = StdRng::seed_from_u64(146);
    let mut model: BTreeMap<i64, Vec<f32>> = BTreeMap::new();
    for b in 0..4 {
        let rows: Vec<Value> = (b * 500..b * 500 + 500)
            .map(|id| {
                let v = vector(&mut rng);
                model.insert(id, v.clone());
                json!({"id": id, "emb": v, "n": id % 10})
            })
            .collect();
        client
            .collections()
            .insert("docs", None, &[schema.rows_from_json(&rows).unwrap()])
            .await
            .unwrap();
    }
    exact(&client, &model, &mut rng, "growing").await;

    // Flushed: both query nodes load every segment (2 replicas), the delegators hand the rows
    // over and hold none of them.
    client
        .flush_and_wait("docs", Duration::from_secs(60))
        .await
        .unwrap();
    served_sealed(&client, 2000, "after the flush").await;
    for q in &c.query_nodes {
        wait_for_log(q, "segments loaded");
    }
    exact(&client, &model, &mut rng, "on query nodes").await;

    // Deletes after the flush reach the query nodes' copies (forwarded, not in a delete log).
    let gone: Vec<i64> = (0..2000).step_by(13).collect();
    client
        .collections()
        .delete(
            "docs",
            None,
            &DeleteIds {
                int_ids: gone.clone(),
                str_ids: vec![],
            },
        )
        .await
        .unwrap();
    for id in &gone {
        let v = model.remove(id).unwrap();
        let got = search(&client, &v).await.unwrap();
        assert!(!got.contains(id), "deleted {id} came back: {got:?}");
    }
    exact(&client, &model, &mut rng, "after deletes").await;

    // kill -9 one query node while searches are in flight, with the client's read retries off:
    // the delegators ask another copy, so every search is exact and answered within 2 s.
    let strict = client.clone().with_read_retry(Duration::ZERO);
    let run = searches_through(&strict, &model, &mut rng, Consistency::Strong, |reads| {
        stop_then_kill(&mut c.query_nodes[0], reads)
    })
    .await;
    run.check("a query node killed");
    assert_eq!(strict.read_retries(), 0, "the client never asked again");
    let node_log: String = c.nodes.iter().map(|n| n.log()).collect();
    assert!(
        node_log.contains("query node failed a read; asking another copy"),
        "no read met the dead query node ({} reads): {}",
        run.reads.len(),
        node_log
            .lines()
            .filter(|l| l.contains("WARN"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    exact(&client, &model, &mut rng, "one replica lost").await;

    // A new query node takes the lost copies (with the deletes), then the other one goes.
    c.add_query_node().await;
    wait_for_log(&c.query_nodes[2], "segments loaded");
    tokio::time::sleep(Duration::from_secs(1)).await;
    c.query_nodes[1].kill();
    exact(&client, &model, &mut rng, "served by the new query node").await;

    // No query node left: the placement goes and the delegators hold the segments themselves.
    c.query_nodes[2].kill();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let q = vector(&mut rng);
        match search(&client, &q).await {
            Ok(got) => {
                assert_eq!(got, nearest(&model, &q), "without query nodes");
                break;
            }
            Err(e) => assert!(e.code().is_retryable() && Instant::now() < deadline, "{e}"),
        }
    }
    served_sealed(&client, 2000, "back in the delegators").await;
    exact(&client, &model, &mut rng, "back in the delegators").await;
}

async fn search_at(
    client: &Client,
    q: &[f32],
    consistency: Consistency,
) -> Result<Vec<i64>, walden_client::ClientError> {
    let hits = client
        .search(
            "docs",
            &[q.to_vec()],
            &SearchOptions {
                top_k: 10,
                consistency,
                ..Default::default()
            },
        )
        .await?;
    Ok(hits[0].iter().map(|h| h.id.as_i64().unwrap()).collect())
}

/// What the delegator at `addr` holds of `vchannel`, if it serves it.
async fn shard_at(addr: &str, vchannel: &str) -> Option<walden_proto::v1::ShardState> {
    let mut c = walden_proto::v1::query_client::QueryClient::connect(addr.to_owned())
        .await
        .ok()?;
    let r = c
        .shards(walden_proto::v1::ShardsRequest {
            vchannels: vec![vchannel.to_owned()],
        })
        .await
        .ok()?;
    r.into_inner().shards.pop()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_replicas_on_other_streaming_nodes_serve_reads_and_losing_one_fails_no_read() {
    let mut c = Cluster::start(1, 3, 2, "").await;
    let client = c.client().await;
    let schema = Schema::from_json(SCHEMA).unwrap();
    client
        .collections()
        .create("docs", &schema, 2)
        .await
        .unwrap();
    client.collections().load("docs", 3).await.unwrap();
    let mut rng = StdRng::seed_from_u64(147);
    let mut model: BTreeMap<i64, Vec<f32>> = BTreeMap::new();
    let mut insert = |lo: i64, hi: i64, model: &mut BTreeMap<i64, Vec<f32>>| {
        let rows: Vec<Value> = (lo..hi)
            .map(|id| {
                let v = vector(&mut rng);
                model.insert(id, v.clone());
                json!({"id": id, "emb": v, "n": id % 10})
            })
            .collect();
        schema.rows_from_json(&rows).unwrap()
    };
    let batch = insert(0, 1000, &mut model);
    client
        .collections()
        .insert("docs", None, &[batch])
        .await
        .unwrap();
    // Half of the rows flushed: a replica starts from the manifest, then reads the WAL.
    client
        .flush_and_wait("docs", Duration::from_secs(60))
        .await
        .unwrap();
    let batch = insert(1000, 2000, &mut model);
    client
        .collections()
        .insert("docs", None, &[batch])
        .await
        .unwrap();

    // Every vchannel gets two read replicas (three copies), on the nodes other than its
    // pchannel's owner, which hold every row.
    let deadline = Instant::now() + Duration::from_secs(60);
    let info = loop {
        let info = client.collections().describe("docs").await.unwrap();
        if info.read_replicas.len() == 2 && info.read_replicas.iter().all(|r| r.nodes.len() == 2) {
            break info;
        }
        assert!(Instant::now() < deadline, "no read replicas: {info:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let status = c.status().await.unwrap();
    for r in &info.read_replicas {
        let owner = status
            .pchannels
            .iter()
            .find(|p| p.pchannel == r.pchannel)
            .unwrap()
            .node_id;
        assert_ne!(r.nodes[0], owner, "a replica is never on the owner");
        loop {
            if let Some(s) = shard_at(&r.addresses[0], &r.vchannel).await
                && s.growing_rows + s.sealed_rows > 0
                && s.served_tick > 0
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "replica of {} not serving",
                r.vchannel
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let rows_at = |r: &walden_proto::v1::ShardState| r.growing_rows + r.sealed_rows;
    let mut total = 0;
    for r in &info.read_replicas {
        total += rows_at(&shard_at(&r.addresses[0], &r.vchannel).await.unwrap());
    }
    assert_eq!(total, 2000, "the replicas hold every row");

    // Reads at every level are exact, spread over owners and replicas (session: the replica
    // waits for this client's writes; strong: a fresh tick from the oracle on a replica).
    for consistency in [
        Consistency::Session,
        Consistency::Strong,
        Consistency::Session,
    ] {
        for _ in 0..10 {
            let q = vector(&mut rng);
            let got = search_at(&client, &q, consistency).await.unwrap();
            assert_eq!(got, nearest(&model, &q), "{consistency:?}");
        }
    }
    // A delete is seen through the replicas too.
    let gone: Vec<i64> = (0..2000).step_by(17).collect();
    client
        .collections()
        .delete(
            "docs",
            None,
            &DeleteIds {
                int_ids: gone.clone(),
                str_ids: vec![],
            },
        )
        .await
        .unwrap();
    for id in &gone {
        model.remove(id);
    }
    for _ in 0..20 {
        let q = vector(&mut rng);
        let got = search_at(&client, &q, Consistency::Session).await.unwrap();
        assert_eq!(got, nearest(&model, &q), "after deletes");
    }

    // The replicas alone (asked directly, strong: the owner's last tick) hold the answer.
    for _ in 0..5 {
        let q = vector(&mut rng);
        let mut hits: Vec<(f32, i64)> = Vec::new();
        for r in &info.read_replicas {
            let mut c =
                walden_proto::v1::query_client::QueryClient::connect(r.addresses[0].clone())
                    .await
                    .unwrap();
            let answer = c
                .search(walden_proto::v1::SearchRequest {
                    collection: "docs".into(),
                    vchannels: vec![r.vchannel.clone()],
                    vectors: vec![walden_proto::v1::FloatVector { values: q.clone() }],
                    top_k: 10,
                    options: Some(walden_proto::v1::ReadOptions {
                        consistency: walden_proto::v1::ConsistencyLevel::Strong as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            let h = &answer.results[0];
            hits.extend(h.distances.iter().copied().zip(h.int_ids.iter().copied()));
        }
        hits.sort_by(|a, b| a.0.total_cmp(&b.0));
        let got: Vec<i64> = hits.iter().take(10).map(|h| h.1).collect();
        assert_eq!(got, nearest(&model, &q), "the replicas alone");
    }

    // kill -9 the node of a replica during reads: each read in flight is asked of the next copy
    // at once (every retry counted), and every read is exact within 2 s.
    // The victim holds replicas and owns no pchannel (with 3 copies on 3 nodes, every node
    // that owns none holds a replica of each vchannel).
    let owners: HashSet<u64> = c
        .status()
        .await
        .unwrap()
        .pchannels
        .iter()
        .map(|p| p.node_id)
        .collect();
    let victim = *info
        .read_replicas
        .iter()
        .flat_map(|r| r.nodes.iter())
        .find(|n| !owners.contains(n))
        .expect("a node holding replicas only");
    let counted = client.clone().with_read_retry(Duration::from_secs(2));
    let before = counted.read_retries();
    let run = searches_through(&counted, &model, &mut rng, Consistency::Session, |reads| {
        stop_then_kill(c.node_by_id(victim), reads)
    })
    .await;
    run.check("a read replica's node killed");
    let retries = counted.read_retries() - before;
    assert!(retries >= 1, "no read met the dead replica");
    assert!(
        retries <= 8,
        "{retries} retries: a dead copy is asked again, not passed over"
    );
    eprintln!(
        "{} reads around a replica's death, {retries} asked again",
        run.reads.len()
    );
}

/// SIGSTOP, then kill -9 200 ms later: the reads sent to the process meanwhile are in flight
/// when it dies (a kill alone races the other copies' sync, which may drop the node first).
fn stop_then_kill(p: &mut common::cluster::Proc, reads: &InFlight) {
    // First, reads reach this copy now (its count of rows scored moves): a copy that is not
    // (yet) synced would take no read, and its death would prove nothing.
    let scored = |p: &common::cluster::Proc| {
        use std::io::{Read, Write};
        let addr = p.http.clone().unwrap_or_default();
        let mut s = std::net::TcpStream::connect(&addr).expect("its /metrics");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        let mut body = String::new();
        let _ = s.read_to_string(&mut body);
        common::metric(&body, "walden_search_rows_scored_total")
    };
    if p.http.is_some() {
        let before = scored(p);
        let deadline = Instant::now() + Duration::from_secs(15);
        while scored(p) <= before {
            assert!(
                Instant::now() < deadline,
                "no read reached the copy to be killed in 15 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    p.signal("STOP");
    // A read normally takes milliseconds: one waiting 300 ms is waiting on the frozen process.
    // Killing then makes sure a read is in flight at the death (not only near it).
    let deadline = Instant::now() + Duration::from_secs(5);
    while !reads.one_waiting_for(Duration::from_millis(300)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    p.kill();
}

/// When each reader's current search started (none between searches).
#[derive(Clone, Default)]
struct InFlight(std::sync::Arc<std::sync::Mutex<Vec<Option<Instant>>>>);

impl InFlight {
    fn set(&self, reader: usize, started: Option<Instant>) {
        let mut v = self.0.lock().unwrap();
        if v.len() <= reader {
            v.resize(reader + 1, None);
        }
        v[reader] = started;
    }

    fn one_waiting_for(&self, d: Duration) -> bool {
        self.0
            .lock()
            .unwrap()
            .iter()
            .flatten()
            .any(|t| t.elapsed() >= d)
    }
}

/// One search: its query, its answer, when it started and how long it took.
type Read = (
    Vec<f32>,
    Result<Vec<i64>, walden_client::ClientError>,
    Instant,
    Duration,
);

/// Searches before, during and after a fault: each query, its answer, when it started and
/// how long it took; and when the fault struck.
struct FaultRun {
    reads: Vec<Read>,
    struck: Instant,
    model: BTreeMap<i64, Vec<f32>>,
}

impl FaultRun {
    /// Every read exact and answered within 2 s, one of them in flight when the fault struck,
    /// and reads after it.
    fn check(&self, what: &str) {
        for (i, (q, r, _, took)) in self.reads.iter().enumerate() {
            let got = r
                .as_ref()
                .unwrap_or_else(|e| panic!("{what}: read {i} failed after {took:?}: {e}"));
            assert_eq!(*got, nearest(&self.model, q), "{what}: read {i}");
            assert!(
                *took <= Duration::from_secs(2),
                "{what}: read {i} took {took:?}"
            );
        }
        let in_flight = self
            .reads
            .iter()
            .filter(|(_, _, s, t)| *s <= self.struck && self.struck <= *s + *t)
            .count();
        assert!(
            in_flight >= 1,
            "{what}: no read was in flight when the fault struck"
        );
        let after = self
            .reads
            .iter()
            .filter(|(_, _, s, _)| *s > self.struck)
            .count();
        assert!(after >= 10, "{what}: only {after} reads after the fault");
    }
}

/// Runs searches back to back on 4 tasks from 300 ms before `fault` until 1.5 s after it, so
/// that several are in flight when it strikes.
async fn searches_through(
    client: &Client,
    model: &BTreeMap<i64, Vec<f32>>,
    rng: &mut StdRng,
    consistency: Consistency,
    fault: impl FnOnce(&InFlight),
) -> FaultRun {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let in_flight = InFlight::default();
    let readers: Vec<_> = (0..4)
        .map(|reader| {
            let queries: Vec<Vec<f32>> = (0..5_000).map(|_| vector(rng)).collect();
            let (client, stop, in_flight) = (client.clone(), stop.clone(), in_flight.clone());
            tokio::spawn(async move {
                let mut out = Vec::new();
                for q in queries {
                    if stop.load(std::sync::atomic::Ordering::SeqCst) {
                        break;
                    }
                    let started = Instant::now();
                    in_flight.set(reader, Some(started));
                    let r = search_at(&client, &q, consistency).await;
                    in_flight.set(reader, None);
                    out.push((q, r, started, started.elapsed()));
                }
                out
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let struck = Instant::now();
    fault(&in_flight);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut reads = Vec::new();
    for r in readers {
        reads.extend(r.await.unwrap());
    }
    FaultRun {
        reads,
        struck,
        model: model.clone(),
    }
}
