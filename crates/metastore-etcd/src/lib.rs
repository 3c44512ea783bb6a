//! The metastore contract (`walden-metastore-api`) on etcd v3, for a cluster.
//!
//! A thin adapter: keys, revisions, transactions and leases map one to one onto etcd's. Two
//! things are added:
//!
//! * **Watches survive an etcd restart.** A watch remembers the last revision it delivered and,
//!   when its stream breaks, watches again from the next one, so no change is missed or seen
//!   twice. Only when etcd has compacted past that revision does the watch end (the receiver
//!   closes), and its owner must read the prefix afresh.
//! * **Every request has a deadline** (`request_timeout`), so a dead etcd surfaces as
//!   `Unavailable` rather than a hang.

#[cfg(feature = "testing")]
pub mod testing;

#[allow(missing_docs, missing_debug_implementations, clippy::all)]
mod pb {
    pub mod mvccpb {
        tonic::include_proto!("mvccpb");
    }
    pub mod etcdserverpb {
        tonic::include_proto!("etcdserverpb");
    }
}

use std::{fmt, time::Duration};

use async_trait::async_trait;
use bytes::Bytes;
use pb::etcdserverpb::{
    self as rpc, compare::CompareResult, compare::CompareTarget as EtcdTarget,
    compare::TargetUnion, kv_client::KvClient, lease_client::LeaseClient, request_op::Request,
    watch_client::WatchClient, watch_request::RequestUnion,
};
use tokio::sync::mpsc;
use tokio_stream::{StreamExt, wrappers::ReceiverStream};
use tonic::transport::{Channel, Endpoint};
use tracing::{debug, warn};
use walden_metastore_api::{
    CompareOp, CompareTarget, EventKind, KeyValue, LeaseId, MetaError, MetaResult, MetaStore, Op,
    Revision, Txn, TxnResponse, WatchEvent, WatchReceiver,
};

/// How to reach etcd.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdConfig {
    /// Client URLs as etcd prints them (`http://127.0.0.1:2379`); requests are balanced over
    /// them and move on when one fails.
    pub endpoints: Vec<String>,
    /// Longest wait for a connection at start.
    pub connect_timeout: Duration,
    /// Longest wait for any one request; past it the request fails as `Unavailable`.
    pub request_timeout: Duration,
}

impl EtcdConfig {
    /// Parses a comma-separated endpoint list, with the default timeouts.
    pub fn from_endpoints(list: &str) -> MetaResult<Self> {
        let endpoints: Vec<String> = list
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
        if endpoints.is_empty() {
            return Err(MetaError::InvalidArgument(
                "no etcd endpoints given (expected e.g. http://127.0.0.1:2379)".into(),
            ));
        }
        for e in &endpoints {
            if !(e.starts_with("http://") || e.starts_with("https://")) {
                return Err(MetaError::InvalidArgument(format!(
                    "etcd endpoint {} is not an http:// or https:// URL",
                    walden_common::quote_short(e)
                )));
            }
        }
        Ok(Self {
            endpoints,
            ..Self::default()
        })
    }
}

impl Default for EtcdConfig {
    fn default() -> Self {
        Self {
            endpoints: vec!["http://127.0.0.1:2379".into()],
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(5),
        }
    }
}

/// A [`MetaStore`] on an etcd cluster.
#[derive(Clone)]
pub struct EtcdMetaStore {
    channel: Channel,
    config: EtcdConfig,
}

impl fmt::Debug for EtcdMetaStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdMetaStore")
            .field("endpoints", &self.config.endpoints)
            .finish_non_exhaustive()
    }
}

fn unavailable(context: &str, e: impl fmt::Display) -> MetaError {
    MetaError::Unavailable {
        context: format!("etcd: {context}"),
        detail: e.to_string(),
    }
}

fn map_status(context: &str, s: tonic::Status, lease: Option<LeaseId>) -> MetaError {
    if let Some(id) = lease
        && s.message().contains("requested lease not found")
    {
        return MetaError::LeaseNotFound(id);
    }
    match s.code() {
        // etcd's refusals of the request itself (too large, too many operations, a key twice).
        tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition => {
            MetaError::InvalidArgument(format!("etcd: {context}: {}", s.message()))
        }
        _ => unavailable(context, format!("{}: {}", s.code(), s.message())),
    }
}

/// The end of the key range holding every key that starts with `prefix` (etcd's convention:
/// the prefix with its last byte below 0xff raised by one).
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0] // every key
}

