//! kill -9 under load, many times, with a real `walden standalone` process. Idempotent
//! producers retry through every kill: every message sent is acknowledged and read back exactly
//! once, ticks strictly increase per pchannel, each producer's messages keep their order, and
//! tailing consumers that resume through the kills deliver exactly the log.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use common::Server;
use rand::{Rng, SeedableRng, rngs::StdRng};
use walden_client::{ConsumerOptions, DeliverFrom, ProducerOptions};
use walden_common::MessageId;
use walden_message::{MessageType, MutableMessage};

const PRODUCERS: usize = 8;
const PCHANNELS: usize = 4;

/// What one producer saw acknowledged: seq -> (pchannel, id).
type Acked = Arc<Mutex<HashMap<(usize, u64), (String, MessageId)>>>;

fn pchannel_of(producer: usize) -> String {
    format!("walden-dml-{}", producer % PCHANNELS)
}

async fn produce(addr: String, producer: usize, acked: Acked, stop: Arc<AtomicBool>) -> u64 {
    let pchannel = pchannel_of(producer);
    let vchannel = format!("coll{}v{}", producer % 3, producer);
    let client = walden_client::Client::connect(&addr).await.unwrap();
    // Retries through every kill; the producer is idempotent, so a resend of a message that
    // was written before the kill is answered with its original place, not written again.
    let p = client.producer(
        &pchannel,
        ProducerOptions {
            max_in_flight: 16,
            retry_timeout: Duration::from_secs(120),
            ..ProducerOptions::default()
        },
    );
    let record = |s: u64, r: Result<walden_client::AppendResult, walden_client::ClientError>| {
        let r = r.unwrap_or_else(|e| panic!("p{producer}-s{s} was never acknowledged: {e}"));
        acked
            .lock()
            .unwrap()
            .insert((producer, s), (pchannel.clone(), r.id));
    };
    let mut window = std::collections::VecDeque::new();
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let payload = format!("p{producer}-s{seq}");
        let msg = MutableMessage::new(MessageType::Data, vchannel.clone(), Bytes::from(payload));
        window.push_back((seq, p.send(msg).await.unwrap()));
        seq += 1;
        if window.len() >= 16 {
            let (s, f) = window.pop_front().expect("non-empty");
            record(s, f.await);
        }
    }
    for (s, f) in window {
        record(s, f.await);
    }
    seq
}

