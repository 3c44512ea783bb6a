//! Transactions across kill -9 with a real `walden standalone` process: committed transactions
//! are delivered whole and exactly once; transactions left open, or cut by a kill before their
//! commit was durable, never; none is ever delivered in part.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use common::{Server, read_to_end};
use rand::{Rng, SeedableRng, rngs::StdRng};
use walden_client::ProducerOptions;
use walden_message::{MessageType, MutableMessage};

const WORKERS: usize = 4;
const PCHANNELS: usize = 2;
const KILLS: usize = 6;

/// What each worker knows of its transactions, by name (`w{worker}-{n}`): body payloads and
/// outcome.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Outcome {
    /// The commit was acknowledged: must be delivered once, whole.
    Committed(Vec<String>),
    /// The commit was sent but its answer lost to a kill: delivered whole once, or never.
    Unknown(Vec<String>),
    /// Never committed (left open on purpose, rolled back, or cut before the commit): never.
    NotCommitted,
}

type Outcomes = Arc<Mutex<HashMap<String, Outcome>>>;

async fn worker(addr: String, w: usize, outcomes: Outcomes, stop: Arc<AtomicBool>) {
    let client = walden_client::Client::connect(&addr).await.unwrap();
    let pchannel = format!("walden-dml-{}", w % PCHANNELS);
    let vchannel = format!("txn-v{w}");
    let producer = client.producer(
        &pchannel,
        ProducerOptions {
            retry_timeout: Duration::from_secs(60),
            ..ProducerOptions::default()
        },
    );
    let mut rng = StdRng::seed_from_u64(w as u64);
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let name = format!("w{w}-{n}");
        outcomes
            .lock()
            .unwrap()
            .insert(name.clone(), Outcome::NotCommitted);
        let Ok(txn) = producer.begin_txn(&vchannel, None).await else {
            continue;
        };
        let body: Vec<String> = (0..rng.random_range(1..6))
            .map(|j| format!("{name}-{j}"))
            .collect();
        let mut ok = true;
        for b in &body {
            let m =
                MutableMessage::new(MessageType::Data, vchannel.clone(), Bytes::from(b.clone()));
            if txn.append(m).await.is_err() {
                ok = false;
                break;
            }
        }
        if !ok {
            continue;
        }
        match n % 7 {
            // Left open: its producer moves on as if it had died.
            0 => continue,
            1 => {
                let _ = txn.rollback().await;
                continue;
            }
            _ => {}
        }
        outcomes
            .lock()
            .unwrap()
            .insert(name.clone(), Outcome::Unknown(body.clone()));
        if txn.commit().await.is_ok() {
            outcomes
                .lock()
                .unwrap()
                .insert(name, Outcome::Committed(body));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_transactions_survive_kill_9_whole_and_once_and_open_ones_never_appear() {
    let dir = tempfile::tempdir().unwrap();
    let config = format!("[node]\npchannels = {PCHANNELS}\n");
    let mut server = Server::start(&dir.path().join("data"), Some(&config)).await;
    let outcomes: Outcomes = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = (0..WORKERS)
        .map(|w| {
            tokio::spawn(worker(
                server.addr.clone(),
                w,
                outcomes.clone(),
                stop.clone(),
            ))
        })
        .collect();
    let mut rng = StdRng::seed_from_u64(7);
    for _ in 0..KILLS {
        tokio::time::sleep(Duration::from_millis(rng.random_range(200..600))).await;
        server.kill();
        server.restart().await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }

    let client = server.client().await;
    let mut delivered: HashMap<String, Vec<Vec<String>>> = HashMap::new();
    for p in 0..PCHANNELS {
        for m in read_to_end(&client, &format!("walden-dml-{p}")).await {
            match m.message_type() {
                MessageType::Txn => {
                    let body: Vec<String> = m
                        .txn_messages()
                        .unwrap()
                        .iter()
                        .filter(|x| x.message_type() == MessageType::Data)
                        .map(|x| String::from_utf8(x.payload.to_vec()).unwrap())
                        .collect();
                    let name = body[0].rsplit_once('-').unwrap().0.to_owned();
                    delivered.entry(name).or_default().push(body);
                }
                MessageType::Data => panic!("a transaction's body was delivered on its own: {m:?}"),
                _ => {}
            }
        }
    }
    let outcomes = outcomes.lock().unwrap();
    let mut committed = 0;
    for (name, outcome) in outcomes.iter() {
        let got = delivered.remove(name).unwrap_or_default();
        match outcome {
            Outcome::Committed(body) => {
                assert_eq!(
                    got,
                    vec![body.clone()],
                    "{name}: committed, delivered {got:?}"
                );
                committed += 1;
            }
            Outcome::Unknown(body) => {
                assert!(
                    got.is_empty() || got == vec![body.clone()],
                    "{name}: {got:?}"
                );
            }
            Outcome::NotCommitted => assert!(got.is_empty(), "{name} was never committed: {got:?}"),
        }
    }
    assert!(
        delivered.is_empty(),
        "delivered but never begun: {delivered:?}"
    );
    assert!(committed > 50, "only {committed} transactions committed");
    let open = outcomes
        .values()
        .filter(|o| **o == Outcome::NotCommitted)
        .count();
    assert!(open > 10, "only {open} transactions left uncommitted");
}
