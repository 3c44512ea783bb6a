//! A pipelined producer with a bounded in-flight window and retries.

use std::{
    collections::BTreeMap,
    future::Future,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tracing::debug;
use walden_common::{HasErrorCode, MessageId, TimeTick};
use walden_message::MutableMessage;
use walden_proto::v1::{
    self as pb, ProduceRequest, produce_request, produce_response, produce_result,
};

use crate::ClientError;

/// Where an acknowledged message landed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AppendResult {
    pub id: MessageId,
    pub tick: TimeTick,
    pub last_confirmed: MessageId,
}

/// Producer settings.
#[derive(Clone, Debug)]
pub struct ProducerOptions {
    /// Messages sent but not yet acknowledged, at most. Default 64.
    pub max_in_flight: usize,
    /// How long to keep retrying a message through retryable failures. Default 30 s.
    pub retry_timeout: Duration,
    /// The term the node must hold (0: any). Default 0.
    pub term: u64,
    /// Number messages so that the node answers a resend with the original result instead of
    /// writing it again (a random producer id per `Producer`). Default true. A message that
    /// already carries a producer id and sequence keeps them.
    pub idempotent: bool,
    /// Largest message [`Producer::send`] accepts (payload, vchannel, partition and
    /// properties), refused with [`ClientError::TooLarge`] before it is queued. Set it to the
    /// node's `node.max_message_bytes` (the `max_message_bytes` of its status). Default 8 MiB,
    /// the node's default.
    pub max_message_bytes: usize,
}

impl Default for ProducerOptions {
    fn default() -> Self {
        Self {
            max_in_flight: 64,
            retry_timeout: Duration::from_secs(30),
            term: 0,
            idempotent: true,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
        }
    }
}

/// The node's default `node.max_message_bytes`.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 8 << 20;

struct Queued {
    msg: pb::MutableMessage,
    /// Its last send has had no answer yet (a stream that breaks leaves it in doubt).
    in_flight: bool,
    /// An earlier send went unanswered: a copy may be in the log whatever happens next (a
    /// resend refused before the node's deduplication, by a full disk say, proves nothing).
    doubt: bool,
    reply: oneshot::Sender<Result<AppendResult, ClientError>>,
    _permit: OwnedSemaphorePermit,
}

impl Queued {
    /// Put on a stream (again).
    fn sent(&mut self) {
        self.doubt |= self.in_flight;
        self.in_flight = true;
    }

    /// Whether a copy may be in the log: some send of it was never answered.
    fn may_be_written(&self) -> bool {
        self.doubt || self.in_flight
    }
}

/// Appends to one pchannel. Messages are sent in the order of [`Producer::send`] calls.
#[derive(Clone, Debug)]
pub struct Producer {
    tx: mpsc::UnboundedSender<Queued>,
    window: Arc<Semaphore>,
    max_message_bytes: usize,
    /// (producer id, next sequence) of an idempotent producer. The lock also orders the queue,
    /// so sequences follow send order.
    ident: Option<Arc<std::sync::Mutex<(u64, u64)>>>,
}

/// A random, non-zero producer id.
fn random_producer_id() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    let seed = (std::time::SystemTime::now(), std::process::id());
    RandomState::new().hash_one(seed) | 1
}

