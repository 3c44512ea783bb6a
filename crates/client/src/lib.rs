//! The Rust client for Walden.
//!
//! ```no_run
//! use bytes::Bytes;
//! use walden_client::{Client, ConsumerOptions, ProducerOptions};
//! use walden_message::{MessageType, MutableMessage};
//!
//! # async fn demo() -> Result<(), walden_client::ClientError> {
//! let client = Client::connect("http://127.0.0.1:19540").await?;
//! let producer = client.producer("walden-dml-0", ProducerOptions::default());
//! let msg = MutableMessage::new(MessageType::Data, "orders", Bytes::from("hello"));
//! let placed = producer.send(msg).await?.await?;
//! println!("appended at id {} tick {}", placed.id, placed.tick);
//!
//! let mut consumer = client.consumer("walden-dml-0", ConsumerOptions::default());
//! while let Some(m) = consumer.next().await {
//!     let m = m?;
//!     println!("{} {:?}", m.id, m.payload);
//! #   break;
//! }
//! # Ok(()) }
//! ```
//!
//! The producer pipelines appends within a bounded window and, when the stream breaks or the
//! node answers with a retryable error, reconnects and resends every unacknowledged message in
//! its original order. The consumer resumes after a break from the last message it delivered
//! (from that message's last-confirmed id, keeping only greater ticks), so each message is
//! delivered once.

mod collections;
mod consumer;
mod error;
mod producer;
mod router;
mod search;
mod txn;

use std::{sync::Arc, time::Duration};

use tonic::{
    service::interceptor::InterceptedService,
    transport::{Channel, Endpoint},
};
use walden_proto::v1::{
    ClusterStatusRequest, ClusterStatusResponse, DrainNodeRequest, MovePChannelRequest,
    StatusRequest, StatusResponse, query_client::QueryClient, storage_client::StorageClient,
    streaming_node_client::StreamingNodeClient,
};

pub use collections::{AliasOp, Collections, WriteResult};
pub use consumer::{Consumer, ConsumerOptions, DeliverFrom};
pub use error::ClientError;
pub use walden_message::Delivery;

pub use producer::{AppendResult, DEFAULT_MAX_MESSAGE_BYTES, Producer, ProducerOptions};
pub use search::{Consistency, QueryOptions, QueryRows, SearchHit, SearchOptions};
pub use txn::Txn;

/// Adds the bearer token, when there is one, to every call.
pub use walden_connect::Bearer as Auth;
pub use walden_connect::ConnectOptions;

type Intercepted = InterceptedService<Channel, Auth>;

/// A node's gRPC clients as every part of this crate uses them: the streaming node's (what it
/// derefs to) and the storage service's, over one connection.
#[derive(Clone, Debug)]
pub(crate) struct Grpc {
    node: StreamingNodeClient<Intercepted>,
    pub(crate) storage: StorageClient<Intercepted>,
    pub(crate) query: QueryClient<Intercepted>,
}

impl std::ops::Deref for Grpc {
    type Target = StreamingNodeClient<Intercepted>;
    fn deref(&self) -> &Self::Target {
        &self.node
    }
}

impl std::ops::DerefMut for Grpc {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.node
    }
}

/// A connection to Walden: a standalone server, or a cluster's coordinators. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Client {
    grpc: Grpc,
    channel: Channel,
    auth: Auth,
    addr: String,
    route: router::Route,
    /// Every address given (a cluster's coordinators), and how to reach them.
    addrs: Vec<String>,
    options: ConnectOptions,
    /// The highest tick of this client's acknowledged writes (`session` reads wait for it).
    last_write: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Collections described for reads, and when (see `search.rs`).
    described: std::sync::Arc<std::sync::Mutex<search::Described>>,
    /// The highest tick of this client's acknowledged writes per vchannel.
    last_write_by: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, u64>>>,
    /// Turns reads take across each shard's copies (owner, read replicas).
    read_turn: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// How long a read tries again through retryable failures (see `search.rs`).
    read_retry: Duration,
    /// Reads tried again, in all (a failed copy asked of the next, a move followed).
    read_retries: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Read replicas that failed a call, and when: reads pass them over for a while.
    failed_copies:
        std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, std::time::Instant>>>,
}

