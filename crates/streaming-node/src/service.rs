//! The gRPC service. Errors that concern a request travel inside the stream as typed
//! [`walden_proto::v1::Error`]s with stable codes; gRPC statuses are left for transport problems.

use std::{pin::Pin, sync::Arc};

use futures::{FutureExt, Stream, StreamExt, stream::FuturesUnordered};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::debug;
use walden_common::{MessageId, TimeTick};
use walden_message::{MessageType, MutableMessage};
use walden_proto::v1::{
    self as pb, ConsumeRequest, ConsumeResponse, ProduceRequest, ProduceResponse, StatusRequest,
    StatusResponse, consume_response, deliver_filter, deliver_policy, produce_request,
    produce_response, produce_result, streaming_node_server::StreamingNode,
};

use crate::{
    NodeError,
    manager::WalManager,
    scanner::{self, DeliverPolicy, Filters},
};

/// The node's gRPC service.
#[derive(Debug, Clone)]
pub struct NodeService {
    manager: Arc<WalManager>,
    node_id: String,
}

impl NodeService {
    pub fn new(manager: Arc<WalManager>, node_id: impl Into<String>) -> Self {
        Self {
            manager,
            node_id: node_id.into(),
        }
    }

    /// The tonic server for this service.
    pub fn into_server(self) -> pb::streaming_node_server::StreamingNodeServer<Self> {
        // One frame is at most one batch: clients cap batches at 4 MiB of payload (a single
        // message may be up to `node.max_message_bytes`). A larger frame is refused as
        // malformed rather than buffered.
        pb::streaming_node_server::StreamingNodeServer::new(self)
            .max_decoding_message_size(MAX_FRAME_BYTES)
            .max_encoding_message_size(MAX_FRAME_BYTES)
    }
}

/// Largest gRPC frame the node reads or writes.
pub const MAX_FRAME_BYTES: usize = 64 << 20;

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

fn error_response(e: &NodeError) -> ProduceResponse {
    ProduceResponse {
        response: Some(produce_response::Response::Error(e.to_proto())),
    }
}

fn to_result(
    request_id: u64,
    r: Result<crate::channel::AppendResult, NodeError>,
) -> pb::ProduceResult {
    let outcome = match r {
        Ok(a) => produce_result::Outcome::Ok(pb::AppendResult {
            message_id: a.id.0,
            time_tick: a.tick.0,
            last_confirmed_id: a.last_confirmed.0,
        }),
        Err(e) => produce_result::Outcome::Error(e.to_proto()),
    };
    pb::ProduceResult {
        request_id,
        outcome: Some(outcome),
    }
}

fn results_response(mut results: Vec<pb::ProduceResult>) -> ProduceResponse {
    let response = if results.len() == 1 {
        produce_response::Response::Result(results.remove(0))
    } else {
        produce_response::Response::Results(pb::ProduceResults { results })
    };
    ProduceResponse {
        response: Some(response),
    }
}

type Pending = FuturesUnordered<
    Pin<Box<dyn Future<Output = (u64, Result<crate::channel::AppendResult, NodeError>)> + Send>>,
>;

/// Validates and enqueues one message; a refusal is returned as its result.
async fn submit_one(
    channel: &crate::channel::Channel,
    p: pb::ProduceMessage,
    pending: &mut Pending,
) -> Option<pb::ProduceResult> {
    let id = p.request_id;
    let submitted = match client_message(p.message) {
        Ok(m) => channel.submit(m).await,
        Err(e) => Err(e),
    };
    match submitted {
        Ok(pa) => {
            pending.push(Box::pin(async move { (id, pa.wait().await) }));
            None
        }
        Err(e) => Some(to_result(id, Err(e))),
    }
}

fn is_retryable(r: &pb::ProduceResult) -> bool {
    matches!(&r.outcome, Some(pb::produce_result::Outcome::Error(e)) if e.retryable)
}

fn client_message(m: Option<pb::MutableMessage>) -> Result<MutableMessage, NodeError> {
    let m = m.ok_or_else(|| NodeError::InvalidArgument("produce without a message".into()))?;
    let msg = MutableMessage::from_proto(m).map_err(NodeError::InvalidArgument)?;
    msg.validate_from_client()
        .map_err(NodeError::InvalidArgument)?;
    Ok(msg)
}