impl Producer {
    pub(crate) fn start(
        route: crate::router::Route,
        pchannel: String,
        options: ProducerOptions,
    ) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let window = Arc::new(Semaphore::new(options.max_in_flight.max(1)));
        let ident = options
            .idempotent
            .then(|| Arc::new(std::sync::Mutex::new((random_producer_id(), 1))));
        let max_message_bytes = options.max_message_bytes;
        tokio::spawn(run(route, pchannel, options, rx));
        Self {
            tx,
            window,
            max_message_bytes,
            ident,
        }
    }

    /// Waits for room in the window and queues `msg`; the returned future resolves once the
    /// message is durable (or failed for good). A message the node would refuse for its type,
    /// vchannel name or size is refused here, before it takes a place in the window (and
    /// before any sequence number): nothing is sent for it.
    pub async fn send(
        &self,
        msg: MutableMessage,
    ) -> Result<impl Future<Output = Result<AppendResult, ClientError>> + use<>, ClientError> {
        msg.validate_from_client()
            .map_err(ClientError::InvalidArgument)?;
        let size = msg.approximate_size();
        if size > self.max_message_bytes {
            return Err(ClientError::TooLarge {
                size,
                limit: self.max_message_bytes,
            });
        }
        let permit = self
            .window
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| ClientError::Closed)?;
        let (reply, rx) = oneshot::channel();
        let mut msg = msg.into_proto();
        let mut ident = self
            .ident
            .as_ref()
            .map(|i| i.lock().unwrap_or_else(|e| e.into_inner()));
        if let Some((id, next_seq)) = ident.as_deref_mut()
            && msg.producer_id == 0
        {
            msg.producer_id = *id;
            msg.producer_seq = *next_seq;
            *next_seq += 1;
        }
        self.tx
            .send(Queued {
                msg,
                in_flight: false,
                doubt: false,
                reply,
                _permit: permit,
            })
            .map_err(|_| ClientError::Closed)?;
        drop(ident);
        Ok(async move { rx.await.unwrap_or(Err(ClientError::Closed)) })
    }

    /// Sends and waits for the result.
    pub async fn append(&self, msg: MutableMessage) -> Result<AppendResult, ClientError> {
        self.send(msg).await?.await
    }
}

/// Most messages one frame carries.
const MAX_BATCH: usize = 256;
/// Most payload bytes one frame carries (the server's frame limit is far above).
const MAX_BATCH_BYTES: usize = 4 << 20;

/// One message as a `produce` request, several as a `batch`.
fn batch_request(mut msgs: Vec<(u64, pb::MutableMessage)>) -> ProduceRequest {
    let one = |(id, msg): (u64, pb::MutableMessage)| pb::ProduceMessage {
        request_id: id,
        message: Some(msg),
    };
    let request = if msgs.len() == 1 {
        produce_request::Request::Produce(one(msgs.remove(0)))
    } else {
        produce_request::Request::Batch(pb::ProduceBatch {
            messages: msgs.into_iter().map(one).collect(),
        })
    };
    ProduceRequest {
        request: Some(request),
    }
}

/// How often a producer in an outage tries the owner again, at most.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// What the producer knows of the owner's health. A retry window belongs to an outage, not to
/// each message: once `retry_timeout` passed without an acknowledgement, the producer is in
/// an outage, and every queued and later message fails at once with the last error, except
/// that at most once per [`PROBE_INTERVAL`] one attempt is made with what is queued; the
/// first acknowledgement ends the outage.
#[derive(Debug)]
struct Health {
    /// Since when the owner has not acknowledged anything (while messages were waiting).
    failing_since: Option<Instant>,
    /// The outage's error and when the owner was last tried.
    outage: Option<(ClientError, Instant)>,
    backoff: Duration,
}

impl Health {
    fn new() -> Self {
        Self {
            failing_since: None,
            outage: None,
            backoff: Duration::from_millis(50),
        }
    }

    /// The owner acknowledged a message: the outage, if any, is over.
    fn acknowledged(&mut self) {
        self.failing_since = None;
        self.outage = None;
        self.backoff = Duration::from_millis(50);
    }

    /// In an outage, tried less than [`PROBE_INTERVAL`] ago: the error to fail messages with
    /// at once.
    fn failing_fast(&self) -> Option<ClientError> {
        self.outage
            .as_ref()
            .filter(|(_, tried)| tried.elapsed() < PROBE_INTERVAL)
            .map(|(e, _)| e.clone())
    }
}

