//! A consumer that resumes exactly after the last message it delivered.

use std::time::{Duration, Instant};

use tokio::{sync::mpsc, task::JoinHandle};
use tracing::debug;
use walden_common::{HasErrorCode, MessageId, TimeTick};
use walden_message::{Delivery, ImmutableMessage, MessageType};
use walden_proto::v1::{self as pb, consume_response, deliver_filter, deliver_policy};

use crate::ClientError;

/// Where a consumer starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeliverFrom {
    /// The first retained message.
    All,
    /// Only messages appended from now on.
    Latest,
    /// The message with this id, and everything after it.
    StartFrom(MessageId),
    /// Everything after the message with this id.
    StartAfter(MessageId),
    /// Every message with a tick greater than this.
    TickGt(TimeTick),
}

/// Consumer settings.
#[derive(Clone, Debug)]
pub struct ConsumerOptions {
    pub from: DeliverFrom,
    /// Only this vchannel (pchannel-level messages such as TimeTick still pass).
    pub vchannel: Option<String>,
    /// Only these message types.
    pub types: Option<Vec<MessageType>>,
    /// How long to keep reconnecting through retryable failures. Default 30 s.
    pub retry_timeout: Duration,
    /// Messages buffered ahead of the application, about: they arrive and are buffered in
    /// the node's frames (up to 512 messages each). Default 1024.
    pub buffer: usize,
}

impl Default for ConsumerOptions {
    fn default() -> Self {
        Self {
            from: DeliverFrom::All,
            vchannel: None,
            types: None,
            retry_timeout: Duration::from_secs(30),
            buffer: 1024,
        }
    }
}

/// Receives one pchannel's messages in tick order.
#[derive(Debug)]
pub struct Consumer {
    /// A frame's messages at a time: one hand-off per frame, not per message (a catching-up
    /// consumer receives hundreds of thousands a second).
    rx: mpsc::Receiver<Result<Delivery, ClientError>>,
    ready: std::vec::IntoIter<ImmutableMessage>,
    task: JoinHandle<()>,
}

/// Messages in a full frame from the node, for sizing the buffer in frames.
const FRAME_MESSAGES: usize = 512;

impl Drop for Consumer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Consumer {
    pub(crate) fn start(
        route: crate::router::Route,
        pchannel: String,
        options: ConsumerOptions,
    ) -> Self {
        let (tx, rx) = mpsc::channel(options.buffer.div_ceil(FRAME_MESSAGES).max(2));
        let task = tokio::spawn(run(route, pchannel, options, tx));
        Self {
            rx,
            ready: Vec::new().into_iter(),
            task,
        }
    }

    /// The next message; `None` after a final error was returned.
    pub async fn next(&mut self) -> Option<Result<ImmutableMessage, ClientError>> {
        loop {
            if let Some(m) = self.ready.next() {
                return Some(Ok(m));
            }
            match self.rx.recv().await? {
                Ok(Delivery::Messages(batch)) => self.ready = batch.into_iter(),
                Ok(Delivery::CompleteThrough(_)) => {}
                Err(e) => return Some(Err(e)),
            }
        }
    }

    /// The next frame of messages, or the news that the pchannel is complete through a tick
    /// (its idle TimeTicks, which are not stored): what a reader that tracks how far it has
    /// read needs (a read replica's served tick). `None` after a final error was returned.
    pub async fn next_delivery(&mut self) -> Option<Result<Delivery, ClientError>> {
        let held: Vec<ImmutableMessage> = self.ready.by_ref().collect();
        if !held.is_empty() {
            return Some(Ok(Delivery::Messages(held)));
        }
        self.rx.recv().await
    }
}

fn request(
    pchannel: &str,
    options: &ConsumerOptions,
    resume: Option<(MessageId, TimeTick)>,
) -> pb::ConsumeRequest {
    let policy = |p| Some(pb::DeliverPolicy { policy: Some(p) });
    let filter = |f| pb::DeliverFilter { filter: Some(f) };
    let mut filters = Vec::new();
    let (policy, tick_gt) = match (resume, options.from) {
        // Everything with a greater tick is at or after the last message's last-confirmed id.
        (Some((lc, tick)), _) => (policy(deliver_policy::Policy::StartFrom(lc.0)), Some(tick)),
        (None, DeliverFrom::All) => (policy(deliver_policy::Policy::All(pb::Empty {})), None),
        (None, DeliverFrom::Latest) => (policy(deliver_policy::Policy::Latest(pb::Empty {})), None),
        (None, DeliverFrom::StartFrom(id)) => {
            (policy(deliver_policy::Policy::StartFrom(id.0)), None)
        }
        (None, DeliverFrom::StartAfter(id)) => {
            (policy(deliver_policy::Policy::StartAfter(id.0)), None)
        }
        (None, DeliverFrom::TickGt(t)) => {
            (policy(deliver_policy::Policy::All(pb::Empty {})), Some(t))
        }
    };
    let tick_gt = match (tick_gt, options.from) {
        (Some(t), DeliverFrom::TickGt(u)) => Some(t.max(u)),
        (t, _) => t,
    };
    if let Some(t) = tick_gt {
        filters.push(filter(deliver_filter::Filter::TimeTickGt(t.0)));
    }
    if let Some(v) = &options.vchannel {
        filters.push(filter(deliver_filter::Filter::Vchannel(v.clone())));
    }
    if let Some(ts) = &options.types {
        filters.push(filter(deliver_filter::Filter::MessageTypes(
            pb::MessageTypes {
                types: ts.iter().map(|t| *t as i32).collect(),
            },
        )));
    }
    pb::ConsumeRequest {
        pchannel: pchannel.to_owned(),
        term: 0,
        policy,
        filters,
    }
}

