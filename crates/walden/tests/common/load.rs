//! A cluster under load for fault tests: idempotent producers over every pchannel and a
//! tailing consumer of each, through the coordinators; then every pchannel read back and checked
//! against what was acknowledged and what each tail delivered.

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use walden_client::{Client, ProducerOptions};
use walden_common::MessageId;
use walden_message::{MessageType, MutableMessage};
use walden_proto::v1::AssignmentState;

use super::{cluster::Cluster, read_to_end};

pub const PCHANNELS: usize = 4;
pub const PRODUCERS: usize = 8;

pub type Acked = Arc<Mutex<HashMap<(usize, u64), (String, MessageId)>>>;

pub fn pchannel(i: usize) -> String {
    format!("walden-dml-{}", i % PCHANNELS)
}

/// Idempotent producers over every pchannel, and a tailing consumer of each, through the
/// coordinators.
pub struct Load {
    pub acked: Acked,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<u64>>,
    tails: Vec<tokio::task::JoinHandle<Vec<MessageId>>>,
    /// Once the producers stopped: the last acknowledged id of each pchannel, which its tail
    /// must deliver before it stops.
    ends: Arc<std::sync::Mutex<Option<Vec<MessageId>>>>,
}

/// What a run left: the acknowledgements and what each pchannel's tail delivered, in order.
pub struct Outcome {
    pub acked: HashMap<(usize, u64), (String, MessageId)>,
    pub tailed: Vec<Vec<MessageId>>,
}

/// Consumes one pchannel from the start, following it through every move, until it delivered
/// the pchannel's last acknowledged message (`ends`, set once the producers stopped); fails
/// the test if that takes over 60 s.
async fn tail(
    addrs: String,
    pc: usize,
    ends: Arc<std::sync::Mutex<Option<Vec<MessageId>>>>,
) -> Vec<MessageId> {
    let client = Client::connect(&addrs).await.unwrap();
    let mut consumer = client.consumer(
        &pchannel(pc),
        walden_client::ConsumerOptions {
            from: walden_client::DeliverFrom::All,
            retry_timeout: Duration::from_secs(60),
            ..walden_client::ConsumerOptions::default()
        },
    );
    let mut ids: Vec<MessageId> = Vec::new();
    let mut deadline = None;
    loop {
        let end = ends.lock().unwrap().as_ref().map(|e| e[pc]);
        if let Some(end) = end {
            if ids.last().is_some_and(|last| *last >= end) {
                return ids;
            }
            let d = *deadline.get_or_insert_with(|| Instant::now() + Duration::from_secs(60));
            assert!(
                Instant::now() < d,
                "the consumer of {} delivered {} messages, up to {:?}, not {end}",
                pchannel(pc),
                ids.len(),
                ids.last()
            );
        }
        match tokio::time::timeout(Duration::from_millis(100), consumer.next()).await {
            Ok(Some(Ok(m))) => ids.push(m.id),
            Ok(Some(Err(e))) => panic!("the consumer of {} gave up: {e}", pchannel(pc)),
            Ok(None) => panic!("the consumer of {} ended", pchannel(pc)),
            Err(_) => {}
        }
    }
}

