//! Finding a pchannel's owner. The client follows the topology stream of a coordinator (or of a
//! standalone server, which serves the same stream for itself): a full snapshot, then deltas,
//! each with the etcd revision that made it. Produce and consume ask for the owner at every
//! (re)connect; when a pchannel has no serving owner (it is moving), they wait for the next
//! change. A stream that breaks is reopened on the next coordinator address.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};

use tokio::sync::watch;
use tracing::debug;
use walden_proto::v1::{
    AssignmentState, AssignmentUpdate, PChannelAssignment, WatchAssignmentsRequest,
    cluster_client::ClusterClient,
};

use crate::{ClientError, Grpc};

/// Where produce and consume go.
#[derive(Clone, Debug)]
pub(crate) enum Route {
    /// One server that answered no topology: every pchannel is there.
    Direct(Box<Grpc>),
    Routed(Arc<Router>),
}

impl Route {
    /// The owner of `pchannel` now, waiting up to `wait` for one to be ready.
    pub(crate) async fn grpc(&self, pchannel: &str, wait: Duration) -> Result<Grpc, ClientError> {
        match self {
            Self::Direct(g) => Ok(Grpc::clone(g)),
            Self::Routed(r) => r.owner(pchannel, wait).await,
        }
    }

    /// A connection to the node at `addr` (a read replica); `None` when the client talks to
    /// one server directly.
    pub(crate) fn at(&self, addr: &str) -> Option<Result<Grpc, ClientError>> {
        match self {
            Self::Direct(_) => None,
            Self::Routed(r) => Some(r.conn(addr)),
        }
    }
}

/// Makes a node client for an address (with the connection's token and TLS).
pub(crate) type Connector = Arc<dyn Fn(&str) -> Result<Grpc, ClientError> + Send + Sync>;

/// The followed topology and a connection per node.
pub(crate) struct Router {
    assignments: RwLock<HashMap<String, PChannelAssignment>>,
    version: watch::Sender<u64>,
    /// The address the topology came from; an empty `node_address` means this one.
    origin: Grpc,
    conns: Mutex<HashMap<String, Grpc>>,
    connect: Connector,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router")
            .field("version", &*self.version.borrow())
            .finish_non_exhaustive()
    }
}

impl Router {
    pub(crate) fn new(origin: Grpc, connect: Connector) -> Arc<Self> {
        Arc::new(Self {
            assignments: RwLock::new(HashMap::new()),
            version: watch::channel(0).0,
            origin,
            conns: Mutex::new(HashMap::new()),
            connect,
        })
    }

    /// Applies one update; stale ones (from a lagging coordinator) are ignored.
    pub(crate) fn apply(&self, u: AssignmentUpdate) {
        let current = *self.version.borrow();
        if u.version < current || (!u.full && u.version == current) {
            return;
        }
        let mut a = self.assignments.write().unwrap_or_else(|e| e.into_inner());
        if u.full {
            a.clear();
        }
        for r in u.assignments {
            a.insert(r.pchannel.clone(), r);
        }
        for name in u.removed {
            a.remove(&name);
        }
        drop(a);
        self.version.send_replace(u.version);
    }

    /// Whether `pchannel` has a record at all.
    pub(crate) fn knows(&self, pchannel: &str) -> bool {
        self.assignments
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(pchannel)
    }

    fn serving(&self, pchannel: &str) -> Option<String> {
        let a = self.assignments.read().unwrap_or_else(|e| e.into_inner());
        let r = a.get(pchannel)?;
        (r.state() == AssignmentState::Assigned).then(|| r.node_address.clone())
    }

    async fn owner(&self, pchannel: &str, wait: Duration) -> Result<Grpc, ClientError> {
        let mut changes = self.version.subscribe();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(addr) = self.serving(pchannel) {
                return self.conn(&addr);
            }
            // Not ready (moving, or not yet in the snapshot): wait for the next change.
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                _ => {
                    return Err(ClientError::Server {
                        code: walden_common::ErrorCode::ChannelNotFound.as_u32(),
                        message: format!(
                            "pchannel {} has no serving owner yet (it may be moving)",
                            walden_common::quote_short(pchannel)
                        ),
                        retryable: true,
                    });
                }
            }
        }
    }

    fn conn(&self, addr: &str) -> Result<Grpc, ClientError> {
        if addr.is_empty() {
            return Ok(self.origin.clone());
        }
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(g) = conns.get(addr) {
            return Ok(g.clone());
        }
        let g = (self.connect)(addr)?;
        conns.insert(addr.to_owned(), g.clone());
        Ok(g)
    }

    /// Waits until the first snapshot arrived, at most `wait`.
    pub(crate) async fn ready(&self, wait: Duration) -> bool {
        let mut v = self.version.subscribe();
        tokio::time::timeout(wait, v.wait_for(|v| *v > 0))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

pub(crate) type ClusterGrpc = ClusterClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, crate::Auth>,
>;

/// Opens the topology stream on the first server that answers; `Ok(None)` if the server has
/// no topology for this caller: route directly.
pub(crate) async fn open(
    clients: &[ClusterGrpc],
) -> Result<Option<tonic::Streaming<AssignmentUpdate>>, ClientError> {
    let mut last = None;
    for c in clients {
        match c
            .clone()
            .watch_assignments(WatchAssignmentsRequest {})
            .await
        {
            Ok(s) => return Ok(Some(s.into_inner())),
            // No topology here (an old server), or not for this caller (no valid token: every
            // call it makes is refused the same way, and says why).
            Err(s)
                if matches!(
                    s.code(),
                    tonic::Code::Unimplemented | tonic::Code::Unauthenticated
                ) =>
            {
                return Ok(None);
            }
            Err(s) => last = Some(ClientError::from(s)),
        }
    }
    Err(last.unwrap_or_else(|| ClientError::InvalidArgument("no address given".into())))
}

/// Follows the topology until the router is dropped, moving to the next address on a break.
pub(crate) async fn follow(
    router: std::sync::Weak<Router>,
    clients: Vec<ClusterGrpc>,
    mut stream: tonic::Streaming<AssignmentUpdate>,
) {
    let mut next = 1;
    let mut backoff = Duration::from_millis(50);
    loop {
        loop {
            let msg = stream.message().await;
            let Some(r) = router.upgrade() else { return };
            match msg {
                Ok(Some(u)) => {
                    r.apply(u);
                    backoff = Duration::from_millis(50);
                }
                Ok(None) | Err(_) => break,
            }
        }
        debug!("topology stream broke; reconnecting");
        loop {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(1));
            if router.strong_count() == 0 {
                return;
            }
            let c = &clients[next % clients.len()];
            next += 1;
            if let Ok(s) = c
                .clone()
                .watch_assignments(WatchAssignmentsRequest {})
                .await
            {
                stream = s.into_inner();
                break;
            }
        }
    }
}

pub(crate) fn cluster_client(channel: tonic::transport::Channel, auth: crate::Auth) -> ClusterGrpc {
    ClusterClient::with_interceptor(channel, auth)
}