/// Fails every unacknowledged message, and every message already queued behind them, with
/// `err` (their window places come free, so a sender waiting for room gets on at once).
fn fail_all(
    unacked: &mut BTreeMap<u64, Queued>,
    rx: &mut mpsc::UnboundedReceiver<Queued>,
    err: &ClientError,
) {
    fail_unacked(unacked, err);
    while let Ok(q) = rx.try_recv() {
        let _ = q.reply.send(Err(err.clone()));
    }
}

/// Fails every unacknowledged message with `err`; one that was sent may have been written, and
/// says so ([`ClientError::Unconfirmed`]).
fn fail_unacked(unacked: &mut BTreeMap<u64, Queued>, err: &ClientError) {
    for (_, q) in std::mem::take(unacked) {
        let e = if q.may_be_written() {
            ClientError::Unconfirmed(Box::new(err.clone()))
        } else {
            err.clone()
        };
        let _ = q.reply.send(Err(e));
    }
}

/// Answers the caller of one result; a retryable error breaks the stream so that everything
/// unacknowledged is resent in order.
fn settle(
    res: pb::ProduceResult,
    unacked: &mut BTreeMap<u64, Queued>,
    health: &mut Health,
) -> Result<(), ClientError> {
    match res.outcome {
        Some(produce_result::Outcome::Ok(a)) => {
            health.acknowledged();
            if let Some(q) = unacked.remove(&res.request_id) {
                let _ = q.reply.send(Ok(AppendResult {
                    id: MessageId(a.message_id),
                    tick: TimeTick(a.time_tick),
                    last_confirmed: MessageId(a.last_confirmed_id),
                }));
            }
            Ok(())
        }
        Some(produce_result::Outcome::Error(e)) => {
            let err = ClientError::from(e);
            if err.is_retryable() {
                // The node reads nothing after a retryable refusal (docs/design.md §6.3): this
                // message and every later one on the stream were not written. Resend all in
                // order.
                for (_, q) in unacked.range_mut(res.request_id..) {
                    q.in_flight = false;
                }
                return Err(err);
            }
            if let Some(mut q) = unacked.remove(&res.request_id) {
                // Refused: this send wrote nothing; an earlier unanswered one may have.
                q.in_flight = false;
                let err = if q.may_be_written() {
                    ClientError::Unconfirmed(Box::new(err))
                } else {
                    err
                };
                let _ = q.reply.send(Err(err));
            }
            Ok(())
        }
        None => Err(ClientError::Transport("result without outcome".into())),
    }
}

/// Runs one producer: keeps a stream open, sends queued messages, matches results by request
/// id, and on a break resends every unacknowledged message in order on a new stream.
async fn run(
    route: crate::router::Route,
    pchannel: String,
    options: ProducerOptions,
    mut rx: mpsc::UnboundedReceiver<Queued>,
) {
    let mut unacked: BTreeMap<u64, Queued> = BTreeMap::new();
    let mut next_id = 0u64;
    let mut app_done = false;
    let mut health = Health::new();
    loop {
        if app_done && unacked.is_empty() {
            return;
        }
        // Wait for work before connecting: producers are lazy.
        if unacked.is_empty() {
            match rx.recv().await {
                Some(q) => {
                    unacked.insert(next_id, q);
                    next_id += 1;
                }
                None => return,
            }
        }
        // In an outage the owner was tried a moment ago: no message waits for it.
        if let Some(err) = health.failing_fast() {
            fail_all(&mut unacked, &mut rx, &err);
            continue;
        }
        // The owner now: after a move, the stream resumes on the new one.
        let owner = route.grpc(&pchannel, crate::OWNER_WAIT).await;
        let result = match &owner {
            Ok(grpc) => {
                session(
                    grpc,
                    &pchannel,
                    &options,
                    &mut rx,
                    &mut unacked,
                    &mut next_id,
                    &mut app_done,
                    &mut health,
                )
                .await
            }
            Err(e) => Err(e.clone()),
        };
        let err = match result {
            Ok(()) => continue,
            Err(e) => e,
        };
        debug!(pchannel = %pchannel, error = %err, "produce stream broke");
        if !err.is_retryable() {
            fail_unacked(&mut unacked, &err);
            continue;
        }
        let since = *health.failing_since.get_or_insert_with(Instant::now);
        if health.outage.is_some() || since.elapsed() > options.retry_timeout {
            // The window ran out (or a probe failed): an outage, until an acknowledgement.
            let give_up = ClientError::RetriesExhausted {
                seconds: since.elapsed().as_secs_f64(),
                last: Box::new(err),
            };
            fail_all(&mut unacked, &mut rx, &give_up);
            health.outage = Some((give_up, Instant::now()));
            continue;
        }
        tokio::time::sleep(health.backoff).await;
        health.backoff = (health.backoff * 2).min(Duration::from_secs(1));
    }
}