impl Load {
    pub async fn start(addrs: String) -> Self {
        let acked: Acked = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..PRODUCERS)
            .map(|i| tokio::spawn(produce(addrs.clone(), i, acked.clone(), stop.clone())))
            .collect();
        let ends = Arc::new(std::sync::Mutex::new(None));
        let tails = (0..PCHANNELS)
            .map(|pc| tokio::spawn(tail(addrs.clone(), pc, ends.clone())))
            .collect();
        Self {
            acked,
            stop,
            tasks,
            tails,
            ends,
        }
    }

    pub fn acked(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    /// Waits until `more` messages past those acknowledged now are acknowledged; fails the
    /// test, naming `what`, if that takes over 30 s.
    pub async fn more(&self, more: usize, what: &str) {
        let target = self.acked() + more;
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.acked() < target {
            assert!(Instant::now() < deadline, "{what}: producers stalled");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the producers, then lets each tail deliver through its pchannel's last
    /// acknowledged message; every message sent must be acknowledged (the producers panic if
    /// not), and no consumer may give up or fall short.
    pub async fn finish(self) -> Outcome {
        self.stop.store(true, Ordering::Relaxed);
        let mut sent = 0;
        for t in self.tasks {
            sent += t.await.expect("a producer failed");
        }
        let mut ends = vec![MessageId(0); PCHANNELS];
        for (pchannel_name, id) in self.acked.lock().unwrap().values() {
            let pc = (0..PCHANNELS)
                .find(|pc| pchannel(*pc) == *pchannel_name)
                .expect("a known pchannel");
            ends[pc] = ends[pc].max(*id);
        }
        *self.ends.lock().unwrap() = Some(ends);
        let mut tailed = Vec::new();
        for t in self.tails {
            tailed.push(t.await.expect("a consumer failed"));
        }
        let acked = self.acked.lock().unwrap().clone();
        assert_eq!(
            acked.len() as u64,
            sent,
            "every message sent is acknowledged"
        );
        Outcome { acked, tailed }
    }
}

async fn produce(addrs: String, producer: usize, acked: Acked, stop: Arc<AtomicBool>) -> u64 {
    let client = Client::connect(&addrs).await.unwrap();
    let pchannel = pchannel(producer);
    let p = client.producer(
        &pchannel,
        ProducerOptions {
            max_in_flight: 8,
            retry_timeout: Duration::from_secs(60),
            ..ProducerOptions::default()
        },
    );
    let mut window = std::collections::VecDeque::new();
    let mut seq = 0u64;
    let record = |s: u64, r: Result<walden_client::AppendResult, walden_client::ClientError>| {
        let r = r.unwrap_or_else(|e| panic!("p{producer}-s{s} was never acknowledged: {e}"));
        acked
            .lock()
            .unwrap()
            .insert((producer, s), (pchannel.clone(), r.id));
    };
    while !stop.load(Ordering::Relaxed) {
        let msg = MutableMessage::new(
            MessageType::Data,
            format!("v{producer}"),
            Bytes::from(format!("p{producer}-s{seq}")),
        );
        window.push_back((seq, p.send(msg).await.unwrap()));
        seq += 1;
        if window.len() >= 8 {
            let (s, f) = window.pop_front().unwrap();
            record(s, f.await);
        }
        // A steady, modest rate: the point is correctness through the faults.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for (s, f) in window {
        record(s, f.await);
    }
    seq
}

/// Reads every pchannel back: each acknowledged message exactly once, where it was
/// acknowledged, in its producer's order; ticks strictly increase per pchannel and no tick
/// appears twice anywhere (one clock for the cluster). Returns the payloads read.
pub async fn verify(client: &Client, outcome: &Outcome) -> HashSet<String> {
    let acked = &outcome.acked;
    let mut seen: HashMap<(usize, u64), (String, MessageId)> = HashMap::new();
    let mut ticks = HashSet::new();
    let mut payloads = HashSet::new();
    for pc in 0..PCHANNELS {
        let name = pchannel(pc);
        let mut last_tick = 0;
        let mut last_seq: HashMap<usize, u64> = HashMap::new();
        let log = read_to_end(client, &name).await;
        // The tail that followed the pchannel through every move delivered exactly the log's
        // beginning, through its last acknowledged message: nothing skipped, nothing twice,
        // same order, nothing acknowledged missing.
        let delivered = &outcome.tailed[pc];
        let ids: Vec<MessageId> = log.iter().map(|m| m.id).collect();
        assert!(
            delivered.len() <= ids.len() && delivered[..] == ids[..delivered.len()],
            "{name}: the tailing consumer diverged from the log (delivered {}, log {})",
            delivered.len(),
            ids.len()
        );
        assert!(!delivered.is_empty(), "{name}: the tail delivered nothing");
        for m in log {
            let tick = m.time_tick().0;
            assert!(
                tick > last_tick,
                "{name}: tick {tick} after {last_tick} at id {}",
                m.id
            );
            assert!(
                ticks.insert(tick),
                "tick {tick} handed out twice ({name} id {})",
                m.id
            );
            last_tick = tick;
            if m.message_type() != MessageType::Data {
                continue;
            }
            let text = String::from_utf8(m.payload.to_vec()).unwrap();
            payloads.insert(text.clone());
            let Some((p, s)) = text.strip_prefix('p').and_then(|t| t.split_once("-s")) else {
                continue;
            };
            let (p, s): (usize, u64) = (p.parse().unwrap(), s.parse().unwrap());
            assert_eq!(pchannel(p), name, "message on the wrong pchannel");
            if let Some(prev) = seen.insert((p, s), (name.clone(), m.id)) {
                panic!("p{p}-s{s} read twice: at {} and {}", prev.1, m.id);
            }
            if let Some(prev) = last_seq.insert(p, s) {
                assert!(s > prev, "producer {p}: s{s} after s{prev}");
            }
        }
    }
    let lost: Vec<_> = acked.keys().filter(|k| !seen.contains_key(k)).collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged messages lost, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
    for (k, at) in acked {
        assert_eq!(
            &seen[k], at,
            "{k:?} acknowledged at one place, read at another"
        );
    }
    payloads
}

/// Waits until none of `pchannels` is on node `from` and all are assigned again.
pub async fn moved_off(c: &Cluster, from: u64, pchannels: &[String], within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        if let Some(s) = c.status().await
            && pchannels.iter().all(|p| {
                s.pchannels.iter().any(|r| {
                    &r.pchannel == p && r.node_id != from && r.state() == AssignmentState::Assigned
                })
            })
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "pchannels of node {from} did not move: {:?}",
            c.status().await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The node with the most pchannels, and them.
pub async fn busiest(c: &Cluster) -> (u64, Vec<String>) {
    let s = c.status().await.unwrap();
    let n = s.nodes.iter().max_by_key(|n| n.pchannels.len()).unwrap();
    (n.node.as_ref().unwrap().id, n.pchannels.clone())
}