async fn produce_loop(
    manager: Arc<WalManager>,
    mut inbound: Streaming<ProduceRequest>,
    tx: mpsc::Sender<Result<ProduceResponse, Status>>,
) {
    let send = |r: ProduceResponse| {
        let tx = tx.clone();
        async move { tx.send(Ok(r)).await.is_ok() }
    };
    let channel = match inbound.message().await {
        Ok(Some(ProduceRequest {
            request: Some(produce_request::Request::Open(open)),
        })) => match manager.get(&open.pchannel, open.term) {
            Ok(c) => c,
            Err(e) => {
                send(error_response(&e)).await;
                return;
            }
        },
        Ok(Some(_)) => {
            let e = NodeError::InvalidSequence("the first produce request must be `open`".into());
            send(error_response(&e)).await;
            return;
        }
        Ok(None) => return,
        Err(status) => {
            let e = NodeError::InvalidArgument(format!("malformed request: {}", status.message()));
            send(error_response(&e)).await;
            return;
        }
    };
    let opened = ProduceResponse {
        response: Some(produce_response::Response::Opened(pb::ProducerOpened {
            pchannel: channel.name().to_owned(),
            term: channel.term().0,
            producer_id: 0,
        })),
    };
    if !send(opened).await {
        return;
    }
    let mut pending: Pending = FuturesUnordered::new();
    let mut input_open = true;
    let mut graceful = false;
    while input_open || !pending.is_empty() {
        tokio::select! {
            msg = inbound.message(), if input_open => match msg {
                Ok(Some(ProduceRequest { request: Some(produce_request::Request::Produce(p)) })) => {
                    if let Some(refused) = submit_one(&channel, p, &mut pending).await {
                        // After a refusal a retry can fix, nothing later is written: the
                        // client resends it all in order on a new stream, and a later message
                        // written before an earlier one would break the producer's order.
                        input_open &= !is_retryable(&refused);
                        if !send(results_response(vec![refused])).await {
                            return;
                        }
                    }
                }
                Ok(Some(ProduceRequest { request: Some(produce_request::Request::Batch(b)) })) => {
                    let mut refused: Vec<pb::ProduceResult> = Vec::new();
                    for p in b.messages {
                        if let Some(first) = refused.iter().find(|r| is_retryable(r)) {
                            refused.push(pb::ProduceResult {
                                request_id: p.request_id,
                                ..first.clone()
                            });
                            continue;
                        }
                        refused.extend(submit_one(&channel, p, &mut pending).await);
                    }
                    input_open &= !refused.iter().any(is_retryable);
                    if !refused.is_empty() && !send(results_response(refused)).await {
                        return;
                    }
                }
                Ok(Some(ProduceRequest { request: Some(produce_request::Request::Close(_)) })) => {
                    input_open = false;
                    graceful = true;
                }
                Ok(Some(_)) => {
                    // A stream-level error ends the stream (as the protocol says): nothing
                    // after it is read, so nothing after it is written.
                    let e = NodeError::InvalidSequence("expected `produce` or `close`".into());
                    if !send(error_response(&e)).await {
                        return;
                    }
                    input_open = false;
                }
                Ok(None) => input_open = false,
                Err(status) => {
                    // A frame that does not decode: say so in a typed error, finish what is in
                    // flight, and end the stream. Nothing from the bad frame was appended.
                    debug!(error = %status, "malformed produce frame");
                    let e = NodeError::InvalidArgument(format!("malformed request frame: {}", status.message()));
                    if !send(error_response(&e)).await {
                        return;
                    }
                    input_open = false;
                }
            },
            Some((id, r)) = pending.next(), if !pending.is_empty() => {
                // Everything that completed together goes back in one frame.
                let mut done = vec![to_result(id, r)];
                while let Some(Some((id, r))) = pending.next().now_or_never() {
                    done.push(to_result(id, r));
                }
                if !send(results_response(done)).await {
                    return;
                }
            }
        }
    }
    if graceful {
        send(ProduceResponse {
            response: Some(produce_response::Response::Closed(pb::ProducerClosed {})),
        })
        .await;
    }
}

fn parse_policy(p: Option<pb::DeliverPolicy>) -> Result<DeliverPolicy, NodeError> {
    Ok(match p.and_then(|p| p.policy) {
        None | Some(deliver_policy::Policy::All(_)) => DeliverPolicy::All,
        Some(deliver_policy::Policy::Latest(_)) => DeliverPolicy::Latest,
        Some(deliver_policy::Policy::StartFrom(id)) => DeliverPolicy::StartFrom(MessageId(id)),
        Some(deliver_policy::Policy::StartAfter(id)) => DeliverPolicy::StartAfter(MessageId(id)),
    })
}