fn to_kv(kv: pb::mvccpb::KeyValue) -> MetaResult<KeyValue> {
    let key = String::from_utf8(kv.key)
        .map_err(|e| MetaError::Corrupted(format!("etcd key {:?} is not UTF-8", e.as_bytes())))?;
    Ok(KeyValue {
        key,
        value: Bytes::from(kv.value),
        create_revision: kv.create_revision,
        mod_revision: kv.mod_revision,
        version: kv.version,
        lease: (kv.lease != 0).then_some(kv.lease),
    })
}

fn header_revision(h: Option<&rpc::ResponseHeader>) -> Revision {
    h.map_or(0, |h| h.revision)
}

fn to_etcd_op(op: &Op) -> rpc::RequestOp {
    let request = match op {
        Op::Put { key, value, lease } => Request::RequestPut(rpc::PutRequest {
            key: key.as_bytes().to_vec(),
            value: value.to_vec(),
            lease: lease.unwrap_or(0),
        }),
        Op::Delete { key } => Request::RequestDeleteRange(rpc::DeleteRangeRequest {
            key: key.as_bytes().to_vec(),
            range_end: Vec::new(),
        }),
    };
    rpc::RequestOp {
        request: Some(request),
    }
}

fn to_etcd_compare(c: &walden_metastore_api::Compare) -> rpc::Compare {
    let result = match c.op {
        CompareOp::Equal => CompareResult::Equal,
        CompareOp::NotEqual => CompareResult::NotEqual,
        CompareOp::Less => CompareResult::Less,
        CompareOp::Greater => CompareResult::Greater,
    };
    let (target, union) = match &c.target {
        CompareTarget::CreateRevision(r) => (EtcdTarget::Create, TargetUnion::CreateRevision(*r)),
        CompareTarget::ModRevision(r) => (EtcdTarget::Mod, TargetUnion::ModRevision(*r)),
        CompareTarget::Version(v) => (EtcdTarget::Version, TargetUnion::Version(*v)),
        CompareTarget::Value(v) => (EtcdTarget::Value, TargetUnion::Value(v.to_vec())),
    };
    rpc::Compare {
        result: result as i32,
        target: target as i32,
        key: c.key.as_bytes().to_vec(),
        target_union: Some(union),
    }
}

/// The lease a transaction's puts name, for error mapping.
fn txn_lease(txn: &Txn) -> Option<LeaseId> {
    txn.success
        .iter()
        .chain(&txn.failure)
        .find_map(|op| match op {
            Op::Put { lease, .. } => *lease,
            Op::Delete { .. } => None,
        })
}

impl EtcdMetaStore {
    /// Connects, and checks that etcd answers (so a wrong address fails here, with its reason).
    pub async fn connect(config: EtcdConfig) -> MetaResult<Self> {
        if config.endpoints.is_empty() {
            return Err(MetaError::InvalidArgument("no etcd endpoints given".into()));
        }
        let mut endpoints = Vec::new();
        for e in &config.endpoints {
            let endpoint = Endpoint::from_shared(e.clone())
                .map_err(|err| {
                    MetaError::InvalidArgument(format!(
                        "etcd endpoint {}: {err}",
                        walden_common::quote_short(e)
                    ))
                })?
                .connect_timeout(config.connect_timeout)
                .timeout(config.request_timeout)
                // A dead peer is noticed between requests too.
                .http2_keep_alive_interval(Duration::from_secs(5))
                .keep_alive_timeout(config.request_timeout)
                .keep_alive_while_idle(true);
            endpoints.push(endpoint);
        }
        let channel = Channel::balance_list(endpoints.into_iter());
        let store = Self { channel, config };
        // The probe: a read that needs a quorum.
        let list = store.config.endpoints.join(",");
        store
            .range_request(rpc::RangeRequest {
                key: b"walden/".to_vec(),
                range_end: prefix_end("walden/"),
                count_only: true,
                ..Default::default()
            })
            .await
            .map_err(|e| match e {
                MetaError::Unavailable { detail, .. } => MetaError::Unavailable {
                    context: format!("etcd: reaching {list}"),
                    detail,
                },
                other => other,
            })?;
        Ok(store)
    }

    pub fn config(&self) -> &EtcdConfig {
        &self.config
    }

    fn kv(&self) -> KvClient<Channel> {
        KvClient::new(self.channel.clone())
    }

    async fn range_request(&self, req: rpc::RangeRequest) -> MetaResult<rpc::RangeResponse> {
        // Bounded here too: a balanced channel with no live endpoint may wait for one.
        tokio::time::timeout(self.config.request_timeout, self.kv().range(req))
            .await
            .map_err(|_| unavailable("range", "no answer within the request timeout"))?
            .map(tonic::Response::into_inner)
            .map_err(|s| map_status("range", s, None))
    }