async fn run(
    route: crate::router::Route,
    pchannel: String,
    options: ConsumerOptions,
    tx: mpsc::Sender<Result<Delivery, ClientError>>,
) {
    let mut resume: Option<(MessageId, TimeTick)> = None;
    let mut failing_since: Option<Instant> = None;
    let mut backoff = Duration::from_millis(50);
    loop {
        // The owner now: after a move, the stream resumes on the new one.
        let result = match route.grpc(&pchannel, crate::OWNER_WAIT).await {
            Ok(grpc) => {
                stream(
                    &grpc,
                    &pchannel,
                    &options,
                    &mut resume,
                    &tx,
                    &mut failing_since,
                )
                .await
            }
            Err(e) => Err(e),
        };
        let err = match result {
            Ok(()) => return,
            Err(e) => e,
        };
        debug!(pchannel = %pchannel, error = %err, "consume stream broke");
        let since = *failing_since.get_or_insert_with(Instant::now);
        if !err.is_retryable() || since.elapsed() > options.retry_timeout {
            let final_err = if err.is_retryable() {
                ClientError::RetriesExhausted {
                    seconds: since.elapsed().as_secs_f64(),
                    last: Box::new(err),
                }
            } else {
                err
            };
            let _ = tx.send(Err(final_err)).await;
            return;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}

/// One stream; `Ok` when the application went away.
async fn stream(
    grpc: &crate::Grpc,
    pchannel: &str,
    options: &ConsumerOptions,
    resume: &mut Option<(MessageId, TimeTick)>,
    tx: &mpsc::Sender<Result<Delivery, ClientError>>,
    failing_since: &mut Option<Instant>,
) -> Result<(), ClientError> {
    let mut inbound = grpc
        .clone()
        .consume(request(pchannel, options, *resume))
        .await?
        .into_inner();
    loop {
        let msgs = match inbound.message().await? {
            Some(pb::ConsumeResponse {
                response: Some(consume_response::Response::Message(m)),
            }) => vec![m],
            Some(pb::ConsumeResponse {
                response: Some(consume_response::Response::Batch(b)),
            }) => b.messages,
            Some(pb::ConsumeResponse {
                response: Some(consume_response::Response::Error(e)),
            }) => return Err(e.into()),
            Some(pb::ConsumeResponse {
                response: Some(consume_response::Response::CompleteThrough(t)),
            }) => {
                *failing_since = None;
                // Not a resume point: a transaction open below it commits above it, and the
                // resume position comes from the last message's last-confirmed id.
                if tx
                    .send(Ok(Delivery::CompleteThrough(TimeTick(t))))
                    .await
                    .is_err()
                {
                    return Ok(());
                }
                continue;
            }
            _ => return Err(ClientError::Transport("consume stream ended".into())),
        };
        if !deliver(msgs, resume, tx, failing_since).await? {
            return Ok(());
        }
    }
}

/// Hands a frame's messages to the application and remembers the last as the resume point;
/// `false` once the application has gone away. A message that does not convert ends the
/// stream after the ones before it were handed over.
async fn deliver(
    msgs: Vec<pb::ImmutableMessage>,
    resume: &mut Option<(MessageId, TimeTick)>,
    tx: &mpsc::Sender<Result<Delivery, ClientError>>,
    failing_since: &mut Option<Instant>,
) -> Result<bool, ClientError> {
    let mut out = Vec::with_capacity(msgs.len());
    let mut bad = None;
    for m in msgs {
        match ImmutableMessage::from_proto(m) {
            Ok(m) => out.push(m),
            Err(e) => {
                bad = Some(ClientError::Transport(format!(
                    "bad message from node: {e}"
                )));
                break;
            }
        }
    }
    if let Some(last) = out.last() {
        *failing_since = None;
        *resume = Some((last.last_confirmed(), last.time_tick()));
        if tx.send(Ok(Delivery::Messages(out))).await.is_err() {
            return Ok(false);
        }
    }
    match bad {
        Some(e) => Err(e),
        None => Ok(true),
    }
}