fn parse_filters(fs: Vec<pb::DeliverFilter>) -> Result<Filters, NodeError> {
    let mut out = Filters::default();
    for f in fs {
        match f.filter {
            Some(deliver_filter::Filter::TimeTickGt(t)) => {
                out.tick_gt = Some(out.tick_gt.map_or(TimeTick(t), |o| o.max(TimeTick(t))));
            }
            Some(deliver_filter::Filter::TimeTickGte(t)) => {
                out.tick_gte = Some(out.tick_gte.map_or(TimeTick(t), |o| o.max(TimeTick(t))));
            }
            Some(deliver_filter::Filter::MessageTypes(ts)) => {
                let mut types = Vec::new();
                for t in ts.types {
                    types.push(MessageType::try_from(t).map_err(|_| {
                        NodeError::InvalidArgument(format!("unknown message type {t}"))
                    })?);
                }
                out.types = Some(types);
            }
            Some(deliver_filter::Filter::Vchannel(v)) => {
                walden_common::validate_channel_name(&v)
                    .map_err(|e| NodeError::InvalidArgument(format!("vchannel filter: {e}")))?;
                out.vchannel = Some(v);
            }
            None => return Err(NodeError::InvalidArgument("empty deliver filter".into())),
        }
    }
    Ok(out)
}

/// Most messages (and about the most payload bytes) one consume frame carries.
const CONSUME_BATCH: usize = 512;
const CONSUME_BATCH_BYTES: usize = 1 << 20;

/// Builds consume frames in the scan's task: every message the scan has at hand goes in one
/// frame (a lone message as itself), up to [`CONSUME_BATCH`] messages or about
/// [`CONSUME_BATCH_BYTES`]: framing per message costs more than the message when a consumer is
/// catching up.
struct Frames {
    tx: mpsc::Sender<Result<ConsumeResponse, Status>>,
    batch: Vec<pb::ImmutableMessage>,
    bytes: usize,
}

impl Frames {
    fn new(tx: mpsc::Sender<Result<ConsumeResponse, Status>>) -> Self {
        Self {
            tx,
            batch: Vec::new(),
            bytes: 0,
        }
    }
}

impl scanner::Sink for Frames {
    async fn push(&mut self, msg: walden_message::ImmutableMessage) -> bool {
        self.bytes += msg.payload.len();
        self.batch.push(msg.into_proto());
        if self.batch.len() >= CONSUME_BATCH || self.bytes >= CONSUME_BATCH_BYTES {
            return self.flush().await;
        }
        true
    }

    async fn flush(&mut self) -> bool {
        if self.batch.is_empty() {
            return !self.tx.is_closed();
        }
        let full = std::mem::take(&mut self.batch);
        self.bytes = 0;
        self.tx.send(Ok(frame(full))).await.is_ok()
    }

    async fn fail(&mut self, e: NodeError) {
        if self.flush().await {
            let _ = self.tx.send(Ok(consume_error(&e))).await;
        }
    }

    async fn complete_through(&mut self, tick: TimeTick) -> bool {
        let frame = ConsumeResponse {
            response: Some(consume_response::Response::CompleteThrough(tick.0)),
        };
        self.flush().await && self.tx.send(Ok(frame)).await.is_ok()
    }
}

fn frame(mut msgs: Vec<pb::ImmutableMessage>) -> ConsumeResponse {
    let response = if msgs.len() == 1 {
        consume_response::Response::Message(msgs.remove(0))
    } else {
        consume_response::Response::Batch(pb::MessageBatch { messages: msgs })
    };
    ConsumeResponse {
        response: Some(response),
    }
}

fn consume_error(e: &NodeError) -> ConsumeResponse {
    ConsumeResponse {
        response: Some(consume_response::Response::Error(e.to_proto())),
    }
}

#[tonic::async_trait]
impl StreamingNode for NodeService {
    type ProduceStream = BoxStream<ProduceResponse>;
    type ConsumeStream = BoxStream<ConsumeResponse>;

    async fn produce(
        &self,
        request: Request<Streaming<ProduceRequest>>,
    ) -> Result<Response<Self::ProduceStream>, Status> {
        let (tx, rx) = mpsc::channel(1024);
        tokio::spawn(produce_loop(self.manager.clone(), request.into_inner(), tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn consume(
        &self,
        request: Request<ConsumeRequest>,
    ) -> Result<Response<Self::ConsumeStream>, Status> {
        let r = request.into_inner();
        let start = self
            .manager
            .get(&r.pchannel, r.term)
            .and_then(|ch| Ok((ch, parse_policy(r.policy)?, parse_filters(r.filters)?)));
        let (channel, policy, filters) = match start {
            Ok(x) => x,
            Err(e) => {
                let once = futures::stream::once(async move { Ok(consume_error(&e)) });
                return Ok(Response::new(Box::pin(once)));
            }
        };
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(scanner::scan(channel, policy, filters, Frames::new(tx)));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn status(
        &self,
        _request: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        Ok(Response::new(StatusResponse {
            node_id: self.node_id.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            pchannels: self.manager.statuses(),
            max_message_bytes: self.manager.config().max_message_bytes as u64,
        }))
    }
}