    async fn call<T, F>(&self, context: &str, lease: Option<LeaseId>, f: F) -> MetaResult<T>
    where
        F: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        tokio::time::timeout(self.config.request_timeout, f)
            .await
            .map_err(|_| unavailable(context, "no answer within the request timeout"))?
            .map(tonic::Response::into_inner)
            .map_err(|s| map_status(context, s, lease))
    }
}

#[async_trait]
impl MetaStore for EtcdMetaStore {
    async fn get(&self, key: &str) -> MetaResult<Option<KeyValue>> {
        let resp = self
            .range_request(rpc::RangeRequest {
                key: key.as_bytes().to_vec(),
                ..Default::default()
            })
            .await?;
        resp.kvs.into_iter().next().map(to_kv).transpose()
    }

    async fn range(&self, prefix: &str) -> MetaResult<Vec<KeyValue>> {
        // etcd sorts a range by key unless told otherwise.
        let resp = self
            .range_request(rpc::RangeRequest {
                key: prefix.as_bytes().to_vec(),
                range_end: prefix_end(prefix),
                ..Default::default()
            })
            .await?;
        resp.kvs.into_iter().map(to_kv).collect()
    }

    async fn put(&self, key: &str, value: Bytes, lease: Option<LeaseId>) -> MetaResult<Revision> {
        let req = rpc::PutRequest {
            key: key.as_bytes().to_vec(),
            value: value.to_vec(),
            lease: lease.unwrap_or(0),
        };
        let mut kv = self.kv();
        let resp = self.call("put", lease, kv.put(req)).await?;
        Ok(header_revision(resp.header.as_ref()))
    }

    async fn delete(&self, key: &str) -> MetaResult<bool> {
        let req = rpc::DeleteRangeRequest {
            key: key.as_bytes().to_vec(),
            range_end: Vec::new(),
        };
        let mut kv = self.kv();
        let resp = self.call("delete", None, kv.delete_range(req)).await?;
        Ok(resp.deleted > 0)
    }

    async fn txn(&self, txn: Txn) -> MetaResult<TxnResponse> {
        let lease = txn_lease(&txn);
        let req = rpc::TxnRequest {
            compare: txn.compare.iter().map(to_etcd_compare).collect(),
            success: txn.success.iter().map(to_etcd_op).collect(),
            failure: txn.failure.iter().map(to_etcd_op).collect(),
        };
        let mut kv = self.kv();
        let resp = self.call("transaction", lease, kv.txn(req)).await?;
        Ok(TxnResponse {
            succeeded: resp.succeeded,
            revision: header_revision(resp.header.as_ref()),
        })
    }

    async fn watch(&self, prefix: &str) -> MetaResult<WatchReceiver> {
        // Start at the revision current now: "every change made after the watch was created".
        let now = self
            .range_request(rpc::RangeRequest {
                key: prefix.as_bytes().to_vec(),
                range_end: prefix_end(prefix),
                count_only: true,
                ..Default::default()
            })
            .await?;
        let from = header_revision(now.header.as_ref()) + 1;
        let stream = self.open_watch(prefix, from).await?;
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(forward_watch(
            self.clone(),
            prefix.to_owned(),
            from,
            stream,
            tx,
        ));
        Ok(rx)
    }

    async fn grant_lease(&self, ttl: Duration) -> MetaResult<LeaseId> {
        // etcd counts in whole seconds (and raises very short TTLs to its minimum).
        let secs = ttl.as_millis().div_ceil(1000).max(1) as i64;
        let mut lease = LeaseClient::new(self.channel.clone());
        let resp = self
            .call(
                "granting a lease",
                None,
                lease.lease_grant(rpc::LeaseGrantRequest { ttl: secs, id: 0 }),
            )
            .await?;
        if !resp.error.is_empty() {
            return Err(unavailable("granting a lease", resp.error));
        }
        Ok(resp.id)
    }

    async fn keep_alive(&self, id: LeaseId) -> MetaResult<()> {
        const CONTEXT: &str = "keeping a lease alive";
        let mut lease = LeaseClient::new(self.channel.clone());
        let request = tokio_stream::once(rpc::LeaseKeepAliveRequest { id });
        let mut answers = self
            .call(CONTEXT, Some(id), lease.lease_keep_alive(request))
            .await?;
        let answer = tokio::time::timeout(self.config.request_timeout, answers.next())
            .await
            .map_err(|_| unavailable(CONTEXT, "no answer within the request timeout"))?;
        match answer {
            // etcd answers a lease it no longer has with TTL 0.
            Some(Ok(r)) if r.ttl > 0 => Ok(()),
            Some(Ok(_)) => Err(MetaError::LeaseNotFound(id)),
            Some(Err(s)) => Err(map_status(CONTEXT, s, Some(id))),
            None => Err(unavailable(CONTEXT, "the stream ended without an answer")),
        }
    }