/// One stream's life; returns `Ok` when the application closed and everything was answered.
#[allow(clippy::too_many_arguments)]
async fn session(
    grpc: &crate::Grpc,
    pchannel: &str,
    options: &ProducerOptions,
    rx: &mut mpsc::UnboundedReceiver<Queued>,
    unacked: &mut BTreeMap<u64, Queued>,
    next_id: &mut u64,
    app_done: &mut bool,
    health: &mut Health,
) -> Result<(), ClientError> {
    let (req_tx, req_rx) = mpsc::unbounded_channel();
    let open = ProduceRequest {
        request: Some(produce_request::Request::Open(pb::OpenProducer {
            pchannel: pchannel.to_owned(),
            term: options.term,
        })),
    };
    let _ = req_tx.send(open);
    let mut inbound = grpc
        .clone()
        .produce(tokio_stream::wrappers::UnboundedReceiverStream::new(req_rx))
        .await?
        .into_inner();
    match inbound.message().await? {
        Some(pb::ProduceResponse {
            response: Some(produce_response::Response::Opened(_)),
        }) => {}
        Some(pb::ProduceResponse {
            response: Some(produce_response::Response::Error(e)),
        }) => return Err(e.into()),
        _ => return Err(ClientError::Transport("no answer to `open`".into())),
    }
    // Resend what the last stream left unanswered, in the original order.
    let resend: Vec<_> = unacked
        .iter_mut()
        .map(|(id, q)| {
            q.sent();
            (*id, q.msg.clone())
        })
        .collect();
    for chunk in resend.chunks(MAX_BATCH) {
        let _ = req_tx.send(batch_request(chunk.to_vec()));
    }
    loop {
        if *app_done && unacked.is_empty() {
            let _ = req_tx.send(ProduceRequest {
                request: Some(produce_request::Request::Close(pb::CloseProducer {})),
            });
            return Ok(());
        }
        tokio::select! {
            q = rx.recv(), if !*app_done => match q {
                Some(q) => {
                    // Whatever else is already queued goes in the same frame.
                    let mut batch = Vec::new();
                    let mut bytes = 0;
                    let mut next = Some(q);
                    while let Some(mut q) = next.take() {
                        q.sent();
                        bytes += q.msg.payload.len();
                        batch.push((*next_id, q.msg.clone()));
                        unacked.insert(*next_id, q);
                        *next_id += 1;
                        if batch.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
                            next = rx.try_recv().ok();
                        }
                    }
                    let _ = req_tx.send(batch_request(batch));
                }
                None => *app_done = true,
            },
            r = inbound.message() => match r? {
                Some(pb::ProduceResponse { response: Some(produce_response::Response::Result(res)) }) => {
                    settle(res, unacked, health)?;
                }
                Some(pb::ProduceResponse { response: Some(produce_response::Response::Results(rs)) }) => {
                    for res in rs.results {
                        settle(res, unacked, health)?;
                    }
                }
                Some(pb::ProduceResponse { response: Some(produce_response::Response::Error(e)) }) => {
                    return Err(e.into());
                }
                _ => return Err(ClientError::Transport("produce stream ended".into())),
            },
        }
    }
}
