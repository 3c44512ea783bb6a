//! Standalone's `Cluster` service: the topology of a one-node cluster, so that clients route
//! the same way against standalone as against a cluster. Every pchannel is on this node (an
//! empty `node_address` means "the address you connected to"); the snapshot is sent again
//! whenever the node's served set changes. Moves, drains and the cluster clock need a cluster.

use std::{pin::Pin, sync::Arc};

use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use walden_proto::v1::{
    AllocateTicksRequest, AllocateTicksResponse, AssignmentState, AssignmentUpdate, ClusterAck,
    ClusterNodeStatus, ClusterStatusRequest, ClusterStatusResponse, DrainNodeRequest,
    MovePChannelRequest, NodeInfo, PChannelAssignment, WatchAssignmentsRequest,
    cluster_server::{Cluster, ClusterServer},
};
use walden_streaming_node::manager::WalManager;

#[derive(Debug, Clone)]
pub struct LocalCluster {
    manager: Arc<WalManager>,
    address: String,
}

impl LocalCluster {
    pub fn new(manager: Arc<WalManager>, address: String) -> Self {
        Self { manager, address }
    }

    pub fn into_server(self) -> ClusterServer<Self> {
        ClusterServer::new(self)
    }

    fn assignments(&self) -> Vec<PChannelAssignment> {
        self.manager
            .statuses()
            .into_iter()
            .map(|p| PChannelAssignment {
                state: if p.state == "failed" {
                    AssignmentState::Assigning
                } else {
                    AssignmentState::Assigned
                } as i32,
                pchannel: p.name,
                term: p.term,
                node_id: 0,
                node_address: String::new(),
                detail: p.state_detail,
                ..Default::default()
            })
            .collect()
    }
}

/// The most ticks one AllocateTicks call hands out (as the cluster's coordinator).
const MAX_TICK_BATCH: u32 = 1 << 20;

fn standalone(what: &str) -> Status {
    Status::failed_precondition(format!(
        "{what} needs a cluster; this is a standalone server"
    ))
}

type UpdateStream = Pin<Box<dyn Stream<Item = Result<AssignmentUpdate, Status>> + Send>>;

#[tonic::async_trait]
impl Cluster for LocalCluster {
    type WatchAssignmentsStream = UpdateStream;

    async fn watch_assignments(
        &self,
        _req: Request<WatchAssignmentsRequest>,
    ) -> Result<Response<Self::WatchAssignmentsStream>, Status> {
        let this = self.clone();
        let changes = self.manager.changes();
        // A snapshot at the start and after every change of what the node serves (a term
        // raised by a reopen is an open); nothing is polled.
        let stream = futures::stream::unfold(
            (this, changes, Vec::<PChannelAssignment>::new(), 0u64),
            |(this, mut changes, last, version)| async move {
                loop {
                    changes.borrow_and_update();
                    let now = this.assignments();
                    if version == 0 || now != last {
                        // Versions rise across restarts too (a client keeps the highest it saw).
                        let version = (version + 1).max(walden_tso::now_ms());
                        let update = AssignmentUpdate {
                            version,
                            full: true,
                            assignments: now.clone(),
                            removed: Vec::new(),
                        };
                        return Some((Ok(update), (this, changes, now, version)));
                    }
                    changes.changed().await.ok()?;
                }
            },
        );
        Ok(Response::new(Box::pin(stream)))
    }

    /// Batches of ticks from this server's own oracle (the ticks its pchannels use), as the
    /// leader coordinator hands them out in a cluster.
    async fn allocate_ticks(
        &self,
        req: Request<AllocateTicksRequest>,
    ) -> Result<Response<AllocateTicksResponse>, Status> {
        let r = req.into_inner();
        if r.count == 0 || r.count > MAX_TICK_BATCH {
            return Err(walden_proto::status::of(
                &walden_tso::TsoError::InvalidArgument(format!(
                    "a tick batch holds 1 to {MAX_TICK_BATCH} ticks, not {}",
                    r.count
                )),
            ));
        }
        let Some(server) = self.manager.ticks().server() else {
            return Err(standalone("the cluster clock"));
        };
        let first = server
            .allocate(r.count, walden_common::TimeTick(r.above))
            .await
            .map_err(|e| walden_proto::status::of(&e))?;
        Ok(Response::new(AllocateTicksResponse {
            first: first.0,
            count: r.count,
        }))
    }

    async fn move_p_channel(
        &self,
        _req: Request<MovePChannelRequest>,
    ) -> Result<Response<ClusterAck>, Status> {
        Err(standalone("moving a pchannel"))
    }

    async fn drain_node(
        &self,
        _req: Request<DrainNodeRequest>,
    ) -> Result<Response<ClusterAck>, Status> {
        Err(standalone("draining a node"))
    }

    async fn cluster_status(
        &self,
        _req: Request<ClusterStatusRequest>,
    ) -> Result<Response<ClusterStatusResponse>, Status> {
        let pchannels = self.assignments();
        Ok(Response::new(ClusterStatusResponse {
            leader: None,
            nodes: vec![ClusterNodeStatus {
                node: Some(NodeInfo {
                    id: 0,
                    address: self.address.clone(),
                    ..Default::default()
                }),
                pchannels: pchannels.iter().map(|p| p.pchannel.clone()).collect(),
            }],
            pchannels,
            answered_by: self.address.clone(),
            answered_by_leader: true,
        }))
    }
}