/// How long the first topology snapshot may take before `connect` gives up waiting for it
/// (produce and consume then wait for their pchannel's owner themselves).
const FIRST_SNAPSHOT: Duration = Duration::from_secs(5);

/// How long one (re)connect of a producer or consumer waits for its pchannel to have a serving
/// owner; the caller's retry budget bounds the whole wait.
pub(crate) const OWNER_WAIT: Duration = Duration::from_secs(2);

impl Client {
    /// Connects to `addr` (`http://host:port`, or `host:port`) without TLS or a token.
    pub async fn connect(addr: &str) -> Result<Self, ClientError> {
        Self::connect_with(addr, &ConnectOptions::default()).await
    }

    /// Connects to `addr`, one address or several comma-separated (a cluster's coordinators),
    /// with a token and/or TLS. The client follows the topology and sends each produce and
    /// consume to its pchannel's owner.
    pub async fn connect_with(addr: &str, options: &ConnectOptions) -> Result<Self, ClientError> {
        let addrs: Vec<&str> = addr
            .split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .collect();
        let Some((first, _)) = addrs.split_first() else {
            return Err(ClientError::InvalidArgument("no address given".into()));
        };
        let mut last = None;
        let mut this = None;
        for a in &addrs {
            match Self::connect_one(a, options).await {
                Ok(c) => {
                    this = Some(c);
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        let Some(mut this) = this else {
            return Err(
                last.unwrap_or_else(|| ClientError::InvalidArgument(format!("address {first:?}")))
            );
        };
        this.addrs = addrs.iter().map(|a| (*a).to_owned()).collect();
        let mut clusters = vec![router::cluster_client(
            this.channel.clone(),
            this.auth.clone(),
        )];
        for a in addrs.iter().filter(|a| url_of(a, options) != this.addr) {
            if let Ok(ep) = endpoint(a, options) {
                clusters.push(router::cluster_client(ep.connect_lazy(), this.auth.clone()));
            }
        }
        if let Some(stream) = router::open(&clusters).await? {
            let opts = options.clone();
            let auth = this.auth.clone();
            let connector: router::Connector = Arc::new(move |a: &str| {
                let ep = endpoint(a, &opts)?;
                Ok(node_client(ep.connect_lazy(), auth.clone()))
            });
            let r = router::Router::new(this.grpc.clone(), connector);
            tokio::spawn(router::follow(Arc::downgrade(&r), clusters, stream));
            r.ready(FIRST_SNAPSHOT).await;
            this.route = router::Route::Routed(r);
        }
        Ok(this)
    }

    async fn connect_one(addr: &str, options: &ConnectOptions) -> Result<Self, ClientError> {
        let url = url_of(addr, options);
        let endpoint = endpoint(addr, options)?;
        let auth = options
            .bearer()
            .map_err(|e| ClientError::InvalidArgument(e.to_string()))?;
        let channel = endpoint.connect().await.map_err(|e| ClientError::Connect {
            addr: url.clone(),
            detail: error::chain(&e),
        })?;
        let grpc = node_client(channel.clone(), auth.clone());
        Ok(Self {
            channel,
            route: router::Route::Direct(Box::new(grpc.clone())),
            grpc,
            auth,
            addr: url,
            addrs: vec![addr.to_owned()],
            options: options.clone(),
            last_write: Default::default(),
            described: Default::default(),
            read_turn: Default::default(),
            last_write_by: Default::default(),
            read_retry: search::READ_RETRY,
            read_retries: Default::default(),
            failed_copies: Default::default(),
        })
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// This client, with reads that try again through retryable failures (a failed copy, a
    /// moved shard) for at most `within` (default 15 s; zero: never, the first failure is
    /// returned). Clones share the count of [`Client::read_retries`].
    pub fn with_read_retry(mut self, within: Duration) -> Self {
        self.read_retry = within;
        self
    }

    /// How many times reads were tried again (each copy or attempt after the first).
    pub fn read_retries(&self) -> u64 {
        self.read_retries.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The node's pchannels, terms, ticks and sizes (the server connected to).
    pub async fn status(&self) -> Result<StatusResponse, ClientError> {
        Ok(self
            .grpc
            .clone()
            .status(StatusRequest {})
            .await?
            .into_inner())
    }

    /// The status of the node that owns `pchannel` now.
    pub async fn status_of(&self, pchannel: &str) -> Result<StatusResponse, ClientError> {
        let grpc = self.route.grpc(pchannel, OWNER_WAIT).await?;
        Ok(grpc.clone().status(StatusRequest {}).await?.into_inner())
    }

    /// Whether `pchannel` exists: in the topology when following one, else on the server.
    pub async fn has_pchannel(&self, pchannel: &str) -> Result<bool, ClientError> {
        match &self.route {
            router::Route::Routed(r) => Ok(r.knows(pchannel)),
            router::Route::Direct(_) => Ok(self
                .status()
                .await?
                .pchannels
                .iter()
                .any(|p| p.name == pchannel)),
        }
    }

    /// Leader, nodes and pchannels of the cluster (or of a standalone server, as one node).
    pub async fn cluster_status(&self) -> Result<ClusterStatusResponse, ClientError> {
        Ok(
            router::cluster_client(self.channel.clone(), self.auth.clone())
                .cluster_status(ClusterStatusRequest {})
                .await?
                .into_inner(),
        )
    }

    /// A channel to the coordinator that leads now, asking each known coordinator.
    pub(crate) async fn leader_channel(&self) -> Option<(Channel, Auth)> {
        for a in &self.addrs {
            let Ok(ep) = endpoint(a, &self.options) else {
                continue;
            };
            let channel = ep.connect_lazy();
            let status = router::cluster_client(channel.clone(), self.auth.clone())
                .cluster_status(ClusterStatusRequest {})
                .await;
            if let Ok(s) = status
                && let Some(l) = s.into_inner().leader
            {
                let ep = endpoint(&l.address, &self.options).ok()?;
                return Some((ep.connect_lazy(), self.auth.clone()));
            }
        }
        None
    }

    /// `count` consecutive ticks from the cluster's timestamp oracle (the leader coordinator's,
    /// or a standalone server's own): returns the first. Every tick is above every tick any
    /// log holds now, and no other caller gets it: Milvus's AllocTimestamp, and ids for rows
    /// that want the server to choose them.
    pub async fn allocate_ticks(&self, count: u32) -> Result<u64, ClientError> {
        let req = walden_proto::v1::AllocateTicksRequest { count, above: 0 };
        let mut channel = self.channel.clone();
        let mut last = None;
        for _ in 0..3 {
            match router::cluster_client(channel.clone(), self.auth.clone())
                .allocate_ticks(req)
                .await
            {
                Ok(r) => return Ok(r.into_inner().first),
                Err(s) => {
                    let e = ClientError::from(s);
                    if walden_common::HasErrorCode::code(&e) != walden_common::ErrorCode::NotLeader
                    {
                        return Err(e);
                    }
                    last = Some(e);
                    match self.leader_channel().await {
                        Some((c, _)) => channel = c,
                        None => tokio::time::sleep(Duration::from_millis(200)).await,
                    }
                }
            }
        }
        Err(last.unwrap_or_else(|| ClientError::Transport("no coordinator leads".into())))
    }

    /// Moves `pchannel` to node `to` (an operator's move; the leader coordinator does it).
    pub async fn move_pchannel(&self, pchannel: &str, to: u64) -> Result<String, ClientError> {
        Ok(
            router::cluster_client(self.channel.clone(), self.auth.clone())
                .move_p_channel(MovePChannelRequest {
                    pchannel: pchannel.to_owned(),
                    to_node: to,
                })
                .await?
                .into_inner()
                .detail,
        )
    }

    /// Drains node `id`: its pchannels move to the others.
    pub async fn drain_node(&self, id: u64) -> Result<String, ClientError> {
        Ok(
            router::cluster_client(self.channel.clone(), self.auth.clone())
                .drain_node(DrainNodeRequest { node_id: id })
                .await?
                .into_inner()
                .detail,
        )
    }

    /// A producer on `pchannel`. It connects lazily, on the first send, to the pchannel's
    /// owner, and follows it when it moves.
    pub fn producer(&self, pchannel: &str, options: ProducerOptions) -> Producer {
        Producer::start(self.route.clone(), pchannel.to_owned(), options)
    }

    /// The collections API (create, describe, insert, delete, flush, ...).
    pub fn collections(&self) -> Collections {
        Collections::new(self.clone(), self.channel.clone(), self.auth.clone())
    }

    /// A consumer of `pchannel`. It connects lazily, on the first `next`.
    pub fn consumer(&self, pchannel: &str, options: ConsumerOptions) -> Consumer {
        Consumer::start(self.route.clone(), pchannel.to_owned(), options)
    }
}

fn node_client(channel: Channel, auth: Auth) -> Grpc {
    Grpc {
        node: StreamingNodeClient::with_interceptor(channel.clone(), auth.clone())
            .max_decoding_message_size(256 << 20)
            .max_encoding_message_size(256 << 20),
        storage: StorageClient::with_interceptor(channel.clone(), auth.clone())
            .max_decoding_message_size(256 << 20),
        query: QueryClient::with_interceptor(channel, auth)
            .max_decoding_message_size(256 << 20)
            .max_encoding_message_size(256 << 20),
    }
}

fn url_of(addr: &str, options: &ConnectOptions) -> String {
    walden_connect::url_of(addr, options)
}

fn endpoint(addr: &str, options: &ConnectOptions) -> Result<Endpoint, ClientError> {
    walden_connect::endpoint(addr, options).map_err(|e| ClientError::InvalidArgument(e.to_string()))
}

/// A collection's segments, as [`Client::segments`] returns them.
#[derive(Clone, Debug, Default)]
pub struct CollectionSegments {
    pub segments: Vec<walden_proto::v1::SegmentInfo>,
    /// Per vchannel: the last Flush committed and the flushed-through position.
    pub vchannels: Vec<walden_proto::v1::VChannelFlushState>,
}

impl Client {
    /// Every segment of `collection`: growing and sealed ones as the flushers of their
    /// pchannels' owners hold them, flushed and compacted ones (and delete logs) as their
    /// manifests name them, each file with its full URL.
    pub async fn segments(&self, collection: &str) -> Result<CollectionSegments, ClientError> {
        let info = self.collections().describe(collection).await?;
        self.segments_of(&info.vchannels).await
    }

    async fn segments_of(
        &self,
        vchannels: &[walden_proto::v1::VChannelInfo],
    ) -> Result<CollectionSegments, ClientError> {
        let mut by_pchannel: std::collections::BTreeMap<&str, Vec<String>> = Default::default();
        for v in vchannels {
            by_pchannel
                .entry(v.pchannel.as_str())
                .or_default()
                .push(v.name.clone());
        }
        let mut out = CollectionSegments::default();
        for (pchannel, names) in by_pchannel {
            let grpc = self.route.grpc(pchannel, OWNER_WAIT).await?;
            let r = grpc
                .storage
                .clone()
                .segments(walden_proto::v1::SegmentsRequest { vchannels: names })
                .await?
                .into_inner();
            out.segments.extend(r.segments);
            out.vchannels.extend(r.vchannels);
        }
        out.segments
            .sort_by(|a, b| (&a.vchannel, a.segment_id).cmp(&(&b.vchannel, b.segment_id)));
        Ok(out)
    }

    /// Seals every growing segment of `collection` and waits until each sealed one is
    /// flushed and in its manifest (at most `timeout`).
    pub async fn flush_and_wait(
        &self,
        collection: &str,
        timeout: Duration,
    ) -> Result<CollectionSegments, ClientError> {
        let info = self.collections().describe(collection).await?;
        let flushed = self.collections().flush(collection).await?;
        let started = std::time::Instant::now();
        loop {
            let s = self.segments_of(&info.vchannels).await?;
            let done = info
                .vchannels
                .iter()
                .zip(&flushed.time_ticks)
                .all(|(v, t)| {
                    s.vchannels
                        .iter()
                        .any(|f| f.vchannel == v.name && f.flushed_tick >= *t)
                });
            if done {
                return Ok(s);
            }
            if started.elapsed() >= timeout {
                return Err(ClientError::RetriesExhausted {
                    seconds: started.elapsed().as_secs_f64(),
                    last: Box::new(ClientError::Server {
                        code: walden_common::ErrorCode::StorageUnavailable.as_u32(),
                        message: format!(
                            "collection {} was sealed but not every segment is flushed yet",
                            walden_common::quote_short(collection)
                        ),
                        retryable: true,
                    }),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