    async fn revoke_lease(&self, id: LeaseId) -> MetaResult<()> {
        let mut lease = LeaseClient::new(self.channel.clone());
        self.call(
            "revoking a lease",
            Some(id),
            lease.lease_revoke(rpc::LeaseRevokeRequest { id }),
        )
        .await?;
        Ok(())
    }
}

/// One open watch: its request side (dropping it cancels the watch) and its answers.
struct WatchStream {
    _requests: mpsc::Sender<rpc::WatchRequest>,
    answers: tonic::Streaming<rpc::WatchResponse>,
}

impl EtcdMetaStore {
    /// Opens a prefix watch from revision `from` and waits for etcd to confirm it.
    async fn open_watch(&self, prefix: &str, from: Revision) -> MetaResult<WatchStream> {
        let (requests, rx) = mpsc::channel(1);
        let create = rpc::WatchRequest {
            request_union: Some(RequestUnion::CreateRequest(rpc::WatchCreateRequest {
                key: prefix.as_bytes().to_vec(),
                range_end: prefix_end(prefix),
                start_revision: from,
                ..Default::default()
            })),
        };
        requests
            .send(create)
            .await
            .map_err(|_| unavailable("watch", "request stream closed"))?;
        let mut client = WatchClient::new(self.channel.clone());
        let mut answers = self
            .call("watch", None, client.watch(ReceiverStream::new(rx)))
            .await?;
        // The first answer says whether the watch exists; events after it are in order.
        let first = tokio::time::timeout(self.config.request_timeout, answers.message())
            .await
            .map_err(|_| unavailable("watch", "no answer within the request timeout"))?;
        match first {
            Ok(Some(r)) if r.created && !r.canceled => Ok(WatchStream {
                _requests: requests,
                answers,
            }),
            Ok(Some(r)) if r.compact_revision > 0 => Err(MetaError::Corrupted(format!(
                "etcd: watch from revision {from}: history compacted at {}",
                r.compact_revision
            ))),
            Ok(Some(r)) => Err(unavailable(
                "watch",
                format!("refused: {}", r.cancel_reason),
            )),
            Ok(None) => Err(unavailable("watch", "the stream ended at creation")),
            Err(s) => Err(map_status("watch", s, None)),
        }
    }
}

/// Delivers a watch's events until the receiver is dropped, re-watching from the next revision
/// when the stream breaks. Ends (closing the receiver) only when the history it needs is gone.
async fn forward_watch(
    store: EtcdMetaStore,
    prefix: String,
    mut next: Revision,
    stream: WatchStream,
    tx: mpsc::UnboundedSender<WatchEvent>,
) {
    let mut stream = Some(stream);
    let mut backoff = Duration::from_millis(50);
    loop {
        let mut s = match stream.take() {
            Some(s) => s,
            None => {
                tokio::select! {
                    () = tx.closed() => return,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
                match store.open_watch(&prefix, next).await {
                    Ok(s) => {
                        debug!(prefix, from = next, "watch resumed");
                        s
                    }
                    Err(e @ MetaError::Corrupted(_)) => {
                        warn!(prefix, error = %e, "ending the watch");
                        return;
                    }
                    Err(_) => continue,
                }
            }
        };
        loop {
            let msg = tokio::select! {
                () = tx.closed() => return,
                m = s.answers.message() => m,
            };
            match msg {
                Ok(Some(resp)) => {
                    if resp.canceled {
                        warn!(
                            prefix,
                            reason = resp.cancel_reason,
                            compacted_at = resp.compact_revision,
                            "watch cancelled by etcd"
                        );
                        if resp.compact_revision > 0 {
                            return;
                        }
                        break;
                    }
                    backoff = Duration::from_millis(50);
                    for ev in resp.events {
                        let kind = if ev.r#type == pb::mvccpb::event::EventType::Delete as i32 {
                            EventKind::Delete
                        } else {
                            EventKind::Put
                        };
                        let Some(kv) = ev.kv else { continue };
                        let Ok(kv) = to_kv(kv) else {
                            warn!(prefix, "skipping a watch event with a non-UTF-8 key");
                            continue;
                        };
                        next = next.max(kv.mod_revision + 1);
                        if tx.send(WatchEvent { kind, kv }).is_err() {
                            return;
                        }
                    }
                }
                Ok(None) | Err(_) => {
                    debug!(prefix, from = next, "watch stream broke; resuming");
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::prefix_end;

    #[test]
    fn a_prefix_range_ends_at_the_prefix_with_its_last_byte_raised() {
        assert_eq!(prefix_end("walden/"), b"walden0");
        assert_eq!(prefix_end("a\u{7f}"), [b'a', 0x80]);
        assert_eq!(prefix_end(""), [0]);
    }
}