/// Consumes one pchannel from the start until told to stop, through restarts; returns the ids
/// delivered, in order.
async fn tail(addr: String, pc: usize, stop: Arc<AtomicBool>) -> Vec<MessageId> {
    let client = loop {
        if let Ok(c) = walden_client::Client::connect(&addr).await {
            break c;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let mut consumer = client.consumer(
        &format!("walden-dml-{pc}"),
        ConsumerOptions {
            from: DeliverFrom::All,
            retry_timeout: Duration::from_secs(60),
            ..ConsumerOptions::default()
        },
    );
    let mut ids = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        match tokio::time::timeout(Duration::from_millis(100), consumer.next()).await {
            Ok(Some(Ok(m))) => ids.push(m.id),
            Ok(Some(Err(e))) => panic!("consumer of walden-dml-{pc} gave up: {e}"),
            Ok(None) => panic!("consumer of walden-dml-{pc} ended"),
            Err(_) => {}
        }
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_messages_survive_repeated_kill_minus_nine_exactly_once_and_in_order() {
    let dir = tempfile::tempdir().unwrap();
    // Small segments: the kills also land while segments roll, are prepared ahead (zeros
    // written by a thread of their own) and renamed into place.
    let config = "[node]\npchannels = 4\n[wal_local]\nsegment_bytes = 262144\n";
    kill_under_load(&dir.path().join("data"), config, 20).await;
}

/// The same on the object-storage WAL against a real S3 server: every kill leaves fragment
/// uploads in flight, and every restart claims a new epoch and fences the dead writer's
/// segment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_messages_survive_repeated_kill_minus_nine_on_object_storage() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("s3")).unwrap();
    let s3 = walden_object_store::seaweed::SeaweedFs::start(&dir.path().join("s3"), "walden")
        .await
        .unwrap();
    // Small fragments and segments: kills land while segments roll and seal too.
    let config = format!(
        "[node]\npchannels = 4\n[wal]\nstorage = \"object\"\n\
         [wal_object]\nfragment_bytes = 65536\nsegment_bytes = 1048576\n\
         [object_store]\nurl = \"s3://{}/crash\"\nendpoint = \"{}\"\nallow_http = true\n",
        s3.bucket, s3.endpoint
    );
    kill_under_load(&dir.path().join("data"), &config, 10).await;
}

async fn kill_under_load(data: &std::path::Path, config: &str, kills: usize) {
    let mut server = Server::start(data, Some(config)).await;
    let acked: Acked = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let producers: Vec<_> = (0..PRODUCERS)
        .map(|i| tokio::spawn(produce(server.addr.clone(), i, acked.clone(), stop.clone())))
        .collect();
    // Tailing consumers ride through every kill, resuming after what they delivered.
    let tails: Vec<_> = (0..PCHANNELS)
        .map(|pc| tokio::spawn(tail(server.addr.clone(), pc, stop.clone())))
        .collect();

    let mut rng = StdRng::seed_from_u64(0x5eed);
    let mut acked_before_kill = Vec::new();
    for _ in 0..kills {
        tokio::time::sleep(Duration::from_millis(rng.random_range(150..600))).await;
        acked_before_kill.push(acked.lock().unwrap().len());
        server.kill();
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..100))).await;
        server.restart().await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let mut sent = 0;
    for p in producers {
        sent += p.await.unwrap();
    }
    let mut tailed = Vec::new();
    for t in tails {
        tailed.push(t.await.unwrap());
    }
    server.kill();
    server.restart().await;

    let acked = acked.lock().unwrap().clone();
    assert_eq!(
        acked.len() as u64,
        sent,
        "with retries, every message sent is acknowledged"
    );
    assert!(
        acked.len() > 200,
        "too little was acknowledged to mean anything: {} of {sent}",
        acked.len()
    );
    let progress = acked_before_kill.windows(2).filter(|w| w[1] > w[0]).count();
    assert!(
        progress >= kills / 2,
        "producers made progress between kills: {acked_before_kill:?}"
    );

    // Read every pchannel back.
    let client = server.client().await;
    let mut seen: HashMap<(usize, u64), (String, MessageId)> = HashMap::new();
    for (pc, delivered) in tailed.iter().enumerate() {
        let name = format!("walden-dml-{pc}");
        let mut last_tick = 0u64;
        let mut last_seq: HashMap<usize, u64> = HashMap::new();
        let mut log_ids = Vec::new();
        for m in common::read_to_end(&client, &name).await {
            let tick = m.time_tick().0;
            log_ids.push(m.id);
            assert!(
                tick > last_tick,
                "{name}: tick {tick} after {last_tick} at id {}",
                m.id
            );
            last_tick = tick;
            if m.message_type() == MessageType::Data {
                let text = String::from_utf8(m.payload.to_vec()).unwrap();
                let (p, s) = text[1..].split_once("-s").unwrap();
                let (p, s): (usize, u64) = (p.parse().unwrap(), s.parse().unwrap());
                assert_eq!(pchannel_of(p), name, "message on the wrong pchannel");
                if let Some(prev) = seen.insert((p, s), (name.clone(), m.id)) {
                    panic!("p{p}-s{s} delivered twice: at {} and {}", prev.1, m.id);
                }
                if let Some(prev) = last_seq.insert(p, s) {
                    assert!(s > prev, "producer {p}: s{s} delivered after s{prev}");
                }
            }
        }
        // What the tailing consumer delivered across all the kills is exactly the log's
        // beginning: nothing skipped, nothing twice, same order.
        assert!(
            delivered.len() <= log_ids.len() && delivered[..] == log_ids[..delivered.len()],
            "{name}: the resuming consumer diverged from the log (delivered {}, log {})",
            delivered.len(),
            log_ids.len()
        );
        // Every kill breaks every stream, so a consumer that delivered this much has resumed
        // many times; how far it got depends on the machine, so only a floor is checked.
        assert!(
            delivered.len() >= 1000,
            "{name}: the consumer delivered only {} of {}",
            delivered.len(),
            log_ids.len()
        );
    }
    let mut lost = Vec::new();
    for (key, (pchannel, id)) in &acked {
        match seen.get(key) {
            Some((pc, read_id)) => {
                assert_eq!(
                    (pc, read_id),
                    (pchannel, id),
                    "{key:?} acknowledged at one place, read at another"
                );
            }
            None => lost.push(*key),
        }
    }
    assert!(
        lost.is_empty(),
        "{} acknowledged messages lost, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
    let unacked_present: HashSet<_> = seen.keys().filter(|k| !acked.contains_key(k)).collect();
    eprintln!(
        "kills: {kills}, sent: {sent}, acknowledged: {}, read back: {} ({} written but never acknowledged)",
        acked.len(),
        seen.len(),
        unacked_present.len()
    );
}
